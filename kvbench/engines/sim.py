"""`engine=sim`: the real scheduler and allocator, a modelled step time (no model runs)."""
from __future__ import annotations

from kvbench.batch import StepBatch
from kvbench.engines.base import Engine


class SimEngine(Engine):
    """Step time = overhead + prefill tokens x prefill_token_s + decode tokens x decode_token_s
    + KV tokens read x kv_read_token_s, + prefill_step_s if the step has any prefill token (all
    in seconds; see configs/engine/sim.yaml).

    A prefill chunk of n tokens after a prefix of p reads p + n K/V positions (the last query's
    context); a decode token at position p reads p + 1.
    """

    name = "sim"

    def __init__(self, overhead_s: float, prefill_token_s: float, decode_token_s: float,
                 kv_read_token_s: float, prefill_step_s: float = 0.0, device: str = "modelled") -> None:
        coefficients = {"overhead_s": overhead_s, "prefill_token_s": prefill_token_s,
                        "decode_token_s": decode_token_s, "kv_read_token_s": kv_read_token_s,
                        "prefill_step_s": prefill_step_s}
        for key, value in coefficients.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"engine.{key} must be a number >= 0, got {value!r}")
        self.overhead_s = float(overhead_s)
        self.prefill_token_s = float(prefill_token_s)
        self.decode_token_s = float(decode_token_s)
        self.kv_read_token_s = float(kv_read_token_s)
        self.prefill_step_s = float(prefill_step_s)
        self.device = device

    def step(self, batch: StepBatch) -> float:
        prefill = decode = kv_read = 0
        for s in batch.seqs:
            if s.num_new == 1 and s.start >= s.request.prompt_len:
                decode += 1
            else:
                prefill += s.num_new
            kv_read += s.start + s.num_new
        return (self.overhead_s + prefill * self.prefill_token_s + decode * self.decode_token_s
                + kv_read * self.kv_read_token_s + (self.prefill_step_s if prefill else 0.0))

    def summary(self) -> dict:
        return {"device": self.device}
