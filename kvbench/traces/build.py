"""Turn per-request arrays into the ``list[Request]`` every trace returns."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np

from kvbench.request import Request
from kvbench.traces.common import over_long
from kvbench.traces.errors import TraceError
from kvbench.traces.tokens import OUTPUT_STREAM, PROMPT_STREAM, late_random_ids, random_pieces, stream

#: request index -> (prompt_len, output_len, build() -> [prompt_len + output_len] int32 ids)
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
            prompt_len, output_len, build = late[i]
            requests.append(Request.unbuilt(prompt_len=prompt_len, output_len=output_len, build=build, **common))
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

    Requests longer than max_model_len (which the scheduler rejects) are left unbuilt and draw
    nothing from the shared streams: the i-th built request's ids depend on the seed and the
    lengths of the built requests before it, so with no over-long request the ids are the same
    as with max_model_len=None.
    """
    prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
    output_lens = np.asarray(output_lens, dtype=np.int64)
    skip = over_long(prompt_lens, output_lens, max_model_len)  # [N] bool
    prompts = random_pieces(stream(seed, PROMPT_STREAM), np.where(skip, 0, prompt_lens), vocab_size)
    outputs = random_pieces(stream(seed, OUTPUT_STREAM), np.where(skip, 0, output_lens), vocab_size)
    late = {i: (int(prompt_lens[i]), int(output_lens[i]),
                partial(late_random_ids, seed, i, int(prompt_lens[i] + output_lens[i]), vocab_size))
            for i in np.flatnonzero(skip).tolist()}
    return assemble(arrivals, prompts, outputs, sources, metas=metas, late=late, limit=limit)
