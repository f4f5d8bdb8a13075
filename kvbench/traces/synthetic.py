"""Independent requests: renewal-process arrivals, random prompt and output lengths."""
from __future__ import annotations

from kvbench.request import Request
from kvbench.traces.arrivals import arrival_times
from kvbench.traces.build import assemble
from kvbench.traces.lengths import LengthDist, LogNormal, as_dist
from kvbench.traces.tokens import (DEFAULT_VOCAB, OTHER_STREAM, OUTPUT_STREAM, PROMPT_STREAM,
                                   check_vocab, random_pieces, stream)


def synthetic(
    num_requests: int = 500,
    rate: float | str = 8.0,  # req/s; inf = all at t=0
    burstiness: float = 1.0,  # gamma shape of the gaps; 1.0 = Poisson
    prompt_len: LengthDist | int = LogNormal(mean=512, sigma=0.8, min=16, max=4096),
    output_len: LengthDist | int = LogNormal(mean=128, sigma=0.8, min=4, max=1024),
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    name: str = "synthetic",
) -> list[Request]:
    """``num_requests`` unrelated requests (no shared prefixes beyond chance), source "name:i"."""
    vocab_size = check_vocab(vocab_size)
    other = stream(seed, OTHER_STREAM)
    times = arrival_times(other, num_requests, rate, burstiness)  # [N] s
    prompt_lens = as_dist(prompt_len).sample(other, num_requests)  # [N]
    output_lens = as_dist(output_len).sample(other, num_requests)  # [N]
    prompts = random_pieces(stream(seed, PROMPT_STREAM), prompt_lens, vocab_size)
    outputs = random_pieces(stream(seed, OUTPUT_STREAM), output_lens, vocab_size)
    sources = [f"{name}:{i}" for i in range(num_requests)]
    return assemble(times, prompts, outputs, sources)
