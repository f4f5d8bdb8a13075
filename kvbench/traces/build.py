"""Turn per-request arrays into the ``list[Request]`` every trace returns."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvbench.request import Request
from kvbench.traces.errors import TraceError


def assemble(
    arrivals: np.ndarray,  # [N] float seconds
    prompts: Sequence[np.ndarray],  # N x [prompt_len] int32; may be lazy (built on indexing)
    outputs: Sequence[np.ndarray],  # N x [output_len >= 1] int32
    sources: Sequence[str],
    sessions: Sequence[int | None] | None = None,
    metas: Sequence[dict] | None = None,
) -> list[Request]:
    """Requests sorted by arrival (stable: ties keep input order), ids 0..N-1 in that order.

    Each prompts[i] is read once; Request copies prompt and output into one buffer, so a lazy
    ``prompts`` keeps the peak memory near one copy of all ids.
    """
    n = len(arrivals)
    if not (len(prompts) == len(outputs) == len(sources) == n):
        raise TraceError(f"internal: {n} arrivals, {len(prompts)} prompts, {len(outputs)} outputs")
    order = np.argsort(np.asarray(arrivals, dtype=np.float64), kind="stable")
    requests = []
    for new_id, i in enumerate(order.tolist()):
        prompt = prompts[i]
        if len(outputs[i]) < 1 or len(prompt) < 1:
            raise TraceError(f"{sources[i]}: empty prompt or output cannot be replayed")
        requests.append(Request(
            id=new_id,
            arrival_s=float(arrivals[i]),
            prompt=prompt,
            output=outputs[i],
            session=None if sessions is None else sessions[i],
            source=sources[i],
            meta={} if metas is None else metas[i],
        ))
    return requests
