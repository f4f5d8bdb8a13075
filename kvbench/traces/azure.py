"""Azure LLM inference trace 2023 (Splitwise): ``TIMESTAMP,ContextTokens,GeneratedTokens``.

No prefix information: every prompt gets its own random ids (seeded), so no two requests share
a prefix beyond chance. TIMESTAMP is ``YYYY-MM-DD HH:MM:SS.fffffff`` (7 fractional digits,
which ``datetime.fromisoformat`` rejects), parsed exactly here, to the nanosecond. A date
without a time of day is rejected (it would read as midnight and insert hours of idle time);
a UTC offset (``Z``, ``+01:00``) is accepted only if every row has one.
"""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import numpy as np

from kvbench.request import Request
from kvbench.traces.arrivals import parse_rate, retime
from kvbench.traces.build import random_id_requests
from kvbench.traces.common import MAX_ARRIVAL_S, check_limit, check_max_model_len
from kvbench.traces.errors import TraceError, row_error
from kvbench.traces.fields import at, csv_rows, parse_int
from kvbench.traces.paths import resolve_trace_path
from kvbench.traces.tokens import DEFAULT_VOCAB, check_vocab

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_TIME = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})[ T]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?"
                   r"(Z|[+-][0-9]{2}:[0-9]{2})?")
_EPOCH = datetime(1970, 1, 1)
_MAX_SPAN_NS = int(MAX_ARRIVAL_S) * 10**9


def parse_timestamp_ns(text: str, where: str, field: str = "TIMESTAMP") -> tuple[int, bool]:
    """'2023-11-16 18:17:03.9799600' -> (integer ns since 1970-01-01, whether it had a UTC offset).

    Integers, not float seconds: a float64 near 1.7e9 s resolves only ~240 ns, coarser than the
    trace's 100 ns digits. The caller subtracts the first time before converting to seconds.
    """
    m = _TIME.fullmatch(text.strip())
    try:
        if m is None:
            raise ValueError
        base = datetime.fromisoformat(f"{m[1]} {m[2]}")  # checks month, day, hour ranges
    except ValueError:
        raise row_error(where, field, "a time 'YYYY-MM-DD HH:MM:SS[.fffffff]'", text) from None
    offset_s = 0
    if m[4] and m[4] != "Z":
        hours, minutes = int(m[4][1:3]), int(m[4][4:6])
        offset_s = (1 if m[4][0] == "+" else -1) * (hours * 3600 + minutes * 60)
    delta = base - _EPOCH
    whole_s = delta.days * 86400 + delta.seconds - offset_s  # UTC when an offset is given
    return whole_s * 10**9 + int((m[3] or "0").ljust(9, "0")), m[4] is not None


_ROWS: dict[tuple, tuple] = {}  # (file, inode, size, mtime, ctime, limit) -> the rows parsed: the last few
_MAX_ROWS = 4


def read_azure_rows(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """First ``limit`` data rows -> (times [N] s from the earliest, prompt_lens [N],
    output_lens [N], sources). Fresh copies every call: the rows parsed are kept per process
    for the same file (path, inode, size, mtime, ctime) and limit, so a sweep's runs at other
    rates parse the file once (issue 13 §5); a file that fails to parse is not kept."""
    try:
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, limit)
    except OSError:
        key = None
    kept = _ROWS.get(key) if key is not None else None
    if kept is None:
        kept = _parse_azure_rows(path, limit)
        if key is not None:
            if len(_ROWS) >= _MAX_ROWS:
                _ROWS.clear()
            _ROWS[key] = kept
    times, prompt_lens, output_lens, sources = kept
    return times.copy(), prompt_lens.copy(), output_lens.copy(), list(sources)


def _parse_azure_rows(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    times, zoned, prompt_lens, output_lens, lines = [], [], [], [], []
    rows = csv_rows(path, COLUMNS, COLUMNS) if limit != 0 else iter(())
    for line, row, col in rows:
        where = at(path, line)
        t_ns, has_offset = parse_timestamp_ns(row[col["TIMESTAMP"]], where)
        if zoned and has_offset != zoned[0]:
            raise TraceError(f"{where}: TIMESTAMP: {'has' if has_offset else 'lacks'} a UTC offset "
                             f"unlike line {lines[0]}: ambiguous; give every row an offset or none")
        times.append(t_ns)
        zoned.append(has_offset)
        prompt_lens.append(parse_int(row[col["ContextTokens"]], where, "ContextTokens", 1))
        output_lens.append(parse_int(row[col["GeneratedTokens"]], where, "GeneratedTokens", 1))
        lines.append(line)
        if limit is not None and len(times) >= limit:
            break
    rel_ns = _relative_ns(path, times, lines)  # [N] ns from the earliest, exact
    return (rel_ns / 1e9, np.array(prompt_lens, dtype=np.int64), np.array(output_lens, dtype=np.int64),
            [f"{path.name}:{line}" for line in lines])


def _relative_ns(path: Path, times_ns: list[int], lines: list[int]) -> np.ndarray:
    """[N] int64 ns after the earliest time. A trace spanning 2**32 s or more is an error at the
    extreme row farther from the median time (the outlier)."""
    if not times_ns:
        return np.zeros(0, dtype=np.int64)
    order = sorted(range(len(times_ns)), key=times_ns.__getitem__)
    lo, hi = times_ns[order[0]], times_ns[order[-1]]
    if hi - lo >= _MAX_SPAN_NS:
        median = times_ns[order[len(order) // 2]]
        bad, other = (order[0], order[-1]) if median - lo > hi - median else (order[-1], order[0])
        raise TraceError(f"{at(path, lines[bad])}: TIMESTAMP: {(hi - lo) / 1e9:.4g} s from line "
                         f"{lines[other]}; a trace must span less than 2**32 s (136 years)")
    return np.array([t - lo for t in times_ns], dtype=np.int64)  # exact Python ints first


def azure(
    path: str,
    rate: float | str | None = None,  # null: the trace's timestamps; number: rescale; inf: all at 0
    limit: int | None = None,  # the first N rows of the file; null = all
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    max_model_len: int | None = None,  # longer requests are left unbuilt (the scheduler rejects them)
    name: str = "azure",
) -> list[Request]:
    """Load an Azure LLM inference 2023 CSV (code or conv). Source = "file.csv:line"."""
    vocab_size, limit = check_vocab(vocab_size), check_limit(limit)
    max_model_len = check_max_model_len(max_model_len)
    parse_rate(rate)
    file = resolve_trace_path(path)
    times, prompt_lens, output_lens, sources = read_azure_rows(file, limit)
    return random_id_requests(retime(times, rate), prompt_lens, output_lens, sources, seed,
                              vocab_size, max_model_len)
