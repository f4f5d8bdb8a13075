"""Azure LLM inference trace 2023 (Splitwise): ``TIMESTAMP,ContextTokens,GeneratedTokens``.

No prefix information: every prompt gets its own random ids (seeded), so no two requests share
a prefix beyond chance. TIMESTAMP is ``YYYY-MM-DD HH:MM:SS.fffffff`` (7 fractional digits,
which ``datetime.fromisoformat`` rejects), parsed exactly here.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kvbench.request import Request
from kvbench.traces.arrivals import retime
from kvbench.traces.build import assemble
from kvbench.traces.errors import row_error
from kvbench.traces.fields import csv_rows, parse_int
from kvbench.traces.paths import resolve_trace_path
from kvbench.traces.tokens import (DEFAULT_VOCAB, OUTPUT_STREAM, PROMPT_STREAM, check_vocab,
                                   random_pieces, stream)

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def parse_timestamp_ns(text: str, where: str, field: str = "TIMESTAMP") -> int:
    """'2023-11-16 18:17:03.9799600' -> integer nanoseconds since 1970-01-01 (naive time).

    Integers, not float seconds: a float64 near 1.7e9 s resolves only ~240 ns, coarser than the
    trace's 100 ns digits. The caller subtracts the first time before converting to seconds.
    """
    whole, _, frac = text.strip().partition(".")
    try:
        if frac and not (frac.isdigit() and len(frac) <= 9):
            raise ValueError
        base = datetime.fromisoformat(whole)
    except ValueError:
        raise row_error(where, field, "a time 'YYYY-MM-DD HH:MM:SS.fffffff'", text) from None
    if base.tzinfo is not None:
        base = base.astimezone(timezone.utc).replace(tzinfo=None)
    delta = base - datetime(1970, 1, 1)
    whole_s = delta.days * 86400 + delta.seconds  # fromisoformat without a fraction: no micros
    return whole_s * 10**9 + int(frac.ljust(9, "0") if frac else 0)


def read_azure_rows(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """First ``limit`` data rows -> (times [N] s from the earliest, prompt_lens [N],
    output_lens [N], sources)."""
    times, prompt_lens, output_lens, sources = [], [], [], []
    for where, row, col in csv_rows(path, COLUMNS, COLUMNS):
        if limit is not None and len(times) >= limit:
            break
        times.append(parse_timestamp_ns(row[col["TIMESTAMP"]], where))
        prompt_lens.append(parse_int(row[col["ContextTokens"]], where, "ContextTokens", 1))
        output_lens.append(parse_int(row[col["GeneratedTokens"]], where, "GeneratedTokens", 1))
        sources.append(where)
    times_ns = np.array(times, dtype=np.int64)  # [N] ns since epoch
    rel_s = (times_ns - times_ns.min()) / 1e9 if len(times) else np.zeros(0)  # [N] s, exact ints first
    return rel_s, np.array(prompt_lens, dtype=np.int64), np.array(output_lens, dtype=np.int64), sources


def azure(
    path: str,
    rate: float | str | None = None,  # null: the trace's timestamps; number: rescale; inf: all at 0
    limit: int | None = None,  # the first N rows of the file; null = all
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    name: str = "azure",
) -> list[Request]:
    """Load an Azure LLM inference 2023 CSV (code or conv). Source = "file.csv:line"."""
    vocab_size = check_vocab(vocab_size)
    file = resolve_trace_path(path)
    times, prompt_lens, output_lens, sources = read_azure_rows(file, limit)
    prompts = random_pieces(stream(seed, PROMPT_STREAM), prompt_lens, vocab_size)
    outputs = random_pieces(stream(seed, OUTPUT_STREAM), output_lens, vocab_size)
    return assemble(retime(times, rate), prompts, outputs, sources)
