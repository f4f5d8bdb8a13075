"""Turn per-request arrays into the ``list[Request]`` every trace returns."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np

from kvbench.request import Request
from kvbench.traces.common import longer_than
from kvbench.traces.errors import TraceError
from kvbench.traces.tokens import OUTPUT_STREAM, PROMPT_STREAM, RandomRows, late_ids, stream

#: request index -> (prompt_len, output_len, build() -> [prompt_len + output_len] int32 ids[, drawn])
Late = Mapping[int, tuple[int, int, Callable[[], np.ndarray]]]


def assemble(
    arrivals: np.ndarray,  # [N] float seconds
    prompts: Sequence[np.ndarray],  # N x [prompt_len] int32; may be lazy (built on indexing)
    outputs: Sequence[np.ndarray],  # N x [output_len >= 1] int32
    sources: Sequence[str],
    sessions: Sequence[int | None] | None = None,
    metas: Sequence[dict] | None = None,
    *,
    late: Late | None = None,  # requests made unbuilt (Request.unbuilt); their prompts/outputs unread
    limit: int | None = None,  # keep the first `limit` in arrival order; None = all
) -> list[Request]:
    """Requests sorted by arrival (stable: ties keep input order), ids 0..N-1 in that order.

    Each prompts[i] is read once, and only for the kept, built requests; Request copies prompt
    and output into one buffer, so a lazy ``prompts`` keeps the peak memory near one copy of
    all ids.
    """
    n = len(arrivals)
    if not (len(prompts) == len(outputs) == len(sources) == n):
        raise TraceError(f"internal: {n} arrivals, {len(prompts)} prompts, {len(outputs)} outputs")
    late = {} if late is None else late
    order = np.argsort(np.asarray(arrivals, dtype=np.float64), kind="stable")[:limit]
    requests = []
    for new_id, i in enumerate(order.tolist()):
        common = dict(id=new_id, arrival_s=float(arrivals[i]), source=sources[i],
                      session=None if sessions is None else sessions[i],
                      meta={} if metas is None else metas[i])
        if i in late:
            prompt_len, output_len, build, *drawn = late[i]
            requests.append(Request.unbuilt(prompt_len=prompt_len, output_len=output_len, build=build,
                                            drawn=bool(drawn and drawn[0]), **common))
            continue
        prompt = prompts[i]
        if len(outputs[i]) < 1 or len(prompt) < 1:
            raise TraceError(f"{sources[i]}: row: empty prompt or output cannot be replayed")
        requests.append(Request(prompt=prompt, output=outputs[i], **common))
    return requests


def random_id_requests(
    arrivals: np.ndarray,  # [N] float seconds
    prompt_lens: np.ndarray,  # [N] ints >= 1
    output_lens: np.ndarray,  # [N] ints >= 1
    sources: Sequence[str],
    seed: int,
    vocab_size: int,
    max_model_len: int | None,
    metas: Sequence[dict] | None = None,
    limit: int | None = None,
) -> list[Request]:
    """Requests whose prompt and output ids are seeded random draws (no shared prefixes).

    A request whose prompt or output alone is longer than max_model_len (the scheduler rejects
    it) is left unbuilt; that side draws nothing from its shared stream (it is drawn from the
    request's own stream if ever read). So the ids of every request are those of
    max_model_len=None unless an earlier prompt (for prompts) or output (for outputs) exceeds it.
    """
    prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
    output_lens = np.asarray(output_lens, dtype=np.int64)
    long_p, long_o = longer_than(prompt_lens, max_model_len), longer_than(output_lens, max_model_len)  # [N]
    prompts = RandomRows(stream(seed, PROMPT_STREAM), np.where(long_p, 0, prompt_lens), vocab_size)
    outputs = RandomRows(stream(seed, OUTPUT_STREAM), np.where(long_o, 0, output_lens), vocab_size)
    rows = _LazyRows(prompts, outputs, prompt_lens, output_lens, long_p, long_o, seed, vocab_size)
    return assemble(arrivals, prompts, outputs, sources, metas=metas, late=rows, limit=limit)


class _LazyRows:
    """Every row of `random_id_requests` as a `Late` entry: the request is made unbuilt, and its
    ids are drawn again from `RandomRows` when read (the ids an eager draw gives, bit for bit);
    a row longer than max_model_len draws its long side from its own stream (`late_ids`)."""

    def __init__(self, prompts, outputs, prompt_lens, output_lens, long_p, long_o, seed, vocab_size):
        self.prompts, self.outputs = prompts, outputs
        self.prompt_lens, self.output_lens = prompt_lens.tolist(), output_lens.tolist()
        self.long = set(np.flatnonzero(long_p | long_o).tolist())
        self.long_p, self.long_o, self.seed, self.vocab_size = long_p, long_o, seed, vocab_size

    def __contains__(self, i: int) -> bool:
        return True

    def __getitem__(self, i: int) -> tuple[int, int, Callable[[], np.ndarray], bool]:
        p, o = self.prompt_lens[i], self.output_lens[i]
        if i in self.long:
            return p, o, partial(self._late, i), False
        return p, o, partial(self._ids, i), True  # drawn: fixed by the shared streams

    def _ids(self, i: int) -> np.ndarray:
        return np.concatenate([self.prompts[i], self.outputs[i]])

    def _late(self, i: int) -> np.ndarray:
        return late_ids(self.seed, i, self.vocab_size, self.prompt_lens[i], self.output_lens[i],
                        None if self.long_p[i] else self.prompts[i].copy(),
                        None if self.long_o[i] else self.outputs[i].copy())
