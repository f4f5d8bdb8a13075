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

`LazyTrace`: a generator's requests kept as columns and made one at a time when read.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from kvbench.request import Request
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


class LazyTrace(Sequence):
    """A trace of `n` requests kept as columns: request i is made by `make(i)` when it is read,
    so a 10^7-request trace never exists as 10^7 Python objects at once (a replay reads it in
    order and drops each request when it leaves).

    Reading a row while a `Request` made for it is still referenced gives that same object (a
    weak cache), so a caller that holds a request sees its own writes; a row read again after
    every reference is gone is made anew, with equal fields and the same ids (`make` is a pure
    function of the trace's config). Slices are lists. Mutates only its weak cache.
    """

    def __init__(self, n: int, make: Callable[[int], Request]) -> None:
        self._n, self._make = int(n), make
        self._live: weakref.WeakValueDictionary[int, Request] = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"request {i} of a trace of {self._n}")
        r = self._live.get(i)
        if r is None:
            r = self._live[i] = self._make(i)
        return r

    def __iter__(self) -> Iterator[Request]:
        for i in range(self._n):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, LazyTrace)):
            return len(self) == len(other) and all(a is b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LazyTrace({self._n} requests)"
