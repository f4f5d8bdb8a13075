"""What the scheduler hands an engine each step: which tokens to run, and where their K/V live."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvbench.request import Request


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step.

    The step feeds tokens `token_ids[start : start + num_new]` (a prefill chunk, or one decode
    token when `start >= prompt_len`). Before the step, positions `[0, start)` hold computed
    K/V (some of them served from a prefix cache); after it, `[0, start + num_new)` do.
    """

    request: Request
    start: int
    num_new: int
    page_table: np.ndarray | None  # [ceil((start + num_new) / page_size)] int32; None if not asked for
    emits: bool | None = None  # set by the scheduler; None: derived from the prompt length

    @property
    def is_prefill(self) -> bool:
        return self.num_new > 1 or self.start < self.request.prompt_len

    @property
    def emits_token(self) -> bool:
        """True when this step produces a new output token (the last prefill chunk, or a decode).

        After a preemption the request recomputes prompt + generated tokens as one prefill, and
        only its last chunk emits; the scheduler says so through `emits`.
        """
        if self.emits is not None:
            return self.emits
        return self.start + self.num_new >= self.request.prompt_len


@dataclass(slots=True)
class StepBatch:
    """A flattened variable-length batch: prefill chunks and decode tokens mixed.

    Pool geometry: `num_pages x page_size` token slots per layer; token i of a request lives in
    slot `page_table[i // page_size] * page_size + i % page_size`. `contiguous` is True when
    every request's pages are consecutive (slab), so kernels may take their contiguous path.
    `copies` lists (src_page, dst_page) copy-on-write copies the engine must do before the step.
    """

    seqs: list[ScheduledSeq]
    page_size: int
    num_pages: int
    contiguous: bool
    copies: list[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)
