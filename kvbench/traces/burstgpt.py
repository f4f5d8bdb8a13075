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
from kvbench.traces.arrivals import retime
from kvbench.traces.build import assemble
from kvbench.traces.fields import csv_rows, parse_int, parse_seconds
from kvbench.traces.paths import resolve_trace_path
from kvbench.traces.tokens import (DEFAULT_VOCAB, OUTPUT_STREAM, PROMPT_STREAM, check_vocab,
                                   random_pieces, stream)

log = logging.getLogger(__name__)

COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")
USED = ("Timestamp", "Model", "Request tokens", "Response tokens", "Log Type")


def read_burstgpt_rows(path: Path, limit: int | None, keep_failed: bool,
                       model: str | None, log_type: str | None):
    """First ``limit`` kept rows -> (times [N] s, prompt_lens [N], output_lens [N], sources,
    metas, skipped failed row count)."""
    times, prompt_lens, output_lens, sources, metas = [], [], [], [], []
    failed_skipped = 0
    for where, row, col in csv_rows(path, USED, COLUMNS):
        if limit is not None and len(times) >= limit:
            break
        if model is not None and row[col["Model"]].strip() != model:
            continue
        if log_type is not None and row[col["Log Type"]].strip() != log_type:
            continue
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
        sources.append(where)
        metas.append({"model": row[col["Model"]].strip(), "failed": failed})
    return (np.array(times), np.array(prompt_lens, dtype=np.int64),
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
    name: str = "burstgpt",
) -> list[Request]:
    """Load a BurstGPT CSV. meta = {"model", "failed"}; source = "file.csv:line"."""
    vocab_size = check_vocab(vocab_size)
    file = resolve_trace_path(path)
    times, prompt_lens, output_lens, sources, metas, skipped = read_burstgpt_rows(
        file, limit, keep_failed, model, log_type)
    if skipped:
        log.warning("%s: skipped %d failed request(s) (Response tokens == 0) in %s; "
                    "set keep_failed=true to replay them with 1 output token", name, skipped, file)
    prompts = random_pieces(stream(seed, PROMPT_STREAM), prompt_lens, vocab_size)
    outputs = random_pieces(stream(seed, OUTPUT_STREAM), output_lens, vocab_size)
    return assemble(retime(times, rate), prompts, outputs, sources, metas=metas)
