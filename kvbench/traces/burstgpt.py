"""BurstGPT CSV: ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``.

Timestamps are seconds from the trace start. In BurstGPT a row with ``Response tokens == 0`` is
a failed request. By default failed rows are skipped (and counted in a log message); with
``keep_failed=True`` they are replayed with a 1-token output (their prefill did happen) and
``meta["failed"] = True``. No prefix information: prompts get their own seeded random ids.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kvbench.request import Request
from kvbench.traces.arrivals import parse_rate, retime
from kvbench.traces.build import random_id_requests
from kvbench.traces.common import check_limit, check_max_model_len
from kvbench.traces.fields import at, csv_rows, parse_int, parse_seconds
from kvbench.traces.paths import resolve_trace_path
from kvbench.traces.tokens import DEFAULT_VOCAB, check_vocab

log = logging.getLogger(__name__)

COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")
USED = ("Timestamp", "Model", "Request tokens", "Response tokens", "Log Type")


def read_burstgpt_rows(path: Path, limit: int | None, keep_failed: bool,
                       model: str | None, log_type: str | None):
    """First ``limit`` kept rows -> (times [N] s, prompt_lens [N], output_lens [N], sources,
    metas, skipped failed row count)."""
    times, prompt_lens, output_lens, sources, metas = [], [], [], [], []
    failed_skipped = 0
    rows = csv_rows(path, USED, COLUMNS) if limit != 0 else iter(())
    for line, row, col in rows:
        if model is not None and row[col["Model"]].strip() != model:
            continue
        if log_type is not None and row[col["Log Type"]].strip() != log_type:
            continue
        where = at(path, line)
        t = parse_seconds(row[col["Timestamp"]], where, "Timestamp")
        prompt_len = parse_int(row[col["Request tokens"]], where, "Request tokens", 1)
        output_len = parse_int(row[col["Response tokens"]], where, "Response tokens", 0)
        failed = output_len == 0
        if failed and not keep_failed:
            failed_skipped += 1
            continue
        times.append(t)
        prompt_lens.append(prompt_len)
        output_lens.append(max(output_len, 1))
        sources.append(f"{path.name}:{line}")
        metas.append({"model": row[col["Model"]].strip(), "failed": failed})
        if limit is not None and len(times) >= limit:
            break
    return (np.array(times, dtype=np.float64), np.array(prompt_lens, dtype=np.int64),
            np.array(output_lens, dtype=np.int64), sources, metas, failed_skipped)


def burstgpt(
    path: str,
    rate: float | str | None = None,  # null: the trace's timestamps; number: rescale; inf: all at 0
    limit: int | None = None,  # the first N kept rows (after filters); null = all
    keep_failed: bool = False,  # replay 0-token responses as 1-token outputs instead of skipping
    model: str | None = None,  # keep only this Model (e.g. "ChatGPT", "GPT-4"); null = all
    log_type: str | None = None,  # keep only this Log Type (e.g. "Conversation log"); null = all
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    max_model_len: int | None = None,  # longer requests are left unbuilt (the scheduler rejects them)
    name: str = "burstgpt",
) -> list[Request]:
    """Load a BurstGPT CSV. meta = {"model", "failed"}; source = "file.csv:line"."""
    vocab_size, limit = check_vocab(vocab_size), check_limit(limit)
    max_model_len = check_max_model_len(max_model_len)
    parse_rate(rate)
    file = resolve_trace_path(path)
    times, prompt_lens, output_lens, sources, metas, skipped = read_burstgpt_rows(
        file, limit, keep_failed, model, log_type)
    if skipped:
        log.warning("%s: skipped %d failed request(s) (Response tokens == 0) in %s; "
                    "set keep_failed=true to replay them with 1 output token", name, skipped, file)
    return random_id_requests(retime(times, rate), prompt_lens, output_lens, sources, seed,
                              vocab_size, max_model_len, metas=metas)
