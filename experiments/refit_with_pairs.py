"""One cost model, with the prefill query-key pair term, for every GPU run of a session: replay
each on its own clock (engine=recorded: the timeline then records prefill_pairs), fit once on all
steps, replay the sim with that model, and compare throughput, mean TTFT and mean TPOT with the GPU.

    python experiments/refit_with_pairs.py GPU_DIR --out DIR [--sweep NAME=DIR ...] [--fit-apart NAME ...]
        [--models ENGINE ...]

GPU_DIR holds `gs/runs/<case>/gpu` (experiments/gpu_strategies.py; optional: the 8B shape's
prefix-saving runs are fitted alone) and the prefix-saving sweeps `ps_mt/<run>`, `ps_mc/<run>`
(`kvbench -m experiment=gpu_prefix_saving ...`); --sweep adds more sweep folders of GPU run dirs
(their cases are NAME/<run>; a timeline that already has the prefill_pairs column is used as it is).
Runs whose case starts with a --fit-apart prefix are replayed but left out of the fits (e.g. a
sweep measured on a kernel build since reverted). --models names engine configs fitted before
(e.g. sim_h200_llama3_2_1b_multi_turn): each run is also replayed with each, a held-out check of
a shipped model on runs it was not fitted on (fit "model <name>").

Fits (kvbench.calibrate, stalls dropped: steps over STALL x the model):
  - one_metrics: one model fitted to each run's mean TTFT, mean TPOT and (runs at t=0) duration
    (`fit_metrics`: relative squared errors on the run's own decisions, first order, plus 0.3**2 x
    the run-weighted step error), the model of configs/engine/sim_h200_llama3_2_1b_all.yaml;
  - one_run_weighted: one model, each run counting equally (`fit(..., runs=)`: a step's squared
    error weighted by its run's n / T**2);
  - one_unweighted: one model, every step weighing the same (Mooncake's long steps dominate);
  - per_trace: one model per trace, unweighted (the comparison of before);
  - per_trace_metrics: one model per trace, fitted as one_metrics is.
Each run is replayed in the sim with each fit; with the one_metrics fit also with the GPU
run's stalls injected (`StallInjectedSim`: the excess of each GPU step over STALL x the model is
added to the sim step that starts at or after the GPU step's start), since a stall at the start
of a finite-rate run queues every request behind it and no step model can predict it.

Writes DIR/coef_<fit>.json, DIR/fidelity_one_model.csv (one row per run and fit) and
DIR/fidelity_one_model.md (the run dirs under DIR/runs)."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_strategies import CONFIGS, STALL, compose_cfg, md_table, register, rel_err, same, with_engine  # noqa: E402

from kvbench.calibrate import fit, fit_metrics, graph_prefill_tokens, held_by_stalls, predict, write_text_atomic  # noqa: E402
from kvbench.engines.sim import SimEngine  # noqa: E402
from kvbench.run import run  # noqa: E402


class StallInjectedSim(SimEngine):
    """engine=sim that adds each of `stalls` [(GPU step start s, excess s)] to the first step
    that starts at or after it. The sim's clock is tracked here: a step starts at the end of the
    one before, or at the latest arrival among its requests when the engine sat idle (run with
    fast_forward off: every step passes through `step`)."""

    stalls: list[tuple[float, float]] = []

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._end, self._todo = 0.0, sorted(StallInjectedSim.stalls)

    def step(self, batch) -> float:
        start = max([self._end] + [s.request.arrival_s for s in batch.seqs])
        dt = super().step(batch)
        while self._todo and self._todo[0][0] <= start + 1e-9:
            dt += self._todo.pop(0)[1]
        self._end = start + dt
        return dt


def summary_table(df: pd.DataFrame) -> str:
    """One row per run: throughput / mean TTFT / mean TPOT errors (per cent) of each fit, the
    GPU's own second run where there is one, and the stalls."""
    pct = lambda r: " / ".join(f"{100 * r[m]:.1f}" for m in ("throughput_err", "ttft_mean_err", "tpot_mean_err"))  # noqa: E731
    out = []
    for case, g in df.groupby("case", sort=False):
        by = {r.fit: r for r in g.itertuples()}
        first = g.iloc[0]
        row = {"case": case, "fitted": bool(first.fitted_on_it), "stalls": int(first.stall_steps)}
        for fit_name in ("one_metrics", "one_run_weighted", "one_unweighted", "per_trace", "per_trace_metrics",
                         "one_metrics+stalls", *sorted(f for f in by if f.startswith("model "))):
            row[fit_name] = pct(by[fit_name]._asdict()) if fit_name in by else ""
        if "ttft_mean_err_unheld" in g and not np.isnan(by["one_metrics"].ttft_mean_err_unheld):
            r = by["one_metrics"]
            row["one_metrics, requests no stall held"] = f"{100 * r.ttft_mean_err_unheld:.1f} / {100 * r.tpot_mean_err_unheld:.1f}"
        if "gpu_repeat_throughput_diff" in g and not np.isnan(first.gpu_repeat_throughput_diff):
            row["GPU run 2 vs run 1"] = " / ".join(f"{100 * first[f'gpu_repeat_{m}_diff']:.1f}"
                                                  for m in ("throughput", "ttft_mean", "tpot_mean"))
        out.append(row)
    table = pd.DataFrame(out).fillna("")
    return ("Per run, |relative error| in per cent, throughput / mean TTFT / mean TPOT (TTFT / TPOT where "
            "named):\n\n" + md_table(table))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gpu_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sweep", nargs="*", default=[], help="NAME=DIR: more gpu_prefix_saving sweep folders")
    ap.add_argument("--fit-apart", nargs="*", default=[], help="case prefixes replayed but not fitted")
    ap.add_argument("--mixed-own", action="store_true",
                    help="graph-replayed steps with prefill get their own fixed cost and price per decode row "
                         "(kvbench.calibrate.fit's mixed_own)")
    ap.add_argument("--models", nargs="*", default=[], metavar="ENGINE",
                    help="engine configs (configs/engine/<name>.yaml) fitted before, replayed on every run too")
    ap.add_argument("--leave-one-out", action="store_true",
                    help="also fit one_metrics without each fitted run in turn and replay that run with it "
                         "(DIR/leave_one_out.csv: the one model's error on a run it was not fitted on)")
    args = ap.parse_args()
    sweeps = {"ps_mt": args.gpu_dir / "ps_mt", "ps_mc": args.gpu_dir / "ps_mc"}
    for item in args.sweep:
        name, _, path = item.partition("=")
        if not (name and path and Path(path).is_dir()):
            print(f"refit_with_pairs: error: --sweep {item!r} is not NAME=DIR of an existing folder", file=sys.stderr)
            sys.exit(2)
        sweeps[name] = Path(path)
    register()
    shipped = {}
    for m in args.models:
        if not (CONFIGS / "engine" / f"{m}.yaml").exists():
            print(f"refit_with_pairs: error: --models {m!r}: no configs/engine/{m}.yaml", file=sys.stderr)
            sys.exit(2)
        shipped[m] = {k: v for k, v in OmegaConf.to_container(compose_cfg([f"engine={m}"]).engine).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
    R = args.gpu_dir
    # (gs/runs also holds gpu_strategies' sim replays of the sweeps' runs: runs/ps_*/<run>/sim_*, no gpu/)
    dirs = {f"gs/{d.parent.name}": d for d in sorted(p.parent for p in (R / "gs" / "runs").glob("*/gpu/summary.json"))}
    for sweep, folder in sweeps.items():  # run dirs that finished (a summary.json)
        dirs |= {f"{sweep}/{d.name}": d for d in sorted(folder.glob("*/summary.json")) for d in [d.parent]}
    if not dirs:
        print(f"refit_with_pairs: error: no finished GPU run under {args.gpu_dir} (gs/runs/*/gpu, ps_mt, ps_mc) "
              "or the --sweep folders", file=sys.stderr)
        sys.exit(2)
    out = args.out / "runs"
    tls, base, gpu, rep, trace, reqs = {}, {}, {}, {}, {}, {}
    for k, d in dirs.items():
        base[k] = OmegaConf.load(d / "config.yaml")
        gpu[k] = json.loads((d / "summary.json").read_text())
        trace[k] = gpu[k].get("trace") or str(base[k].trace.name)
        r = d.parent / "gpu_repeat" / "summary.json"
        rep[k] = json.loads(r.read_text()) if d.name == "gpu" and r.exists() else None
        reqs[k] = pd.read_parquet(d / "requests.parquet")
        t = pd.read_parquet(d / "timeline.parquet")
        if "prefill_pairs" not in t:  # older timelines: a replay on the run's own clock counts them
            o = out / k.replace("/", "_") / "recorded"
            if not (o / "timeline.parquet").exists():
                run(with_engine(base[k], ["engine=recorded", f"engine.timeline={(d / 'timeline.parquet').resolve()}"]), o)
            t = pd.read_parquet(o / "timeline.parquet")
        tls[k] = t
    fitted = [k for k in dirs if not any(k.startswith(p) for p in args.fit_apart)]
    gm = {graph_prefill_tokens(d) for d in dirs.values()}
    if len(gm) > 1:
        raise SystemExit(f"refit_with_pairs: the runs replayed different step shapes from CUDA graphs: {sorted(gm)}")
    gm = gm.pop()
    steps = pd.concat([tls[k] for k in fitted], ignore_index=True)
    labels = np.concatenate([[k] * len(tls[k]) for k in fitted])
    coefs = {"one_metrics": fit_metrics([tls[k] for k in fitted], [reqs[k] for k in fitted], stall=STALL,
                                        graph_prefill_tokens=gm, mixed_own=args.mixed_own),
             "one_run_weighted": fit(steps, stall=STALL, graph_prefill_tokens=gm, runs=labels, mixed_own=args.mixed_own),
             "one_unweighted": fit(steps, stall=STALL, graph_prefill_tokens=gm, mixed_own=args.mixed_own)}
    for tr in sorted({trace[k] for k in fitted}):
        names = [k for k in fitted if trace[k] == tr]
        coefs[f"trace_{tr}"] = fit(pd.concat([tls[k] for k in names], ignore_index=True), stall=STALL,
                                   graph_prefill_tokens=gm, mixed_own=args.mixed_own)
        coefs[f"trace_metrics_{tr}"] = fit_metrics([tls[k] for k in names], [reqs[k] for k in names], stall=STALL,
                                                   graph_prefill_tokens=gm, mixed_own=args.mixed_own)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, coef in coefs.items():
        write_text_atomic(args.out / f"coef_{name}.json", json.dumps(coef, indent=1) + "\n")
    rows = []
    chosen = coefs["one_metrics"]
    for k in dirs:
        g, t = gpu[k], tls[k]
        dt = t.dt_s.to_numpy(float)
        pred = predict(t, chosen)
        stall = dt > STALL * pred
        spread = {}
        if rep[k]:
            spread = {f"gpu_repeat_{m}_diff": rel_err(rep[k][key], g[key]) for m, key in (
                ("throughput", "request_throughput"), ("ttft_mean", "ttft_mean_s"), ("tpot_mean", "tpot_mean_s"))}
        runs = [("one_metrics", chosen, False), ("one_run_weighted", coefs["one_run_weighted"], False),
                ("one_unweighted", coefs["one_unweighted"], False)]
        if f"trace_{trace[k]}" in coefs:
            runs += [("per_trace", coefs[f"trace_{trace[k]}"], False),
                     ("per_trace_metrics", coefs[f"trace_metrics_{trace[k]}"], False)]
        if stall.any():
            runs.append(("one_metrics+stalls", chosen, True))
        runs += [(f"model {m}", coef, False) for m, coef in shipped.items()]
        for fit_name, coef, inject in runs:
            o = out / k.replace("/", "_") / f"sim_{fit_name.replace('+', '_')}"
            cfg = with_engine(base[k], ["engine=sim"], coef)
            if inject:
                StallInjectedSim.stalls = list(zip(t.t_s.to_numpy(float)[stall], (dt - pred)[stall]))
                with open_dict(cfg):
                    cfg.engine._target_ = f"{__name__}.StallInjectedSim"
                    cfg.engine.fast_forward = False
                    cfg.redo = True
            s = run(cfg, o)
            ts = pd.read_parquet(o / "timeline.parquet")
            p = predict(t, coef)
            unheld = {}
            if stall.any() and reqs[k].arrival_s.max() > 0:  # the requests no stall held, both sides (same ids);
                # (at t=0 a stall holds every request: no such subset)
                rg = reqs[k][reqs[k].status == "finished"]
                rg = rg[~held_by_stalls(t, rg, stall)]
                rs = pd.read_parquet(o / "requests.parquet").set_index("id").loc[rg.id]
                unheld = dict(unheld_requests=len(rg),
                              ttft_mean_err_unheld=rel_err(rs.ttft_s.mean(), rg.ttft_s.mean()),
                              tpot_mean_err_unheld=rel_err(rs.tpot_s.mean(), rg.tpot_s.mean()))
            rows.append(dict(case=k, trace=trace[k], fit=fit_name, fitted_on_it=k in fitted and not fit_name.startswith("model "),
                             same_decisions=same(t, ts), stall_steps=int(stall.sum()),
                             stall_excess_s=float((dt - pred)[stall].sum()),
                             step_err_p50=float(np.median(abs(p - dt) / dt)),
                             total_time_err=float(p[~stall].sum() / dt[~stall].sum() - 1),
                             throughput_err=rel_err(s["request_throughput"], g["request_throughput"]),
                             ttft_mean_err=rel_err(s["ttft_mean_s"], g["ttft_mean_s"]),
                             tpot_mean_err=rel_err(s["tpot_mean_s"], g["tpot_mean_s"]), **unheld, **spread))
            print(json.dumps(rows[-1]), flush=True)
    if args.leave_one_out:
        loo = []
        for k in fitted:
            rest = [n for n in fitted if n != k]
            coef = fit_metrics([tls[n] for n in rest], [reqs[n] for n in rest], stall=STALL, graph_prefill_tokens=gm, mixed_own=args.mixed_own)
            s = run(with_engine(base[k], ["engine=sim"], coef), out / k.replace("/", "_") / "sim_leave_one_out")
            g = gpu[k]
            loo.append(dict(case=k, throughput_err=rel_err(s["request_throughput"], g["request_throughput"]),
                            ttft_mean_err=rel_err(s["ttft_mean_s"], g["ttft_mean_s"]),
                            tpot_mean_err=rel_err(s["tpot_mean_s"], g["tpot_mean_s"])))
            print("leave-one-out", json.dumps(loo[-1]), flush=True)
        write_text_atomic(args.out / "leave_one_out.csv", pd.DataFrame(loo).to_csv(index=False))
    df = pd.DataFrame(rows)
    write_text_atomic(args.out / "fidelity_one_model.csv", df.to_csv(index=False))
    head = (f"Sim against GPU (H200), each run and fit; fitted on {len(fitted)} runs ({len(steps)} steps), "
            f"not fitted: {', '.join(k for k in dirs if k not in fitted) or 'none'}. Errors relative; "
            "stalls: GPU steps over STALL x the one_metrics model; +stalls: the sim with those steps' "
            "excess injected at the same start time; *_unheld: over the requests no stall held "
            "(kvbench.calibrate.held_by_stalls).\n\n")
    write_text_atomic(args.out / "fidelity_one_model.md", head + summary_table(df) + "\nEvery row:\n\n" + md_table(df))
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
