"""`engine=sim`: the real scheduler and allocator, a modelled step time (no model runs)."""
from __future__ import annotations

import numpy as np

from kvbench.batch import StepBatch
from kvbench.engines.base import Engine


def step_time(c: dict, prefill, decode, kv_read, pairs=0):
    """The modelled step time of configs/engine/sim.yaml for P prefill tokens, D decode tokens and
    K K/V positions read (scalars or numpy arrays; `c` holds the coefficients, eager_* may be None,
    graph_* may be absent), and A the step's prefill query-key pairs (`StepBatch.prefill_pairs`).

    decode-only step:  overhead_s + D decode_token_s + K kv_read_token_s    (a CUDA-graph replay)
    step with 1..graph_prefill_tokens prefill tokens (also a graph replay; graph_prefill_tokens
    0 or absent: no such step, every step with prefill is eager):
                       the decode-only step's time + graph_prefill_step_s + P graph_prefill_token_s
    step with more prefill: overhead_s + prefill_step_s
                       + max(eager_floor_s, P prefill_token_s + D eager_decode_token_s
                                            + K eager_kv_read_token_s)  (eager: the host's launches
                       or the GPU's work, whichever takes longer)
    The prefill chunks' attention over their own cached prefix: + A prefill_pair_s in the eager
    work (inside the max), + A graph_prefill_pair_s in a graph-replayed step with prefill. Either
    key absent or 0: no such term, the same floating-point operations as without it (bit for bit).
    graph_mixed_step_s (absent or None: off, the model above) gives a graph-replayed step with
    prefill its own fixed cost and price per decode row in place of the decode-only step's, never
    less than the decode-only step of the same rows:
                       max(the decode-only step's time, graph_mixed_step_s + D graph_mixed_decode_token_s
                           + K kv_read_token_s + P graph_prefill_token_s (+ A graph_prefill_pair_s))
    (a prefill beside few decodes is compute-bound and hides weight reads a decode step pays for;
    beside many, each decode row costs about what a prefill token does).
    """
    graph = c["overhead_s"] + decode * c["decode_token_s"] + kv_read * c["kv_read_token_s"]
    one_step = isinstance(prefill, int)  # the sim's hot path: plain floats, the same IEEE operations
    if one_step and prefill == 0:
        return graph
    graph_max = c.get("graph_prefill_tokens") or 0
    graph_pair = c.get("graph_prefill_pair_s") or 0.0
    mixed_step = c.get("graph_mixed_step_s")
    if one_step and prefill <= graph_max:
        if mixed_step is not None:
            own = mixed_step + decode * c["graph_mixed_decode_token_s"] + kv_read * c["kv_read_token_s"] \
                + prefill * c["graph_prefill_token_s"]
            if graph_pair:
                own = own + pairs * graph_pair
            return own if own > graph else graph
        if graph_pair:
            return graph + c["graph_prefill_step_s"] + prefill * c["graph_prefill_token_s"] + pairs * graph_pair
        return graph + c["graph_prefill_step_s"] + prefill * c["graph_prefill_token_s"]
    eager_decode = c["decode_token_s"] if c.get("eager_decode_token_s") is None else c["eager_decode_token_s"]
    eager_kv = c["kv_read_token_s"] if c.get("eager_kv_read_token_s") is None else c["eager_kv_read_token_s"]
    floor = c.get("eager_floor_s") or 0.0
    work = prefill * c["prefill_token_s"] + decode * eager_decode + kv_read * eager_kv
    if c.get("prefill_pair_s"):
        work = work + pairs * c["prefill_pair_s"]
    if one_step:
        return c["overhead_s"] + c["prefill_step_s"] + max(floor, work)
    eager = c["overhead_s"] + c["prefill_step_s"] + np.maximum(floor, work)
    out = np.where(np.asarray(prefill) > 0, eager, graph)
    if graph_max:
        p = np.asarray(prefill)
        if mixed_step is None:
            mixed = graph + c["graph_prefill_step_s"] + prefill * c["graph_prefill_token_s"]
        else:
            mixed = mixed_step + decode * c["graph_mixed_decode_token_s"] + kv_read * c["kv_read_token_s"] \
                + prefill * c["graph_prefill_token_s"]
        if graph_pair:
            mixed = mixed + pairs * graph_pair
        if mixed_step is not None:
            mixed = np.maximum(mixed, graph)  # (never below the decode-only step of the same rows)
        out = np.where((p > 0) & (p <= graph_max), mixed, out)
    return out


class SimEngine(Engine):
    """Step time from `step_time` (all coefficients in seconds; see configs/engine/sim.yaml).

    A prefill chunk of n tokens after a prefix of p reads p + n K/V positions (the last query's
    context); a decode token at position p reads p + 1. In a model with sliding-window or
    chunked layers (issue 16) the batch counts per layer group, weighted by the group's share of
    the model's K/V bytes per token: context in full layers, min(context, window) in sliding
    ones, the query's own chunk in chunked ones, 0 in state layers (`StepBatch.kv_read_tokens`,
    kvbench.batch.KVReadGroups), so `kv_read_token_s` stays the price of one position of the
    whole model's K/V and a single-group model's count is unchanged.
    Prefill attention (issue 12): `prefill_pair_s` / `graph_prefill_pair_s` price each of the
    step's prefill query-key pairs (`StepBatch.prefill_pairs`, weighted the same way); 0 (the
    default): no such term.

    Host moves (preemption by swap, the host tier): a step that moves K/V between device and
    host takes `move_time` longer, serialized with the step (the copies are not overlapped with
    the model's work): d2h_tokens x kv_bytes_per_token / d2h_bytes_per_s + the same for h2d.
    `kv_bytes_per_token` comes from the model (kvbench/run.py passes kvbench.sizes'
    kv_bytes_per_token); None: a step with moves is an error (nothing to price them with).
    """

    name = "sim"
    forgets_ids = True  # no model runs: nothing writes into a request's output ids

    def __init__(self, overhead_s: float, prefill_token_s: float, decode_token_s: float,
                 kv_read_token_s: float, prefill_step_s: float = 0.0, eager_floor_s: float = 0.0,
                 eager_decode_token_s: float | None = None, eager_kv_read_token_s: float | None = None,
                 graph_prefill_tokens: int = 0, graph_prefill_step_s: float = 0.0, graph_prefill_token_s: float = 0.0,
                 prefill_pair_s: float = 0.0, graph_prefill_pair_s: float = 0.0, graph_mixed_step_s: float | None = None,
                 graph_mixed_decode_token_s: float = 0.0, device: str = "modelled", fast_forward: bool = True,
                 h2d_bytes_per_s: float = 50e9, d2h_bytes_per_s: float = 50e9, kv_bytes_per_token: int | None = None) -> None:
        self.coefficients = {"overhead_s": overhead_s, "prefill_token_s": prefill_token_s,
                             "decode_token_s": decode_token_s, "kv_read_token_s": kv_read_token_s,
                             "prefill_step_s": prefill_step_s, "eager_floor_s": eager_floor_s,
                             "eager_decode_token_s": eager_decode_token_s,
                             "eager_kv_read_token_s": eager_kv_read_token_s,
                             "graph_prefill_tokens": graph_prefill_tokens, "graph_prefill_step_s": graph_prefill_step_s,
                             "graph_prefill_token_s": graph_prefill_token_s, "prefill_pair_s": prefill_pair_s,
                             "graph_prefill_pair_s": graph_prefill_pair_s, "graph_mixed_step_s": graph_mixed_step_s,
                             "graph_mixed_decode_token_s": graph_mixed_decode_token_s}
        for key, value in self.coefficients.items():
            if value is None and (key.startswith("eager_") and key != "eager_floor_s" or key == "graph_mixed_step_s"):
                continue
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"engine.{key} must be a number >= 0, got {value!r}")
        self.coefficients = {k: (None if v is None else float(v)) for k, v in self.coefficients.items()}
        if not isinstance(fast_forward, bool):
            raise ValueError(f"engine.fast_forward must be true or false, got {fast_forward!r}")
        self.device = device
        self.fast_forward = fast_forward
        for key, rate in (("h2d_bytes_per_s", h2d_bytes_per_s), ("d2h_bytes_per_s", d2h_bytes_per_s)):
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < float("inf"):
                raise ValueError(f"engine.{key} must be a finite number > 0, got {rate!r}")
        if kv_bytes_per_token is not None and (isinstance(kv_bytes_per_token, bool) or
                                               not isinstance(kv_bytes_per_token, int) or kv_bytes_per_token < 1):
            raise ValueError(f"engine.kv_bytes_per_token must be an integer >= 1 or null, got {kv_bytes_per_token!r}")
        self.h2d_bytes_per_s, self.d2h_bytes_per_s = float(h2d_bytes_per_s), float(d2h_bytes_per_s)
        self.kv_bytes_per_token = kv_bytes_per_token
        c = self.coefficients  # (`step`'s operands, read once: step_time's values, in its order)
        self._step_terms = (c["overhead_s"], c["decode_token_s"], c["kv_read_token_s"],
                            c.get("graph_prefill_tokens") or 0, c.get("graph_prefill_pair_s") or 0.0,
                            c["graph_prefill_step_s"], c["graph_prefill_token_s"], c["prefill_token_s"],
                            c["decode_token_s"] if c.get("eager_decode_token_s") is None else c["eager_decode_token_s"],
                            c["kv_read_token_s"] if c.get("eager_kv_read_token_s") is None else c["eager_kv_read_token_s"],
                            c.get("prefill_pair_s") or 0.0, c["prefill_step_s"], c.get("eager_floor_s") or 0.0,
                            c["graph_mixed_step_s"], c["graph_mixed_decode_token_s"])

    def step(self, batch: StepBatch) -> float:
        """`cost` of the batch's counts (step_time's one-step floats: the same IEEE operations in
        the same order), plus `move_time` of its host moves."""
        (overhead, decode_s, kv_s, graph_max, graph_pair, graph_step, graph_token, prefill_s, eager_decode,
         eager_kv, pair_s, prefill_step, floor, mixed_step, mixed_decode) = self._step_terms
        prefill, decode, kv_read = batch.prefill_tokens, batch.decode_tokens, batch.kv_read_tokens
        dt = overhead + decode * decode_s + kv_read * kv_s  # (a graph replay)
        if prefill:
            if prefill <= graph_max:
                if mixed_step is None:
                    dt = dt + graph_step + prefill * graph_token
                    if graph_pair:
                        dt = dt + batch.prefill_pairs * graph_pair
                else:  # (its own costs, never below the decode-only step of the same rows)
                    own = mixed_step + decode * mixed_decode + kv_read * kv_s + prefill * graph_token
                    if graph_pair:
                        own = own + batch.prefill_pairs * graph_pair
                    if own > dt:
                        dt = own
            else:
                work = prefill * prefill_s + decode * eager_decode + kv_read * eager_kv
                if pair_s:
                    work = work + batch.prefill_pairs * pair_s
                dt = overhead + prefill_step + max(floor, work)
        if batch.h2d_tokens or batch.d2h_tokens:
            dt += self.move_time(batch.d2h_tokens, batch.h2d_tokens)
        return dt

    def move_time(self, d2h_tokens: int, h2d_tokens: int) -> float:
        """Seconds to copy `d2h_tokens` token slots' K/V device -> host and `h2d_tokens` back."""
        bpt = self.kv_bytes_per_token
        if bpt is None:
            raise RuntimeError("engine 'sim': a step moves K/V to or from host memory, but kv_bytes_per_token "
                               "is not set (kvbench.run passes the model's; set engine.kv_bytes_per_token)")
        return d2h_tokens * bpt / self.d2h_bytes_per_s + h2d_tokens * bpt / self.h2d_bytes_per_s

    def cost(self, prefill: int, decode: int, kv_read: int, pairs: int = 0) -> float:
        return float(step_time(self.coefficients, prefill, decode, kv_read, pairs))

    def decode_costs(self, decode: int, kv_read: np.ndarray) -> np.ndarray:
        return step_time(self.coefficients, 0, decode, kv_read)  # elementwise: the same floats as `cost`

    def decode_cost_list(self, decode: int, kv_read0: int, k: int) -> list[float]:
        """`decode_costs(decode, [kv_read0, kv_read0 + decode, ...])` of k steps, as a list: the
        same floats (step_time's decode-only sum, (overhead + D decode) + K kv_read, one IEEE
        operation each; an int K converts to float exactly below 2^53, as numpy's cast), in plain
        Python for a few steps (numpy's fixed costs dominate them), else through numpy."""
        if k > _LIST_STEPS:
            kv_read = np.arange(kv_read0, kv_read0 + decode * k, decode, dtype=np.int64)
            return self.decode_costs(decode, kv_read).tolist()
        terms = self._step_terms
        base, per = terms[0] + decode * terms[1], terms[2]
        return [base + x * per for x in range(kv_read0, kv_read0 + decode * k, decode)]

    def summary(self) -> dict:
        return {"device": self.device}


_LIST_STEPS = 64  # decode_cost_list: at most this many steps in plain Python
