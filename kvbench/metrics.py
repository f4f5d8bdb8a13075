"""One event stream per run → the requests table, the timeline table and summary.json.

Definitions are in docs/metrics.md; the key names are DESIGN.md's and stay stable.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from kvbench.request import Request
from kvbench.scheduler import Seq
from kvbench.strategies.base import SlotStates

STATES = SlotStates._fields  # token, reserved, internal, external, cached, free
_STATE_KEY = {"token": "token_states", "reserved": "reserved", "internal": "internal_frag",
              "external": "external_frag", "cached": "cached", "free": "free"}
TIMELINE_COLUMNS = ["t_s", "dt_s", "running", "waiting", "prefill_tokens", "decode_tokens",
                    "kv_read_tokens", "preemptions", *STATES]


class Recorder:
    """Collects what happened, step by step; turns it into tables at the end."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: list[tuple] = []
        self.rejected: list[tuple[Request, str]] = []

    def step(self, t: float, dt: float, running: int, waiting: int, prefill: int, decode: int,
             kv_read: int, preemptions: int, states: SlotStates) -> None:
        """One step [t, t + dt), with the slot states while it ran."""
        self._rows.append((t, dt, running, waiting, prefill, decode, kv_read, preemptions, *states))

    def reject(self, request: Request, reason: str) -> None:
        self.rejected.append((request, reason))

    # ---- tables -----------------------------------------------------------------------------
    def timeline(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self._rows, columns=TIMELINE_COLUMNS)

    def requests(self, finished: list[Seq]) -> pd.DataFrame:
        rows = []
        for s in finished:
            r = s.request
            ttft = s.first_token_s - r.arrival_s
            e2e = s.finish_s - r.arrival_s
            rows.append((r.id, r.arrival_s, r.prompt_len, r.output_len, "finished", "",
                         s.cached_tokens, s.preemptions, s.first_token_s, s.finish_s, ttft, e2e,
                         (e2e - ttft) / (r.output_len - 1) if r.output_len > 1 else np.nan))
        for r, reason in self.rejected:
            rows.append((r.id, r.arrival_s, r.prompt_len, r.output_len, "rejected", reason,
                         0, 0, np.nan, np.nan, np.nan, np.nan, np.nan))
        cols = ["id", "arrival_s", "prompt_len", "output_len", "status", "reason", "cached_tokens",
                "preemptions", "first_token_s", "finish_s", "ttft_s", "e2e_s", "tpot_s"]
        return pd.DataFrame.from_records(rows, columns=cols).sort_values("id", ignore_index=True)


def _stats(prefix: str, values: pd.Series) -> dict:
    v = values.dropna().to_numpy()
    if len(v) == 0:
        return {f"{prefix}_{k}_s": None for k in ("mean", "p50", "p90", "p99")}
    return {f"{prefix}_mean_s": float(v.mean()), f"{prefix}_p50_s": float(np.percentile(v, 50)),
            f"{prefix}_p90_s": float(np.percentile(v, 90)), f"{prefix}_p99_s": float(np.percentile(v, 99))}


def summarize(requests: pd.DataFrame, timeline: pd.DataFrame, capacity: int, itl: np.ndarray) -> dict:
    """The flat summary.json of one run (without run identity keys: strategy, engine, trace…)."""
    fin = requests[requests.status == "finished"]
    rej = requests[requests.status == "rejected"]
    duration = float(fin.finish_s.max() - requests.arrival_s.min()) if len(fin) else 0.0
    per_s = (lambda x: float(x) / duration) if duration > 0 else (lambda x: 0.0)
    out = {
        "num_requests": int(len(requests)),
        "finished": int(len(fin)),
        "rejected": int(len(rej)),
        "rejected_reasons": dict(Counter(r.split(":", 1)[0] for r in rej.reason)),
        "preemptions": int(fin.preemptions.sum()),
        "duration_s": duration,
        "request_throughput": per_s(len(fin)),
        "output_throughput": per_s(fin.output_len.sum()),
        "total_token_throughput": per_s(fin.output_len.sum() + fin.prompt_len.sum()),
        **_stats("ttft", fin.ttft_s), **_stats("tpot", fin.tpot_s), **_stats("e2e", fin.e2e_s),
        **_stats("itl", pd.Series(itl, dtype=float)),
        "kv_capacity_tokens": int(capacity),
        "prefix_hit_rate": float(fin.cached_tokens.sum() / fin.prompt_len.sum()) if len(fin) else 0.0,
        "num_steps": int(len(timeline)),
    }
    if len(timeline):
        w = timeline.dt_s.to_numpy()
        wsum = w.sum()
        for state in STATES:
            frac = timeline[state].to_numpy() / capacity
            out[f"mem_{_STATE_KEY[state]}_frac"] = float((frac * w).sum() / wsum)
            out[f"mem_{_STATE_KEY[state]}_peak_frac"] = float(frac.max())
        waste = sum(out[f"mem_{_STATE_KEY[s]}_frac"] for s in ("reserved", "internal", "external"))
        held = waste + out["mem_token_states_frac"]
        out["waste_frac"] = waste / held if held > 0 else 0.0
        out["peak_running"] = int(timeline.running.max())
        out["mean_running"] = float((timeline.running.to_numpy() * w).sum() / wsum)
    return out
