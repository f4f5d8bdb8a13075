"""Fit the simulation's cost model to measured steps: `kvbench-calibrate RUN_DIR... --out FILE`.

The sim models a step as overhead_s + prefill_token_s x prefill tokens + decode_token_s x
decode tokens + kv_read_token_s x K/V positions read + prefill_step_s if the step has prefill
tokens. Every run's timeline.parquet has those inputs and the step's duration (measured with
CUDA events under engine=gpu), so the fit is a least-squares problem with coefficients >= 0;
with five unknowns, the non-negative solution is found exactly by solving every subset of free
coefficients and keeping the best feasible one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

COEFFICIENTS = ("overhead_s", "prefill_token_s", "decode_token_s", "kv_read_token_s", "prefill_step_s")


def features(timeline: pd.DataFrame) -> np.ndarray:
    """[steps, 5]: the inputs each coefficient multiplies, in COEFFICIENTS order."""
    return np.column_stack([np.ones(len(timeline)), timeline.prefill_tokens.to_numpy(float),
                            timeline.decode_tokens.to_numpy(float), timeline.kv_read_tokens.to_numpy(float),
                            (timeline.prefill_tokens.to_numpy() > 0).astype(float)])


def fit(timeline: pd.DataFrame, stall: float = 3.0) -> dict[str, float]:
    """Non-negative least squares of dt_s on [1, prefill, decode, kv_read, has prefill].

    Steps that took more than `stall` times what a first fit predicts (a just-in-time compile,
    a graph capture, a hiccup of the host) are dropped and the fit is repeated, twice at most."""
    x, y = features(timeline), timeline.dt_s.to_numpy(float)
    coef = _nnls(x, y)
    for _ in range(2):
        keep = y <= stall * (x @ coef)
        if keep.all():
            break
        coef = _nnls(x[keep], y[keep])
    return dict(zip(COEFFICIENTS, map(float, coef)))


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
    model = features(timeline) @ np.array([coef[k] for k in COEFFICIENTS])
    return float(abs(model.sum() - timeline.dt_s.sum()) / timeline.dt_s.sum())


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
