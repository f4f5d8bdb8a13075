"""The unit of work every trace produces and every engine replays."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True, eq=False)
class Request:
    """One request of a trace.

    Token ids are real: two requests that share a prefix share the ids of that prefix, so
    prefix caching in the strategies is exercised for real, not by a flag.

    `output` holds the ids a replay emits (the trace's "answer"), so every engine and every
    strategy sees the same tokens; its length is the request's output length.
    The request's KV footprint when finished is `len(prompt) + len(output) - 1` slots: the last
    output token is produced but never fed back, so it never gets K/V.
    """

    id: int
    arrival_s: float
    prompt: np.ndarray  # [prompt_len] int32 token ids
    output: np.ndarray  # [output_len] int32 token ids, output_len >= 1
    session: int | None = None  # multi-turn conversation id, if any
    source: str = ""  # "file:line" or generator name, for error messages
    meta: dict = field(default_factory=dict)
    tokens: np.ndarray = field(init=False, repr=False)  # [prompt_len + output_len] int32
    prompt_len: int = field(init=False)
    output_len: int = field(init=False)

    def __post_init__(self) -> None:
        # One buffer for all ids; `prompt` and `output` are views of it, so an engine that
        # samples (writes into `output`) is seen by every reader of `tokens`.
        p = int(self.prompt.shape[0])
        if p < 1 or self.output.shape[0] < 1:
            raise ValueError(f"request {self.id} ({self.source}): needs >= 1 prompt and >= 1 output token")
        self.tokens = np.concatenate([self.prompt, self.output]).astype(np.int32, copy=False)
        self.prompt = self.tokens[:p]
        self.output = self.tokens[p:]
        self.prompt_len = p
        self.output_len = int(self.output.shape[0])

    @property
    def kv_len(self) -> int:
        """Slots the request occupies once its last token is produced."""
        return self.prompt_len + self.output_len - 1

    def token_ids(self) -> np.ndarray:
        """prompt ++ output: the ids of every token the request will ever hold (no copy)."""
        return self.tokens
