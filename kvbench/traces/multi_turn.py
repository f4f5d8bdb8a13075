"""Multi-turn chats: each turn's prompt is the whole history plus a new user message.

    turn 0 prompt:  u0
    turn 1 prompt:  u0 a0 u1          (a0 = turn 0's output ids)
    turn 2 prompt:  u0 a0 u1 a1 u2

Chats start at ``rate`` chats/s (Poisson or gamma); turn k+1 arrives a think time (exponential,
mean ``think_time_s``) after turn k's *arrival* — a trace cannot know when a replay finishes it.
"""
from __future__ import annotations

import numpy as np

from kvbench.request import Request
from kvbench.traces.arrivals import arrival_times
from kvbench.traces.build import assemble
from kvbench.traces.common import check_limit, check_max_model_len
from kvbench.traces.errors import TraceError
from kvbench.traces.lengths import LengthDist, LogNormal, Uniform, as_dist
from kvbench.traces.tokens import (DEFAULT_VOCAB, OTHER_STREAM, OUTPUT_STREAM, PROMPT_STREAM,
                                   check_vocab, stream)


def multi_turn(
    num_chats: int = 64,
    turns: LengthDist | int = Uniform(min=2, max=8),  # turns per chat
    user_len: LengthDist | int = LogNormal(mean=128, sigma=0.7, min=8, max=2048),
    output_len: LengthDist | int = LogNormal(mean=192, sigma=0.7, min=4, max=1024),
    think_time_s: float = 5.0,  # mean gap between a chat's consecutive arrivals
    max_prompt_len: int | None = 16384,  # a chat ends before a turn whose prompt exceeds this
    rate: float | str = 1.0,  # chats/s; inf = every chat's first turn at t=0
    burstiness: float = 1.0,
    limit: int | None = None,  # keep the first N in arrival order; null = all
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB,
    max_model_len: int | None = None,  # checked only: every request is built (lengths are bounded)
    name: str = "multi_turn",
) -> list[Request]:
    """session = chat index; meta = {"turn": k}; source "name:c<chat>t<turn>"."""
    vocab_size, limit = check_vocab(vocab_size), check_limit(limit)
    check_max_model_len(max_model_len)
    if think_time_s < 0:
        raise TraceError(f"think_time_s must be >= 0, got {think_time_s}")
    other = stream(seed, OTHER_STREAM)
    user_rng, out_rng = stream(seed, PROMPT_STREAM), stream(seed, OUTPUT_STREAM)
    starts = arrival_times(other, num_chats, rate, burstiness)  # [C] s
    turn_counts = as_dist(turns).sample(other, num_chats)  # [C]
    user_dist, out_dist = as_dist(user_len), as_dist(output_len)

    times, prompts, outputs, sources, sessions, metas = [], [], [], [], [], []
    for chat in range(num_chats):
        history = np.empty(0, dtype=np.int32)  # [history_len] ids of all previous turns
        t = float(starts[chat])
        for turn in range(int(turn_counts[chat])):
            u_len, o_len = int(user_dist.sample(other, 1)[0]), int(out_dist.sample(other, 1)[0])
            if max_prompt_len is not None and len(history) + u_len > max_prompt_len:
                break
            if turn > 0:
                t += float(other.exponential(think_time_s)) if think_time_s > 0 else 0.0
            prompt = np.concatenate([history, user_rng.integers(0, vocab_size, u_len, dtype=np.int32)])
            output = out_rng.integers(0, vocab_size, o_len, dtype=np.int32)
            times.append(t)
            prompts.append(prompt)
            outputs.append(output)
            sources.append(f"{name}:c{chat}t{turn}")
            sessions.append(chat)
            metas.append({"turn": turn})
            history = np.concatenate([prompt, output])
    return assemble(np.asarray(times), prompts, outputs, sources, sessions=sessions, metas=metas,
                    limit=limit)
