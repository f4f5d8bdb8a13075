"""Mooncake (FAST'25) JSONL: ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``.

Prefix sharing is real: hash id h becomes the 512 ids ``hashed_blocks(seed, h)``, the same in
every request, so equal hash_ids are equal blocks and a shared leading run is a shared prefix.

    prompt = block[h0] ++ block[h1] ++ ... ++ block[h_{n-1}][:input_length - 512*(n-1)]

Memory: each distinct block is built once ([U, 512] int32); each prompt is gathered from that
table only when its Request is built (a lazy sequence), so the peak is the table plus one copy
of all ids, not two.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kvbench.request import Request
from kvbench.traces.arrivals import retime
from kvbench.traces.build import assemble
from kvbench.traces.errors import TraceError, row_error
from kvbench.traces.fields import json_int, json_number
from kvbench.traces.paths import resolve_trace_path
from kvbench.traces.tokens import (DEFAULT_VOCAB, OUTPUT_STREAM, check_vocab, hashed_blocks,
                                   random_pieces, stream)

BLOCK = 512  # tokens per hash id, fixed by the trace format


def _hash_ids(obj: dict, where: str, input_length: int) -> list[int]:
    ids = obj.get("hash_ids", "<missing>")
    ok = isinstance(ids, list) and all(type(h) is int and h >= 0 for h in ids)  # no bools/floats
    if not ok:
        raise row_error(where, "hash_ids", "a list of integers >= 0", ids[:8] if isinstance(ids, list) else ids)
    want = math.ceil(input_length / BLOCK)
    if len(ids) != want:
        raise TraceError(f"{where}: field 'hash_ids': expected ceil(input_length/{BLOCK}) = {want} "
                         f"ids for input_length {input_length}, got {len(ids)}")
    return ids


def read_mooncake_rows(path: Path, limit: int | None):
    """First ``limit`` rows -> (times [N] s, input_lens [N], output_lens [N], hash_ids, sources)."""
    times, input_lens, output_lens, hash_ids, sources = [], [], [], [], []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(times) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not valid JSON ({e.msg}; column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            times.append(json_number(obj, where, "timestamp") / 1000.0)  # ms -> s
            input_lens.append(json_int(obj, where, "input_length", 1))
            output_lens.append(json_int(obj, where, "output_length", 1))
            hash_ids.append(_hash_ids(obj, where, input_lens[-1]))
            sources.append(where)
    return (np.array(times), np.array(input_lens, dtype=np.int64),
            np.array(output_lens, dtype=np.int64), hash_ids, sources)


class _BlockPrompts:
    """prompts[i] = table[rows of request i] flattened, cut to input_length; built on access."""

    def __init__(self, table: np.ndarray, rows: np.ndarray, bounds: np.ndarray, lengths: np.ndarray):
        self.table = table  # [U, 512] int32
        self.rows = rows  # [total blocks] row of each block reference
        self.bounds = bounds  # [N + 1] request i's references are rows[bounds[i]:bounds[i+1]]
        self.lengths = lengths  # [N] input lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        blocks = self.table[self.rows[self.bounds[i]:self.bounds[i + 1]]]  # [n_i, 512]
        return blocks.reshape(-1)[:self.lengths[i]]  # [input_length]


def mooncake(
    path: str,
    rate: float | str | None = None,  # null: the trace's timestamps; number: rescale; inf: all at 0
    limit: int | None = None,  # the first N rows of the file; null = all
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    name: str = "mooncake",
) -> list[Request]:
    """Load a Mooncake JSONL trace. meta = {"hash_ids": [...]}; source = "file.jsonl:line"."""
    vocab_size = check_vocab(vocab_size)
    file = resolve_trace_path(path)
    times, input_lens, output_lens, hash_ids, sources = read_mooncake_rows(file, limit)
    flat = np.fromiter((h for ids in hash_ids for h in ids), dtype=np.int64,
                       count=sum(len(ids) for ids in hash_ids))  # [total blocks]
    keys, rows = np.unique(flat, return_inverse=True)  # keys: [U] distinct ids; rows: [total]
    table = hashed_blocks(seed, keys, BLOCK, vocab_size)  # [U, 512] int32
    bounds = np.cumsum([0] + [len(ids) for ids in hash_ids])
    prompts = _BlockPrompts(table, rows, bounds, input_lens)
    outputs = random_pieces(stream(seed, OUTPUT_STREAM), output_lens, vocab_size)
    metas = [{"hash_ids": ids} for ids in hash_ids]
    return assemble(retime(times, rate), prompts, outputs, sources, metas=metas)
