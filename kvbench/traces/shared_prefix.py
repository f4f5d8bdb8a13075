"""Shared system prompts (SGLang ``generated-shared-prefix`` style).

k groups x n questions: request = system_prompt[group] ++ question. Requests of all groups are
shuffled together, then given arrival times, so groups interleave as in SGLang's bench.
"""
from __future__ import annotations

import numpy as np

from kvbench.request import Request
from kvbench.traces.arrivals import arrival_times
from kvbench.traces.build import assemble
from kvbench.traces.common import check_limit, check_max_model_len
from kvbench.traces.lengths import Fixed, LengthDist, LogNormal, as_dist
from kvbench.traces.tokens import (DEFAULT_VOCAB, OTHER_STREAM, OUTPUT_STREAM, PROMPT_STREAM,
                                   check_vocab, random_pieces, stream)


def shared_prefix(
    num_groups: int = 16,
    questions_per_group: int = 32,
    system_len: LengthDist | int = Fixed(1024),
    question_len: LengthDist | int = LogNormal(mean=128, sigma=0.5, min=8, max=1024),
    output_len: LengthDist | int = LogNormal(mean=128, sigma=0.8, min=4, max=1024),
    rate: float | str = 16.0,  # req/s; inf = all at t=0
    burstiness: float = 1.0,
    limit: int | None = None,  # keep the first N in arrival order; null = all
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    max_model_len: int | None = None,  # checked only: every request is built (lengths are bounded)
    name: str = "shared_prefix",
) -> list[Request]:
    """meta = {"group": g, "question": q, "system_len": len(system prompt of g)}."""
    vocab_size, limit = check_vocab(vocab_size), check_limit(limit)
    check_max_model_len(max_model_len)
    n = num_groups * questions_per_group
    other = stream(seed, OTHER_STREAM)
    prompt_rng = stream(seed, PROMPT_STREAM)
    system_lens = as_dist(system_len).sample(other, num_groups)  # [k]
    question_lens = as_dist(question_len).sample(other, n)  # [k*n], group-major
    output_lens = as_dist(output_len).sample(other, n)  # [k*n]
    systems = random_pieces(prompt_rng, system_lens, vocab_size)  # k x [system_len]
    questions = random_pieces(prompt_rng, question_lens, vocab_size)  # k*n x [question_len]
    outputs = random_pieces(stream(seed, OUTPUT_STREAM), output_lens, vocab_size)

    order = other.permutation(n)  # interleave the groups
    times = arrival_times(other, n, rate, burstiness)  # [k*n] s, the j-th goes to order[j]
    prompts, outs, sources, metas = [], [], [], []
    for j in order.tolist():
        g, q = divmod(j, questions_per_group)
        prompts.append(np.concatenate([systems[g], questions[j]]))
        outs.append(outputs[j])
        sources.append(f"{name}:g{g}q{q}")
        metas.append({"group": g, "question": q, "system_len": int(system_lens[g])})
    return assemble(times, prompts, outs, sources, metas=metas, limit=limit)
