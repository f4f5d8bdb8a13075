"""The keys every trace config has, files and generators alike, and their checks.

    name          label of the trace in results
    rate          null (a file's own timestamps), req/s > 0, or inf (all at t=0)
    limit         the first N requests (files: the first N rows read; generators: the first N
                  in arrival order); null = all; an integer >= 0 (0 gives an empty trace)
    seed          seeds every random id and length
    vocab_size    ids are drawn from [0, vocab_size)
    max_model_len the run's limit on prompt + output (``${max_model_len}``): a request whose
                  prompt or output alone is longer will be rejected by the scheduler, so its
                  ids are not built (null: build every request's ids)

Sanity limits (any row over them is malformed, whatever the run's max_model_len):

    MAX_TOKENS     a prompt or output of more than 2**24 (16.8M) tokens (64 MiB of ids)
    MAX_ARRIVAL_S  an arrival 2**32 s (136 years) or more after the trace's start: float64
                   seconds resolve 1 us only below that, so TTFTs would round to 0
"""
from __future__ import annotations

import numpy as np

from kvbench.traces.errors import TraceError

MAX_TOKENS = 2**24
MAX_ARRIVAL_S = float(2**32)
COMMON_KEYS = ("name", "rate", "limit", "seed", "vocab_size", "max_model_len")


def check_limit(limit: object) -> int | None:
    """null or an integer >= 0 (not a bool, not 1.5, not '3')."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise TraceError(f"trace.limit must be null or an integer >= 0, got {limit!r}")
    return int(limit)


def check_max_model_len(max_model_len: object) -> int | None:
    """null or an integer >= 1."""
    if max_model_len is None:
        return None
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, (int, np.integer)) or max_model_len < 1:
        raise TraceError(f"trace.max_model_len must be null or an integer >= 1, got {max_model_len!r}")
    return int(max_model_len)


def longer_than(lengths: np.ndarray, max_model_len: int | None) -> np.ndarray:
    """[N] bool: which prompts (or outputs) are alone longer than max_model_len.

    A request with such a side is left unbuilt: the scheduler rejects it (prompt + output >
    max_model_len), so its ids are made only if something reads them. A request whose sides
    each fit but whose sum does not is built (at most 2 x max_model_len ids), so the ids of a
    trace do not depend on max_model_len unless a single prompt or output exceeds it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_model_len is None:
        return np.zeros(len(lengths), dtype=bool)
    return lengths > max_model_len
