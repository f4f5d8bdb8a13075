"""Independent requests: renewal-process arrivals, random prompt and output lengths."""
from __future__ import annotations

from kvbench.request import Request
from kvbench.traces.arrivals import arrival_times
from kvbench.traces.build import random_id_requests
from kvbench.traces.common import check_limit, check_max_model_len
from kvbench.traces.lengths import LengthDist, LogNormal, as_dist
from kvbench.traces.tokens import DEFAULT_VOCAB, OTHER_STREAM, check_vocab, stream


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
) -> list[Request]:
    """``num_requests`` unrelated requests (no shared prefixes beyond chance), source "name:i"."""
    vocab_size, limit = check_vocab(vocab_size), check_limit(limit)
    max_model_len = check_max_model_len(max_model_len)
    other = stream(seed, OTHER_STREAM)
    times = arrival_times(other, num_requests, rate, burstiness)  # [N] s
    prompt_lens = as_dist(prompt_len).sample(other, num_requests)  # [N]
    output_lens = as_dist(output_len).sample(other, num_requests)  # [N]
    sources = [f"{name}:{i}" for i in range(num_requests)]
    return random_id_requests(times, prompt_lens, output_lens, sources, seed, vocab_size,
                              max_model_len, limit=limit)
