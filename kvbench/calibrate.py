"""Fit the simulation's cost model to measured steps: `kvbench-calibrate RUN_DIR... --out FILE`.

The sim's step time (`kvbench.engines.sim.step_time`, configs/engine/sim.yaml) has one linear
model for decode-only steps (overhead + decode tokens + K/V positions read: the gpu engine
replays them from CUDA graphs) and one for steps with prefill (run eagerly: a fixed cost, then
the larger of a floor, the host's ~10 launches per layer, and the GPU's work, linear in prefill
tokens, decode tokens and K/V positions). Every run's timeline.parquet has those inputs and the
step's duration (CUDA events under engine=gpu). The decode-only steps give overhead_s,
decode_token_s and kv_read_token_s by non-negative least squares; the steps with prefill then
give the rest by non-negative least squares on (time - overhead_s), alternating with the
choice of which steps sit on the floor until that choice is stable, from several starts.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.engines.sim import step_time

COEFFICIENTS = ("overhead_s", "prefill_token_s", "decode_token_s", "kv_read_token_s", "prefill_step_s",
                "eager_floor_s", "eager_decode_token_s", "eager_kv_read_token_s")


def predict(timeline: pd.DataFrame, coef: dict[str, float]) -> np.ndarray:
    """The modelled time of each step of a timeline."""
    return step_time(coef, timeline.prefill_tokens.to_numpy(float), timeline.decode_tokens.to_numpy(float),
                     timeline.kv_read_tokens.to_numpy(float))


def fit(timeline: pd.DataFrame, stall: float = 3.0) -> dict[str, float]:
    """The coefficients minimising the squared error of every step's time (see the module doc).

    Steps that took more than `stall` times what a first fit predicts (a just-in-time compile,
    a graph capture, a hiccup of the host) are dropped and the fit is repeated, twice at most."""
    y = timeline.dt_s.to_numpy(float)
    coef = _fit(timeline)
    for _ in range(2):
        keep = y <= stall * predict(timeline, coef)
        if keep.all():
            break
        coef = _fit(timeline[keep])
    return coef


def _fit(t: pd.DataFrame) -> dict[str, float]:
    p, d, k = (t[c].to_numpy(float) for c in ("prefill_tokens", "decode_tokens", "kv_read_tokens"))
    y, eager = t.dt_s.to_numpy(float), p > 0
    graph = ~eager
    if graph.any():
        overhead, dec, kv = _nnls(np.column_stack([np.ones(graph.sum()), d[graph], k[graph]]), y[graph])
    else:  # no decode-only step: its coefficients are not observed; fold the fixed cost into the eager one
        overhead = dec = kv = 0.0
    coef = dict(overhead_s=overhead, decode_token_s=dec, kv_read_token_s=kv, prefill_step_s=0.0,
                prefill_token_s=0.0, eager_floor_s=0.0, eager_decode_token_s=dec, eager_kv_read_token_s=kv)
    if not eager.any():
        return {k: float(coef[k]) for k in COEFFICIENTS}
    work = np.column_stack([p[eager], d[eager], k[eager]])           # [n, 3]: the GPU-bound terms
    ye = y[eager] - overhead
    best = None
    start = _nnls(np.column_stack([np.ones(len(ye)), work]), ye)
    w0 = work @ start[1:]
    for q in (-np.inf, *np.quantile(w0, np.linspace(0.05, 0.95, 10))):  # starts: steps on the floor
        floor_bound = w0 < q
        for _ in range(20):
            x = np.column_stack([np.ones(len(ye)), np.where(floor_bound[:, None], 0.0, work),
                                 floor_bound.astype(float)])
            c = _nnls(x, ye)
            new = work @ c[1:4] < c[4]
            if (new == floor_bound).all():
                break
            floor_bound = new
        err = float(np.sum((c[0] + np.maximum(c[4], work @ c[1:4]) - ye) ** 2))
        if best is None or err < best[0] * (1 - 1e-9) - 1e-18 * len(ye):  # ties: fewer steps on the floor
            best = (err, c)
    c = best[1]
    coef.update(prefill_step_s=c[0], prefill_token_s=c[1], eager_decode_token_s=c[2],
                eager_kv_read_token_s=c[3], eager_floor_s=c[4])
    return {k: float(coef[k]) for k in COEFFICIENTS}


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n = x.shape[1]
    best, best_err = np.zeros(n), float(np.sum(y**2))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(n)
            full[list(cols)] = coef
            err = float(np.sum((x @ full - y) ** 2))
            if err < best_err - 1e-15 * max(best_err, 1e-30):
                best, best_err = full, err
    return best


def fit_error(timeline: pd.DataFrame, coef: dict[str, float]) -> float:
    """Relative error of the total modelled time over the measured total."""
    return float(abs(predict(timeline, coef).sum() - timeline.dt_s.sum()) / timeline.dt_s.sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvbench-calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs (with timeline.parquet and summary.json)")
    ap.add_argument("--out", type=Path, required=True,
                    help="engine config to write, e.g. configs/engine/sim_h100_llama3_2_1b.yaml")
    args = ap.parse_args(argv)
    frames, devices = [], set()
    for run in args.runs:
        if not (run / "timeline.parquet").exists():
            sys.exit(f"kvbench-calibrate: error: {run} has no timeline.parquet (is it a run dir?)")
        frames.append(pd.read_parquet(run / "timeline.parquet"))
        summary = json.loads((run / "summary.json").read_text())
        devices.add(f"{summary.get('device', '?')} · {summary.get('model', '?')}")
    timeline = pd.concat(frames, ignore_index=True)
    coef = fit(timeline)
    lines = [f"# Fitted by kvbench-calibrate from {len(timeline)} steps of {len(args.runs)} runs on {', '.join(sorted(devices))}",
             f"# relative error of the total step time: {fit_error(timeline, coef):.4f}",
             "defaults:", "  - sim", "  - _self_", f"device: fitted ({', '.join(sorted(devices))})"]
    lines += [f"{k}: {v:.6e}" for k, v in coef.items()]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v:.3e}" for k, v in coef.items()))


if __name__ == "__main__":
    main()
