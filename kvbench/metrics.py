"""One event stream per run → the requests table, the timeline table and summary.json.

Definitions are in docs/metrics.md; the key names are DESIGN.md's and stay stable.
"""
from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvbench.events import DecodeRun, StepEvent
from kvbench.request import Request
from kvbench.strategies.base import SlotStates

STATES = SlotStates._fields  # token, reserved, internal, external, cached, free
_STATE_KEY = {"token": "token_states", "reserved": "reserved", "internal": "internal_frag",
              "external": "external_frag", "cached": "cached", "free": "free"}
TIMELINE_COLUMNS = ["t_s", "dt_s", "running", "waiting", "prefill_tokens", "decode_tokens",
                    "kv_read_tokens", "preemptions", *STATES]
_INT_COLUMNS = len(TIMELINE_COLUMNS) - 2


@dataclass(slots=True, eq=False)
class _Times:
    """What the events said of one admitted request."""

    request: Request
    cached_tokens: int  # prompt positions served from cache at its first admission
    preemptions: int = 0
    first_token_s: float = np.nan
    last_token_s: float = 0.0
    finish_s: float = np.nan


class Recorder:
    """Consumes the scheduler's events, step by step; turns them into tables at the end.

    Storage per step: one timeline row in two flat arrays (2 float64 + 12 int32 = 64 bytes);
    per request: one `_Times`; inter-token latencies as runs of equal gaps (value, count),
    in the order the tokens were produced (a decode step's requests share one gap).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._floats = array("d")  # t_s, dt_s of every step
        self._ints = array("i")  # the other timeline columns of every step
        self._times: dict[int, _Times] = {}
        self._gaps, self._gap_counts = array("d"), array("q")  # closed runs of equal ITL gaps
        self._gap, self._gap_count = 0.0, 0  # the open run
        self.rejected: list[tuple[Request, str]] = []
        self.moved = [0, 0, 0, 0]  # token slots moved: swap-outs, swap-ins, all d2h, all h2d (issue 14)

    # ---- events -----------------------------------------------------------------------------
    def step(self, ev: StepEvent, t: float, dt: float) -> None:
        """One step [t, t + dt): its timeline row, and the output tokens it produced at t + dt."""
        b = ev.batch
        self._floats.extend((t, dt))
        self._ints.extend((ev.running, ev.waiting, b.prefill_tokens, b.decode_tokens, b.kv_read_tokens,
                           ev.preemptions, *ev.states))
        times = self._times
        for req, cached in ev.admitted:
            times[req.id] = _Times(req, cached)
        for rid in ev.preempted:
            times[rid].preemptions += 1
        if b.d2h_tokens or b.h2d_tokens:
            m = self.moved
            m[0] += sum(o.tokens for o in b.swap_out)
            m[1] += sum(i.tokens for i in b.swap_in)
            m[2] += b.d2h_tokens
            m[3] += b.h2d_tokens
        end = t + dt
        gap, count = self._gap, self._gap_count
        for s in b.seqs:
            if not s.emits:
                continue
            r = s.request
            tm = times[r.id]
            pos = s.start + s.num_new  # output token number pos - prompt_len is out
            if pos == r.prompt_len:
                tm.first_token_s = end
            else:
                g = end - tm.last_token_s
                if g == gap:
                    count += 1
                else:
                    if count:
                        self._gaps.append(gap)
                        self._gap_counts.append(count)
                    gap, count = g, 1
            tm.last_token_s = end
            if pos == r.kv_len:
                tm.finish_s = end
        self._gap, self._gap_count = gap, count

    def decode_run(self, run: DecodeRun) -> None:
        """k quiet decode steps at once: the same rows and token times as k calls of `step`."""
        t, dt, k, d = np.asarray(run.t), np.asarray(run.dt), len(run.t), len(run.seqs)
        self._floats.frombytes(np.column_stack((t, dt)).tobytes())
        rows = np.empty((k, _INT_COLUMNS), np.int32)
        rows[:, :6] = (run.running, run.waiting, 0, d, 0, run.preemptions)
        rows[:, 4] = run.kv_read0 + d * np.arange(k)
        rows[:, 6:] = run.states
        self._ints.frombytes(rows.tobytes())
        ends = t + dt  # every request's token j comes out at ends[j], the one before at ends[j - 1]
        gaps = ends - np.concatenate((t[:1], ends[:-1]))  # (t[0]: the step before the run ended then)
        if self._gap_count:
            self._gaps.append(self._gap)
            self._gap_counts.append(self._gap_count)
        self._gaps.frombytes(gaps[:-1].tobytes())
        self._gap_counts.frombytes(np.full(k - 1, d, np.int64).tobytes())
        self._gap, self._gap_count = float(gaps[-1]), d
        last, times = float(ends[-1]), self._times
        for r in run.seqs:
            times[r.id].last_token_s = last

    def moves(self, bytes_per_token: int) -> dict:
        """summary.json's host-move keys: K/V token slots swapped out / in (preemption by swap)
        and bytes copied device -> host / host -> device (swaps plus the strategy's host tier)."""
        out, back, d2h, h2d = self.moved
        return {"swap_out_tokens": out, "swap_in_tokens": back, "d2h_bytes": d2h * bytes_per_token,
                "h2d_bytes": h2d * bytes_per_token}

    def reject(self, request: Request, reason: str) -> None:
        self.rejected.append((request, reason))

    # ---- tables -----------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self._floats) // 2

    def last_states(self) -> SlotStates | None:
        """The slot states of the last step recorded."""
        if not self._floats:
            return None
        return SlotStates(*self._ints[len(self._ints) - len(STATES):])

    def itl(self) -> np.ndarray:
        """Every gap between two consecutive output tokens of a request [s], in token order."""
        gaps, counts = np.frombuffer(self._gaps), np.frombuffer(self._gap_counts, np.int64)
        if self._gap_count:
            gaps, counts = np.append(gaps, self._gap), np.append(counts, self._gap_count)
        return np.repeat(gaps, counts)

    def timeline(self) -> pd.DataFrame:
        f = np.frombuffer(self._floats).reshape(-1, 2)
        i = np.frombuffer(self._ints, np.int32).reshape(-1, _INT_COLUMNS)
        # one column at a time into one 2-D block per dtype: no int64 copy of all the rows at once
        ints = np.empty((_INT_COLUMNS, len(i)), np.int64)
        for c in range(_INT_COLUMNS):
            ints[c] = i[:, c]
        cols = {"t_s": f[:, 0].copy(), "dt_s": f[:, 1].copy()}
        cols.update(zip(TIMELINE_COLUMNS[2:], ints))
        return pd.DataFrame(cols, columns=TIMELINE_COLUMNS, copy=False)

    def requests(self) -> pd.DataFrame:
        """One row per request, sorted by id: every number from the events."""
        rows = []
        for tm in self._times.values():
            r = tm.request
            ttft = tm.first_token_s - r.arrival_s
            e2e = tm.finish_s - r.arrival_s
            rows.append((r.id, r.arrival_s, r.prompt_len, r.output_len, "finished", "",
                         tm.cached_tokens, tm.preemptions, tm.first_token_s, tm.finish_s, ttft, e2e,
                         (e2e - ttft) / (r.output_len - 1) if r.output_len > 1 else np.nan))
        for r, reason in self.rejected:
            rows.append((r.id, r.arrival_s, r.prompt_len, r.output_len, "rejected", reason,
                         0, 0, np.nan, np.nan, np.nan, np.nan, np.nan))
        cols = ["id", "arrival_s", "prompt_len", "output_len", "status", "reason", "cached_tokens",
                "preemptions", "first_token_s", "finish_s", "ttft_s", "e2e_s", "tpot_s"]
        return pd.DataFrame.from_records(rows, columns=cols).sort_values("id", ignore_index=True)


def _stats(prefix: str, values: pd.Series | np.ndarray) -> dict:
    if isinstance(values, pd.Series):
        v = values.dropna().to_numpy()
    else:  # an array (the ITL gaps: the largest input): copied only if it holds a NaN
        v = values[~np.isnan(values)] if np.isnan(values).any() else values
    if len(v) == 0:
        return {f"{prefix}_{k}_s": None for k in ("mean", "p50", "p90", "p99")}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])  # one partition (a copy of v), not three
    return {f"{prefix}_mean_s": float(v.mean()), f"{prefix}_p50_s": float(p50),
            f"{prefix}_p90_s": float(p90), f"{prefix}_p99_s": float(p99)}


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
        **_stats("itl", np.asarray(itl, dtype=float)),
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
