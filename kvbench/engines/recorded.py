"""`engine=recorded`: the step times of a measured run, replayed (its `timeline.parquet`).

Given the same trace, strategy and scheduler settings as the measured run, the replay then
takes exactly that run's decisions (admissions, preemptions, prefix hits, batch compositions):
the scheduler and allocator are the same code under every engine, and the clock is the only
input that differs. So this engine answers two questions: does a simulation differ from a GPU
run only through its step times (then its decisions match here), and what does the allocator do
on a measured clock. Every step's token count is compared with the recording; the first
difference is an error naming the step.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.batch import StepBatch
from kvbench.engines.base import Engine


class RecordedEngine(Engine):
    """Args: timeline: a run's timeline.parquet (columns dt_s, prefill_tokens, decode_tokens)."""

    name = "recorded"

    def __init__(self, timeline: str, device: str | None = None) -> None:
        self.path = Path(timeline)
        if not self.path.is_file():
            raise FileNotFoundError(f"engine.timeline: {self.path} is not a file (a run's timeline.parquet)")
        t = pd.read_parquet(self.path, columns=["dt_s", "prefill_tokens", "decode_tokens"])
        self.dt = t.dt_s.to_numpy(np.float64)
        self.tokens = (t.prefill_tokens + t.decode_tokens).to_numpy(np.int64)
        self.device = device or f"recorded ({self.path})"
        self.k = 0

    def step(self, batch: StepBatch) -> float:
        k = self.k
        if k >= len(self.dt):
            raise RuntimeError(f"step {k}: {self.path} records only {len(self.dt)} steps; the replay has "
                               f"diverged from the recorded run (another trace, strategy or scheduler setting?)")
        tokens = batch.num_tokens
        if tokens != self.tokens[k]:
            raise RuntimeError(f"step {k}: the batch has {tokens} tokens, {self.path} recorded "
                               f"{self.tokens[k]}: the replay has diverged from the recorded run")
        self.k += 1
        return float(self.dt[k])

    def summary(self) -> dict:
        return {"device": self.device, "recorded_steps": len(self.dt), "replayed_steps": self.k}
