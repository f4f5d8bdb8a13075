"""Fit the simulation's cost model to measured steps: `kvbench-calibrate RUN_DIR... --out FILE`.

The sim's step time (`kvbench.engines.sim.step_time`, configs/engine/sim.yaml) has three linear
models, one per way the gpu engine runs a step (kvbench/engines/gpu_engine.py):
  - decode-only steps (a CUDA-graph replay): overhead_s + decode tokens + K/V positions read;
  - steps with 1..graph_prefill_tokens prefill tokens (`engine.graph_max_tokens` of a run with
    CUDA graphs: also a graph replay): the decode-only model + graph_prefill_step_s + prefill tokens;
  - steps with more prefill (eager): overhead_s + prefill_step_s + prefill tokens, decode
    tokens and K/V positions, each with its own coefficient.
Each is fitted by non-negative least squares on its own steps (the mixed and the eager ones on
what the decode-only model leaves). The eager steps' floor (`eager_floor_s`) is fitted with
them (`_fit_floor`): on the H200 timelines at aaed885 it is 5.8-6.4 ms, eager steps of 513 to
2,048 prefill tokens all taking ~8 ms (results/gpu_strategies/h200_aaed885/).
Every run's timeline.parquet has the step's inputs and its duration (CUDA events under engine=gpu).
Timelines with a prefill_pairs column (recorded since issue 12: each step's prefill query-key
pairs) also fit the prefill chunks' attention over their cached prefix: prefill_pair_s in the
eager model's work, graph_prefill_pair_s in the graph-replayed prefill model (older timelines: no
such keys, the fit of before).
`--weights run` (fit(..., runs=)): each run counts equally, a step's squared error weighted by its
run's steps / total time squared, so one run of long steps (Mooncake) does not decide a model fitted
on many runs. `--weights metrics` (fit_metrics): one model fitted to what the simulation is judged
by, each run's mean TTFT, mean TPOT and duration (relative squared errors, on the run's own
decisions to first order), with the run-weighted step error as a smaller second term
(configs/engine/sim_h200_llama3_2_1b_all.yaml). Default: every step weighs the same.
`--mixed-own` (fit(..., mixed_own=True)): the graph-replayed steps with prefill get their own fixed
cost and price per decode row, floored at the decode-only step of their rows, in place of the
decode-only model plus graph_prefill_step_s: beside few decodes a prefill is compute-bound and hides
the weight reads a decode step pays (on the 8B H200 runs at 586c9e7 the plain model overpriced those
steps by 10-20 % at 4 req/s and underpriced them at t=0; results/gpu_strategies/README.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from kvbench.engines.sim import step_time

COEFFICIENTS = ("overhead_s", "prefill_token_s", "decode_token_s", "kv_read_token_s", "prefill_step_s",
                "eager_floor_s", "eager_decode_token_s", "eager_kv_read_token_s",
                "graph_prefill_tokens", "graph_prefill_step_s", "graph_prefill_token_s")
PAIR_COEFFICIENTS = ("prefill_pair_s", "graph_prefill_pair_s")  # fitted when the timeline has prefill_pairs
MIXED_COEFFICIENTS = ("graph_mixed_step_s", "graph_mixed_decode_token_s")  # fitted with mixed_own=True


def predict(timeline: pd.DataFrame, coef: dict[str, float]) -> np.ndarray:
    """The modelled time of each step of a timeline (its prefill_pairs column, if any, priced)."""
    pairs = timeline.prefill_pairs.to_numpy(float) if "prefill_pairs" in timeline else 0
    return step_time(coef, timeline.prefill_tokens.to_numpy(float), timeline.decode_tokens.to_numpy(float),
                     timeline.kv_read_tokens.to_numpy(float), pairs)


def graph_prefill_tokens(run_dir: Path) -> int:
    """Most prefill tokens of a step the run's engine replayed from a CUDA graph (0: none): the
    gpu engine's `graph_max_tokens` with `cuda_graphs` on, a sim's own `graph_prefill_tokens`."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return 0
    engine = OmegaConf.load(path).get("engine") or {}
    if "graph_max_tokens" in engine:
        return int(engine.graph_max_tokens) if engine.get("cuda_graphs") else 0
    return int(engine.get("graph_prefill_tokens") or 0)


def fit(timeline: pd.DataFrame, stall: float = 3.0, graph_prefill_tokens: int = 0,
        runs: np.ndarray | None = None, mixed_own: bool = False) -> dict[str, float]:
    """The coefficients minimising the squared error of every step's time (see the module doc);
    steps with 1..graph_prefill_tokens prefill tokens are graph replays (0: every step with
    prefill is eager). A timeline with a `prefill_pairs` column (the step's prefill query-key
    pairs, kvbench.batch.StepBatch) also gets `prefill_pair_s` (eager steps) and
    `graph_prefill_pair_s` (graph-replayed steps with prefill); without it, the keys of before.

    `runs` (one label per step, the run it came from; None: every step weighs the same): each
    run counts equally, whatever its length and its steps' size: a step's squared error is
    weighted by `run_weights` (its run's steps and total time), so the fit minimises the sum
    over runs of the mean squared error of a step relative to the run's mean step time.

    Steps that took more than `stall` times what a first fit predicts (a just-in-time compile,
    a graph capture, a hiccup of the host) are dropped and the fit is repeated, twice at most
    (with `runs`, the weights are recomputed on the steps kept).

    `mixed_own`: graph-replayed steps with prefill get their own fixed cost and price per decode
    row (`graph_mixed_step_s`, `graph_mixed_decode_token_s`; see `step_time`), fitted on what
    K/V reads leave of those above the decode-only step of their rows (which those are, alternated
    with the fit until stable), in place of graph_prefill_step_s over the decode-only model."""
    y = timeline.dt_s.to_numpy(float)
    labels = None if runs is None else np.asarray(runs)
    keep = np.ones(len(y), bool)
    coef = _fit(timeline, graph_prefill_tokens, None if labels is None else run_weights(labels, y), mixed_own)
    for _ in range(2):
        keep = y <= stall * predict(timeline, coef)
        if keep.all():
            break
        w = None if labels is None else run_weights(labels[keep], y[keep])
        coef = _fit(timeline[keep], graph_prefill_tokens, w, mixed_own)
    return coef


def run_weights(runs: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """Per-step weights under which each run counts equally: n_r / T_r**2 for a step of run r
    (n_r steps taking T_r seconds in all), i.e. (error / the run's mean step time)**2 / n_r."""
    runs, dt = np.asarray(runs), np.asarray(dt, float)
    _, inverse, counts = np.unique(runs, return_inverse=True, return_counts=True)
    totals = np.bincount(inverse, weights=dt)
    return (counts / totals**2)[inverse]


def _fit(t: pd.DataFrame, graph_max: int, w: np.ndarray | None = None, mixed_own: bool = False) -> dict[str, float]:
    """One pass of `fit` on the steps of `t`; `w`: a weight per step (None: all 1)."""
    p, d, k = (t[c].to_numpy(float) for c in ("prefill_tokens", "decode_tokens", "kv_read_tokens"))
    has_pairs = "prefill_pairs" in t
    a = t.prefill_pairs.to_numpy(float) if has_pairs else None
    y = t.dt_s.to_numpy(float)
    decode, mixed, eager = p == 0, (p > 0) & (p <= graph_max), p > graph_max
    if decode.any():
        overhead, dec, kv = _nnls(np.column_stack([np.ones(decode.sum()), d[decode], k[decode]]), y[decode],
                                  None if w is None else w[decode])
    else:  # no decode-only step: its coefficients are not observed; fold the fixed cost into the others
        overhead = dec = kv = 0.0
    coef = dict(overhead_s=overhead, decode_token_s=dec, kv_read_token_s=kv, prefill_step_s=0.0,
                prefill_token_s=0.0, eager_floor_s=0.0, eager_decode_token_s=dec, eager_kv_read_token_s=kv,
                graph_prefill_tokens=graph_max if mixed.any() else 0, graph_prefill_step_s=0.0,
                graph_prefill_token_s=0.0, prefill_pair_s=0.0, graph_prefill_pair_s=0.0,
                graph_mixed_step_s=0.0, graph_mixed_decode_token_s=dec)
    if mixed.any() and mixed_own:  # their own fixed cost, per decode row, per prefill token (and pair), fitted on
        # the steps above the decode-only step of their rows (the floor), alternating until that choice is stable
        work = np.column_stack([np.ones(mixed.sum()), p[mixed], d[mixed]] + ([a[mixed]] if has_pairs else []))
        rest, base = y[mixed] - k[mixed] * kv, overhead + d[mixed] * dec    # (base: the floor, less K/V reads)
        wm = None if w is None else w[mixed]
        above = np.ones(mixed.sum(), bool)
        for _ in range(20):
            c = _nnls(work[above], rest[above], None if wm is None else wm[above])
            new = work @ c >= base
            if (new == above).all() or not new.any():
                break
            above = new
        coef["graph_mixed_step_s"], coef["graph_prefill_token_s"], coef["graph_mixed_decode_token_s"] = c[:3]
        if has_pairs:
            coef["graph_prefill_pair_s"] = c[3]
    elif mixed.any():  # what the decode-only model leaves: a fixed cost and one per prefill token (and pair)
        rest = y[mixed] - (overhead + d[mixed] * dec + k[mixed] * kv)
        cols = [np.ones(mixed.sum()), p[mixed]] + ([a[mixed]] if has_pairs else [])
        c = _nnls(np.column_stack(cols), rest, None if w is None else w[mixed])
        coef["graph_prefill_step_s"], coef["graph_prefill_token_s"] = c[0], c[1]
        if has_pairs:
            coef["graph_prefill_pair_s"] = c[2]
    if eager.any():
        cols = [p[eager], d[eager], k[eager]] + ([a[eager]] if has_pairs else [])
        c = _fit_floor(np.column_stack(cols), y[eager] - overhead, None if w is None else w[eager])
        coef.update(prefill_step_s=c[0], prefill_token_s=c[1], eager_decode_token_s=c[2], eager_kv_read_token_s=c[3],
                    eager_floor_s=c[-1])
        if has_pairs:
            coef["prefill_pair_s"] = c[4]
    elif mixed.any():  # no eager step observed: the graph-replayed mixed steps' model, extended
        coef.update(prefill_step_s=coef["graph_prefill_step_s"], prefill_token_s=coef["graph_prefill_token_s"],
                    prefill_pair_s=coef["graph_prefill_pair_s"])
    keys = COEFFICIENTS + (PAIR_COEFFICIENTS if has_pairs else ()) + (MIXED_COEFFICIENTS if mixed_own else ())
    return {key: int(coef[key]) if key == "graph_prefill_tokens" else float(coef[key]) for key in keys}


def _fit_floor(work: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """[fixed, per unit of each `work` column (prefill, decode, K/V position[, prefill pair]), floor]
    minimising the (`w`-weighted) squared error of fixed + max(floor, work @ per-unit costs) over the eager
    steps: non-negative least squares,
    alternating with the choice of which steps sit on the floor until that choice is stable, from
    several starts (ties: fewer steps on the floor)."""
    best = None
    ww = np.ones(len(y)) if w is None else w
    start = _nnls(np.column_stack([np.ones(len(y)), work]), y, w)
    w0 = work @ start[1:]
    for q in (-np.inf, *np.quantile(w0, np.linspace(0.05, 0.95, 10))):  # starts: steps on the floor
        floor_bound = w0 < q
        for _ in range(20):
            x = np.column_stack([np.ones(len(y)), np.where(floor_bound[:, None], 0.0, work), floor_bound.astype(float)])
            c = _nnls(x, y, w)
            new = work @ c[1:-1] < c[-1]
            if (new == floor_bound).all():
                break
            floor_bound = new
        err = float(np.sum(ww * (c[0] + np.maximum(c[-1], work @ c[1:-1]) - y) ** 2))
        if best is None or err < best[0] * (1 - 1e-9) - 1e-18 * len(y):
            best = (err, c)
    return best[1]


def _nnls(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Non-negative least squares by trying every subset of columns; `w`: a weight per row of
    the squared error (None: all 1)."""
    if w is not None:
        sw = np.sqrt(np.asarray(w, float))
        x, y = x * sw[:, None], y * sw
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


# the columns of the joint step model fit_metrics solves for (in step_time's terms; the eager
# work terms apply to eager steps above the floor, eager_floor_s to those on it)
JOINT = ("overhead_s", "decode_token_s", "kv_read_token_s", "graph_prefill_step_s", "graph_prefill_token_s",
         "prefill_step_s", "prefill_token_s", "eager_decode_token_s", "eager_kv_read_token_s", "eager_floor_s")
JOINT_PAIRS = ("graph_prefill_pair_s", "prefill_pair_s")
# with mixed_own: graph-replayed steps with prefill have their own fixed cost (graph_prefill_step_s's column) and
# price per decode row (a last column); overhead_s and decode_token_s are then the other steps' only
JOINT_MIXED = tuple("graph_mixed_step_s" if k == "graph_prefill_step_s" else k for k in JOINT) + \
    ("graph_mixed_decode_token_s",)


def _design(t: pd.DataFrame, coef: dict, pairs: bool, mixed_own: bool = False) -> np.ndarray:
    """Each step's row of the joint linear model (columns JOINT, or JOINT_MIXED with `mixed_own`,
    [+ JOINT_PAIRS]): step_time(coef) equals this @ coef's values; which eager steps sit on the
    floor is taken from `coef`."""
    p, d, k = (t[c].to_numpy(float) for c in ("prefill_tokens", "decode_tokens", "kv_read_tokens"))
    a = t.prefill_pairs.to_numpy(float) if pairs else np.zeros(len(t))
    gm = int(coef.get("graph_prefill_tokens") or 0)
    mixed, eager = (p > 0) & (p <= gm), p > gm
    work = (p * coef["prefill_token_s"] + d * coef["eager_decode_token_s"] + k * coef["eager_kv_read_token_s"]
            + a * (coef.get("prefill_pair_s") or 0.0))
    floor = eager & (work < coef["eager_floor_s"])
    above, graph = eager & ~floor, ~eager
    if mixed_own:   # graph-replayed steps with prefill priced on their own, those below the decode-only step of
        # their rows on that step (step_time's max)
        base = coef["overhead_s"] + d * coef["decode_token_s"]
        own_cost = (coef["graph_mixed_step_s"] + d * coef["graph_mixed_decode_token_s"] + p * coef["graph_prefill_token_s"]
                    + a * (coef.get("graph_prefill_pair_s") or 0.0))
        own = mixed & (own_cost > base)
        rows = own
    else:
        own, rows = np.zeros(len(t), bool), mixed
    cols = [(~own) * 1.0, d * (graph & ~own), k * graph, rows * 1.0, p * rows, eager * 1.0, p * above, d * above,
            k * above, floor * 1.0] + ([d * own] if mixed_own else [])
    return np.column_stack(cols + ([a * rows, a * above] if pairs else []))


def held_by_stalls(timeline: pd.DataFrame, requests: pd.DataFrame, stalls: np.ndarray) -> np.ndarray:
    """Which of `requests` were in the system while a stall step (`stalls`, a mask over the
    timeline's steps) or the backlog it left held the engine: from the stall's start to the end
    of the first later step with nobody waiting (the stall step alone without a `waiting` column)."""
    start, end = timeline.t_s.to_numpy(float), (timeline.t_s + timeline.dt_s).to_numpy(float)
    calm = (timeline.waiting.to_numpy() == 0) if "waiting" in timeline else np.ones(len(start), bool)
    held = np.zeros(len(requests), bool)
    arrival, finish = requests.arrival_s.to_numpy(float), requests.finish_s.to_numpy(float)
    for i in np.flatnonzero(stalls):
        after = np.flatnonzero(calm[i:])
        until = end[i + after[0]] if len(after) else end[-1]
        held |= (arrival < until) & (finish > start[i])
    return held


def metric_weights(timeline: pd.DataFrame, requests: pd.DataFrame,
                   stalls: np.ndarray | None = None) -> dict[str, tuple[np.ndarray, float]]:
    """{metric: (v, value)}: the run's measured mean TTFT, mean TPOT and, when every request
    arrived at t=0, duration (1 / request throughput), each with the per-step weights v by which
    it moves with the steps' times on the run's own decisions (to first order: extra time in a
    step delays every later step of the requests in the system across it): value + v @ extra.
    `requests` is the run's requests.parquet; its first-token and finish times are ends of the
    timeline's steps. `stalls` (a mask over the steps): those steps weigh 0 (the measured values
    keep them: what is fitted is the run with its stalls given, as StallInjectedSim replays it)."""
    end = (timeline.t_s + timeline.dt_s).to_numpy(float)
    n = len(end)
    fin = requests[requests.status == "finished"]
    arrive = np.searchsorted(end, fin.arrival_s.to_numpy(float) + 1e-12, side="right")  # first step ending after
    first = np.minimum(np.searchsorted(end, fin.first_token_s.to_numpy(float) - 1e-7), n - 1)
    last = np.minimum(np.searchsorted(end, fin.finish_s.to_numpy(float) - 1e-7), n - 1)
    out = fin.output_len.to_numpy()

    def spans(lo, hi, weight):  # sum over requests of weight on steps lo..hi
        v = np.zeros(n + 1)
        np.add.at(v, lo, weight)
        np.add.at(v, hi + 1, -weight)
        return np.cumsum(v)[:n]

    many = out > 1
    w = {"ttft": (spans(arrive, first, np.full(len(fin), 1.0 / max(len(fin), 1))), float(fin.ttft_s.mean())),
         "tpot": (spans(first[many] + 1, last[many], 1.0 / (out[many] - 1) / max(many.sum(), 1)),
                  float(fin.tpot_s[many].mean()))}
    if len(fin) and float(requests.arrival_s.max()) == 0.0:
        w["duration"] = ((np.arange(n) <= last.max()).astype(float), float(fin.finish_s.max() - requests.arrival_s.min()))
    if stalls is not None:
        w = {k: (np.where(stalls, 0.0, v), value) for k, (v, value) in w.items()}
    return w


def fit_metrics(timelines: list[pd.DataFrame], requests: list[pd.DataFrame], stall: float = 3.0,
                graph_prefill_tokens: int = 0, step_weight: float = 0.3, rounds: int = 3,
                mixed_own: bool = False) -> dict[str, float]:
    """One model for several runs fitted to what a simulation is judged by: the coefficients
    (non-negative) minimising, over runs, the squared relative error of each run's mean TTFT,
    mean TPOT and (runs with every request at t=0) duration, each predicted to first order on
    the run's own decisions (`metric_weights`), plus step_weight**2 x the run-weighted squared
    error of every step (`fit(..., runs=)`, which also gives the start). Stalls (steps over
    `stall` x the model) weigh nothing in either: the metrics fitted are the run's with its
    stalls given (a simulation cannot predict them; `held_by_stalls` names the requests they
    held); which eager steps sit on the floor, and which steps are stalls, come from the model of
    the round before (`rounds` rounds). `mixed_own`: as `fit`'s."""
    pairs = all("prefill_pairs" in t for t in timelines)
    runs = np.concatenate([np.full(len(t), i) for i, t in enumerate(timelines)])
    coef = fit(pd.concat(timelines, ignore_index=True), stall, graph_prefill_tokens, runs=runs, mixed_own=mixed_own)
    names = (JOINT_MIXED if mixed_own else JOINT) + (JOINT_PAIRS if pairs else ())
    for _ in range(rounds):
        rows, target, xs, ys, labels = [], [], [], [], []
        for i, (t, req) in enumerate(zip(timelines, requests)):
            dt = t.dt_s.to_numpy(float)
            x = _design(t, coef, pairs, mixed_own)
            keep = dt <= stall * predict(t, coef)
            xs.append(x[keep]), ys.append(dt[keep]), labels.append(np.full(keep.sum(), i))
            for v, value in metric_weights(t, req, ~keep).values():  # relative error: v @ (model - measured) / value
                if value > 0:
                    rows.append(v @ x / value)
                    target.append(v @ dt / value)
        x, y = np.vstack(xs), np.concatenate(ys)
        sw = np.sqrt(run_weights(np.concatenate(labels), y))
        q, r = np.linalg.qr(x * sw[:, None])  # the step term, compressed to len(names) rows
        c = _nnls(np.vstack([np.array(rows).reshape(-1, len(names)), step_weight * r]),
                  np.concatenate([target, step_weight * (q.T @ (y * sw))]))
        seen = np.abs(x).sum(axis=0) > 0  # a column no step has (no eager step, say): its value of before
        coef = {**coef, **{k: float(v) for k, v, ok in zip(names, c, seen) if ok}}
    return coef


def fit_error(timeline: pd.DataFrame, coef: dict[str, float]) -> float:
    """Relative error of the total modelled time over the measured total."""
    return float(abs(predict(timeline, coef).sum() - timeline.dt_s.sum()) / timeline.dt_s.sum())


def yaml_lines(coef: dict) -> list[str]:
    """`key: value` lines of an engine config (graph_prefill_tokens an integer)."""
    return [f"{k}: {v}" if isinstance(v, int) else f"{k}: {v:.6e}" for k, v in coef.items()]


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fail(line: str) -> None:
    print(f"kvbench-calibrate: error: {line}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kvbench-calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs (with timeline.parquet and summary.json)")
    ap.add_argument("--out", type=Path, required=True,
                    help="engine config to write, e.g. configs/engine/sim_h100_llama3_2_1b.yaml")
    ap.add_argument("--weights", choices=("step", "run", "metrics"), default="step",
                    help="step: every step weighs the same (default); run: each run counts equally "
                         "(a step's squared error weighted by its run's steps / total time squared); metrics: "
                         "fit each run's mean TTFT, mean TPOT and (all requests at t=0) duration (fit_metrics; "
                         "needs each run's requests.parquet)")
    ap.add_argument("--step-weight", type=float, default=0.3,
                    help="with --weights metrics: weight of the run-weighted per-step error beside the metrics' "
                         "(> 0, default 0.3)")
    ap.add_argument("--mixed-own", action="store_true",
                    help="graph-replayed steps with prefill get their own fixed cost and price per decode row, "
                         "never below the decode-only step of their rows (graph_mixed_step_s, "
                         "graph_mixed_decode_token_s)")
    args = ap.parse_args(argv)
    if not 0 < args.step_weight < float("inf"):
        _fail(f"--step-weight must be a number > 0, got {args.step_weight}")
    frames, requests, devices, graph_max = [], [], set(), set()
    for run in args.runs:
        if not (run / "timeline.parquet").exists():
            _fail(f"{run} has no timeline.parquet (is it a run dir?)")
        if args.weights == "metrics":
            if not (run / "requests.parquet").exists():
                _fail(f"{run} has no requests.parquet (--weights metrics fits each run's request metrics)")
            requests.append(pd.read_parquet(run / "requests.parquet"))
        frames.append(pd.read_parquet(run / "timeline.parquet"))
        summary = json.loads((run / "summary.json").read_text())
        devices.add(f"{summary.get('device', '?')} · {summary.get('model', '?')}")
        graph_max.add(graph_prefill_tokens(run))
    if len({"prefill_pairs" in f for f in frames}) > 1:
        _fail("some runs' timelines have a prefill_pairs column and some do not: fit them separately")
    if len(graph_max) > 1:
        _fail(f"the runs replayed different step shapes from CUDA graphs (graph_max_tokens "
              f"{sorted(graph_max)}): fit them separately")
    timeline = pd.concat(frames, ignore_index=True)
    runs = np.concatenate([np.full(len(f), i) for i, f in enumerate(frames)]) if args.weights == "run" else None
    if args.weights == "metrics":
        coef = fit_metrics(frames, requests, graph_prefill_tokens=graph_max.pop(), step_weight=args.step_weight,
                           mixed_own=args.mixed_own)
    else:
        coef = fit(timeline, graph_prefill_tokens=graph_max.pop(), runs=runs, mixed_own=args.mixed_own)
    how = {"step": "", "run": " (each run counting equally: --weights run)",
           "metrics": f" (to each run's mean TTFT, mean TPOT, duration: --weights metrics --step-weight {args.step_weight})"}
    lines = [f"# Fitted by kvbench-calibrate from {len(timeline)} steps of {len(args.runs)} runs on {', '.join(sorted(devices))}"
             + how[args.weights],
             f"# relative error of the total step time: {fit_error(timeline, coef):.4f}",
             "defaults:", "  - sim", "  - _self_", f"device: fitted ({', '.join(sorted(devices))})"]
    lines += yaml_lines(coef)
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v:.3e}" for k, v in coef.items()))


if __name__ == "__main__":
    main()
