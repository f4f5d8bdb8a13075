"""`engine=sim`: the real scheduler and allocator, a modelled step time (no model runs)."""
from __future__ import annotations

import numpy as np

from kvbench.batch import StepBatch
from kvbench.engines.base import Engine


def step_time(c: dict, prefill, decode, kv_read):
    """The modelled step time of configs/engine/sim.yaml for P prefill tokens, D decode tokens and
    K K/V positions read (scalars or numpy arrays; `c` holds the coefficients, eager_* may be None).

    decode-only step:  overhead_s + D decode_token_s + K kv_read_token_s    (a CUDA-graph replay)
    step with prefill: overhead_s + prefill_step_s
                       + max(eager_floor_s, P prefill_token_s + D eager_decode_token_s
                                            + K eager_kv_read_token_s)  (eager: the host's launches
                       or the GPU's work, whichever takes longer)
    """
    graph = c["overhead_s"] + decode * c["decode_token_s"] + kv_read * c["kv_read_token_s"]
    one_step = isinstance(prefill, int)  # the sim's hot path: plain floats, the same IEEE operations
    if one_step and prefill == 0:
        return graph
    eager_decode = c["decode_token_s"] if c.get("eager_decode_token_s") is None else c["eager_decode_token_s"]
    eager_kv = c["kv_read_token_s"] if c.get("eager_kv_read_token_s") is None else c["eager_kv_read_token_s"]
    floor = c.get("eager_floor_s") or 0.0
    work = prefill * c["prefill_token_s"] + decode * eager_decode + kv_read * eager_kv
    if one_step:
        return c["overhead_s"] + c["prefill_step_s"] + max(floor, work)
    eager = c["overhead_s"] + c["prefill_step_s"] + np.maximum(floor, work)
    return np.where(np.asarray(prefill) > 0, eager, graph)


class SimEngine(Engine):
    """Step time from `step_time` (all coefficients in seconds; see configs/engine/sim.yaml).

    A prefill chunk of n tokens after a prefix of p reads p + n K/V positions (the last query's
    context); a decode token at position p reads p + 1.
    """

    name = "sim"
    forgets_ids = True  # no model runs: nothing writes into a request's output ids

    def __init__(self, overhead_s: float, prefill_token_s: float, decode_token_s: float,
                 kv_read_token_s: float, prefill_step_s: float = 0.0, eager_floor_s: float = 0.0,
                 eager_decode_token_s: float | None = None, eager_kv_read_token_s: float | None = None,
                 device: str = "modelled", fast_forward: bool = True) -> None:
        self.coefficients = {"overhead_s": overhead_s, "prefill_token_s": prefill_token_s,
                             "decode_token_s": decode_token_s, "kv_read_token_s": kv_read_token_s,
                             "prefill_step_s": prefill_step_s, "eager_floor_s": eager_floor_s,
                             "eager_decode_token_s": eager_decode_token_s,
                             "eager_kv_read_token_s": eager_kv_read_token_s}
        for key, value in self.coefficients.items():
            if value is None and key.startswith("eager_") and key != "eager_floor_s":
                continue
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"engine.{key} must be a number >= 0, got {value!r}")
        self.coefficients = {k: (None if v is None else float(v)) for k, v in self.coefficients.items()}
        if not isinstance(fast_forward, bool):
            raise ValueError(f"engine.fast_forward must be true or false, got {fast_forward!r}")
        self.device = device
        self.fast_forward = fast_forward

    def step(self, batch: StepBatch) -> float:
        return self.cost(batch.prefill_tokens, batch.decode_tokens, batch.kv_read_tokens)

    def cost(self, prefill: int, decode: int, kv_read: int) -> float:
        return float(step_time(self.coefficients, prefill, decode, kv_read))

    def decode_costs(self, decode: int, kv_read: np.ndarray) -> np.ndarray:
        return step_time(self.coefficients, 0, decode, kv_read)  # elementwise: the same floats as `cost`

    def summary(self) -> dict:
        return {"device": self.device}
