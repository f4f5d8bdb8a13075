"""Independent requests: renewal-process arrivals, random prompt and output lengths.

The trace is a `LazyTrace`: arrival times and lengths are [N] arrays, the ids a generator state
every 512 rows (`RandomRows`), and a `Request` is made when its row is read. Memory: about 40
bytes per request, so 10^7 requests take ~0.4 GB, not 10^7 Python objects.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from kvbench.request import Request
from kvbench.traces.arrivals import arrival_times
from kvbench.traces.common import LazyTrace, check_limit, check_max_model_len, longer_than
from kvbench.traces.lengths import LengthDist, LogNormal, as_dist
from kvbench.traces.tokens import (DEFAULT_VOCAB, OTHER_STREAM, OUTPUT_STREAM, PROMPT_STREAM, RandomRows,
                                   check_vocab, late_ids, stream)


def synthetic(
    num_requests: int = 500,
    rate: float | str = 8.0,  # req/s; inf = all at t=0
    burstiness: float = 1.0,  # gamma shape of the gaps; 1.0 = Poisson
    prompt_len: LengthDist | int = LogNormal(mean=512, sigma=0.8, min=16, max=4096),
    output_len: LengthDist | int = LogNormal(mean=128, sigma=0.8, min=4, max=1024),
    limit: int | None = None,  # keep the first N in arrival order; null = all
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    max_model_len: int | None = None,  # longer requests are left unbuilt (the scheduler rejects them)
    name: str = "synthetic",
) -> LazyTrace:
    """``num_requests`` unrelated requests (no shared prefixes beyond chance), source "name:i",
    ids 0..N-1 in arrival order (ties keep row order)."""
    vocab_size, limit = check_vocab(vocab_size), check_limit(limit)
    max_model_len = check_max_model_len(max_model_len)
    other = stream(seed, OTHER_STREAM)
    times = arrival_times(other, num_requests, rate, burstiness)  # [N] s
    prompt_lens = np.asarray(as_dist(prompt_len).sample(other, num_requests), dtype=np.int64)  # [N]
    output_lens = np.asarray(as_dist(output_len).sample(other, num_requests), dtype=np.int64)  # [N]
    rows = _Rows(np.asarray(times, dtype=np.float64), prompt_lens, output_lens, name, seed, vocab_size,
                 max_model_len)
    return LazyTrace(len(rows.order[:limit]), rows.request)


class _Rows:
    """The requests of one synthetic trace as columns; `request(i)` makes the i-th in arrival order.

    Ids are those `kvbench.traces.build.random_id_requests` draws, bit for bit: a row whose
    prompt or output alone is longer than max_model_len draws nothing from the shared streams
    and is made unbuilt (drawn from its own stream if ever read); every other row is `drawn`
    (fixed by the shared streams, drawn again from `RandomRows` when read)."""

    def __init__(self, times, prompt_lens, output_lens, name, seed, vocab_size, max_model_len) -> None:
        self.times, self.prompt_lens, self.output_lens = times, prompt_lens, output_lens  # [N] each
        self.long_p = longer_than(prompt_lens, max_model_len)  # [N] bool
        self.long_o = longer_than(output_lens, max_model_len)
        self.name, self.seed, self.vocab_size = name, seed, vocab_size
        self.prompts = RandomRows(stream(seed, PROMPT_STREAM), np.where(self.long_p, 0, prompt_lens), vocab_size)
        self.outputs = RandomRows(stream(seed, OUTPUT_STREAM), np.where(self.long_o, 0, output_lens), vocab_size)
        self.order = np.argsort(times, kind="stable")  # [N] row of each id (a renewal process: 0..N-1)

    def request(self, new_id: int) -> Request:
        i = int(self.order[new_id])
        long = bool(self.long_p[i] or self.long_o[i])
        return Request.unbuilt(id=new_id, arrival_s=float(self.times[i]), prompt_len=int(self.prompt_lens[i]),
                               output_len=int(self.output_lens[i]),
                               build=partial(self._late if long else self._ids, i),
                               session=None, source=f"{self.name}:{i}", meta={}, drawn=not long)

    def _ids(self, i: int) -> np.ndarray:
        return np.concatenate([self.prompts[i], self.outputs[i]])

    def _late(self, i: int) -> np.ndarray:
        return late_ids(self.seed, i, self.vocab_size, int(self.prompt_lens[i]), int(self.output_lens[i]),
                        None if self.long_p[i] else self.prompts[i].copy(),
                        None if self.long_o[i] else self.outputs[i].copy())
