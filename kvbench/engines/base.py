"""The engine contract: run one scheduled step, say how long it took."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from kvbench.batch import StepBatch


class Engine(ABC):
    """Executes steps. Knows nothing of the strategy: it reads only the batch's layout.

    Call order: `kv_capacity_tokens` (once, before the strategy is built), `bind` (once, with
    the pool geometry the strategy chose), then `step` for every scheduler step.
    """

    name: str = "engine"
    #: whether `ScheduledSeq.page_table` must be filled in (the sim does not read it).
    needs_layout: bool = False
    #: whether the replay may hand over runs of quiet decode steps at once (priced by `cost`
    #: instead of `step`): only an engine whose step time is a model, never one that executes.
    fast_forward: bool = False
    #: whether the replay may drop a request's ids once it has left (`Request.forget`): only an
    #: engine that never writes into `Request.output` (no sampling).
    forgets_ids: bool = False

    def kv_capacity_tokens(self, requested: int | None) -> int:
        """The pool size in tokens: the requested one, or what the device can hold."""
        if requested is None:
            raise ValueError(f"engine '{self.name}' needs kv_capacity_tokens to be set")
        return int(requested)

    def bind(self, page_size: int, num_pages: int) -> None:
        """Allocate the KV pool for `num_pages x page_size` slots (no-op for the sim)."""

    @abstractmethod
    def step(self, batch: StepBatch) -> float:
        """Run the batch; return its duration in seconds (modelled or measured).

        Mutates: the KV pool (real engines), and for `sample=true` the requests' output ids.
        """

    def decode_costs(self, decode: int, kv_read: np.ndarray) -> np.ndarray:
        """Modelled durations [s] of decode-only steps of `decode` tokens that read `kv_read[j]`
        K/V positions each, exactly as `step` would price them (fast-forwarding engines only)."""
        raise NotImplementedError(f"engine '{self.name}' executes its steps: it has no cost model")

    def summary(self) -> dict:
        """Engine-specific keys for summary.json (e.g. device, peak_gpu_mem_bytes)."""
        return {}
