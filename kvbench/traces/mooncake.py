"""Mooncake (FAST'25) JSONL: ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``.

Prefix sharing is real: hash id h becomes the 512 ids ``hashed_blocks(seed, h)``, the same in
every request, so equal hash_ids are equal blocks and a shared leading run is a shared prefix.

    prompt = block[h0] ++ block[h1] ++ ... ++ block[h_{n-1}][:input_length - 512*(n-1)]

Memory: each distinct block is built once ([U, 512] int32); each prompt is gathered from that
table only when its Request is built (a lazy sequence), so the peak is the table plus one copy
of all ids, not two.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from kvbench.request import Request
from kvbench.traces.arrivals import parse_rate, retime
from kvbench.traces.build import assemble
from kvbench.traces.common import MAX_ARRIVAL_S, check_limit, check_max_model_len, longer_than
from kvbench.traces.errors import TraceError, row_error
from kvbench.traces.fields import at, json_int, json_number, jsonl_objects
from kvbench.traces.paths import resolve_trace_path
from kvbench.traces.tokens import (DEFAULT_VOCAB, OUTPUT_STREAM, check_vocab, hashed_blocks,
                                   late_ids, random_pieces, stream)

BLOCK = 512  # tokens per hash id, fixed by the trace format
MAX_HASH_ID = 2**63 - 1  # ids are kept as int64


def _hash_ids(obj: dict, where: str, input_length: int) -> list[int]:
    """The row's hash ids: a list of ceil(input_length / 512) integers in [0, 2**63)."""
    if "hash_ids" not in obj:
        raise TraceError(f"{where}: hash_ids: expected a list of integers, got no such key")
    ids = obj["hash_ids"]
    if not isinstance(ids, list):
        raise row_error(where, "hash_ids", "a list of integers", ids)
    want = -(-input_length // BLOCK)
    if len(ids) != want:  # checked first: bounds the work on the elements
        raise TraceError(f"{where}: hash_ids: expected ceil(input_length/{BLOCK}) = {want} "
                         f"ids for input_length {input_length}, got {len(ids)}")
    for h in ids:
        if type(h) is not int or not 0 <= h <= MAX_HASH_ID:  # no bools, no floats
            raise row_error(where, "hash_ids", "integers in [0, 2**63 - 1]", h)
    return ids


def read_mooncake_rows(path: Path, limit: int | None):
    """First ``limit`` rows -> (times [N] s, input_lens [N], output_lens [N], hash_ids, sources)."""
    times, input_lens, output_lens, hash_ids, sources = [], [], [], [], []
    rows = jsonl_objects(path) if limit != 0 else iter(())
    for line, obj in rows:
        where = at(path, line)
        times.append(json_number(obj, where, "timestamp", MAX_ARRIVAL_S * 1000) / 1000.0)  # ms -> s
        input_lens.append(json_int(obj, where, "input_length", 1))
        output_lens.append(json_int(obj, where, "output_length", 1))
        hash_ids.append(_hash_ids(obj, where, input_lens[-1]))
        sources.append(f"{path.name}:{line}")
        if limit is not None and len(times) >= limit:
            break
    return (np.array(times, dtype=np.float64), np.array(input_lens, dtype=np.int64),
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


def _block_prompt(seed: int, hash_ids: tuple[int, ...], input_length: int, vocab_size: int) -> np.ndarray:
    """[input_length] ids of one prompt from its blocks: the same as the table would give."""
    blocks = hashed_blocks(seed, np.array(hash_ids, dtype=np.int64), BLOCK, vocab_size)  # [n, 512]
    return blocks.reshape(-1)[:input_length]


def _late_ids(seed: int, row: int, hash_ids: tuple[int, ...], input_length: int, output_length: int,
              vocab_size: int, output: np.ndarray | None) -> np.ndarray:
    """[input_length + output_length] ids of an unbuilt request: its blocks ++ its output."""
    prompt = _block_prompt(seed, hash_ids, input_length, vocab_size)
    return late_ids(seed, row, vocab_size, input_length, output_length, prompt, output)


def mooncake(
    path: str,
    rate: float | str | None = None,  # null: the trace's timestamps; number: rescale; inf: all at 0
    limit: int | None = None,  # the first N rows of the file; null = all
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    max_model_len: int | None = None,  # longer requests are left unbuilt (the scheduler rejects them)
    name: str = "mooncake",
) -> list[Request]:
    """Load a Mooncake JSONL trace. meta = {"hash_ids": [...]}; source = "file.jsonl:line"."""
    vocab_size, limit = check_vocab(vocab_size), check_limit(limit)
    max_model_len = check_max_model_len(max_model_len)
    parse_rate(rate)
    file = resolve_trace_path(path)
    times, input_lens, output_lens, hash_ids, sources = read_mooncake_rows(file, limit)
    long_p, long_o = longer_than(input_lens, max_model_len), longer_than(output_lens, max_model_len)  # [N]
    counts = [0 if skip else len(ids) for skip, ids in zip(long_p.tolist(), hash_ids)]
    flat = np.fromiter((h for skip, ids in zip(long_p.tolist(), hash_ids) if not skip for h in ids),
                       dtype=np.int64, count=sum(counts))  # [total blocks]
    keys, rows = np.unique(flat, return_inverse=True)  # keys: [U] distinct ids; rows: [total]
    table = hashed_blocks(seed, keys, BLOCK, vocab_size)  # [U, 512] int32
    bounds = np.cumsum([0] + counts)
    prompts = _BlockPrompts(table, rows, bounds, input_lens)
    outputs = random_pieces(stream(seed, OUTPUT_STREAM), np.where(long_o, 0, output_lens), vocab_size)
    late = {i: (int(input_lens[i]), int(output_lens[i]),
                partial(_late_ids, seed, i, tuple(hash_ids[i]), int(input_lens[i]), int(output_lens[i]),
                        vocab_size, None if long_o[i] else outputs[i].copy()))
            for i in np.flatnonzero(long_p | long_o).tolist()}
    metas = [{"hash_ids": ids} for ids in hash_ids]
    return assemble(retime(times, rate), prompts, outputs, sources, metas=metas, late=late)
