"""Strategies on the GPU, and how well the calibrated simulation predicts them.

1. Replays one trace slice through slab(max), slab(oracle), paged and radix with engine=gpu
   (real model, Triton kernels, CUDA-event step times), offline (all requests at t=0), and
   paged at finite request rates too.
2. Fits the sim's cost model to the measured steps (kvbench.calibrate.fit): all runs, and per strategy.
3. Replays each of those configs again with engine=sim and the fitted coefficients and reports
   the error of throughput, mean TTFT and mean TPOT, and whether the allocator made the same
   decisions (step by step: batch composition, admissions, preemptions, prefix hits); the
   cost model's error per step on the GPU's own batches; and whether the decisions come back
   exactly when the GPU run's step times are replayed (engine=recorded): then the clock is the
   only thing a simulation can get wrong.
4. Runs every config on the GPU a second time and reports how far the GPU reproduces itself
   (decisions, throughput, mean TTFT and TPOT): the floor under any simulation's error.
5. With --prefix-runs, also takes the GPU runs of `+experiment=gpu_prefix_saving` sweeps (other
   traces: shared prefix, multi-turn, Mooncake): their steps join the fits (one for all, per
   strategy, and per trace when there is more than one trace) and each is replayed in the sim
   and on its own clock like the cases above.
6. With --attention-check, replays each GPU run on its own clock once more, counting every
   step's prefill query-key pairs (not in the timeline), and fits its eager steps with and
   without them (DIR/attention_check.md): the evidence for the term the step model lacks on
   long prompts (Mooncake).

Stalls: a GPU step that took over 3x what the fitted model predicts (a just-in-time compile, a
hiccup of the host) is left out of the fits; the fidelity table counts them per run and gives
their excess time, and at finite rates the sim's mean TTFT is also compared with the GPU's
second run (a few stalls hold the requests queued behind them and move the mean TTFT of a
lightly loaded run by tens of per cent, run to run).

    python experiments/gpu_strategies.py --out DIR [--limit 400] [--model llama3_2_1b] [--prefix-runs SWEEP ...]

Writes DIR/runs/<name>/{gpu,sim_all,sim_<strategy>}/ run dirs, DIR/sim_fitted_{all,<strategy>}.yaml
(one cost model for every run, one per strategy, one per trace), DIR/strategies.md,
DIR/fidelity.md and DIR/gpu_strategies.json (each written through a temporary file and a rename). Run dirs that already hold a config's results are kept, so pointing
--out at the folder a GPU run left behind redoes only the simulations (on any machine).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from kvbench.calibrate import COEFFICIENTS, _nnls, fit, graph_prefill_tokens, predict, write_text_atomic, yaml_lines
from kvbench.engines.recorded import RecordedEngine
from kvbench.run import run
from kvbench.schema import register

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STRATEGIES = {"slab-max": ["strategy=slab"], "slab-oracle": ["strategy=slab", "strategy.reservation=oracle"],
              "paged-16": ["strategy=paged"], "radix-1": ["strategy=radix"]}
DECISIONS = ["running", "waiting", "prefill_tokens", "decode_tokens", "kv_read_tokens", "preemptions"]
STALL = 3.0  # a step over this many times the fitted model's time is a stall (kvbench.calibrate.fit)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


def cases(limit: int, rate_limit: int, args_limit_key: str = "limit") -> dict[str, list[str]]:
    out = {f"{name}_offline": [*ov, f"trace.{args_limit_key}={limit}", "trace.rate=inf"] for name, ov in STRATEGIES.items()}
    for rate in (4, 8):
        out[f"paged-16_rate{rate}"] = [*STRATEGIES["paged-16"], f"trace.{args_limit_key}={rate_limit}", f"trace.rate={rate}"]
    return out


def md_table(df: pd.DataFrame) -> str:
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


def rel_err(sim: float, gpu: float) -> float:
    return abs(sim - gpu) / abs(gpu) if gpu else float("nan")


def with_engine(base, engine_overrides: list[str], coef: dict | None = None):
    """`base` (a composed or saved run config) with its engine replaced by the one
    `engine_overrides` compose, coefficients `coef` set on it."""
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    engine = compose_cfg(engine_overrides).engine
    with open_dict(engine):
        for k, v in (coef or {}).items():
            engine[k] = v
    with open_dict(cfg):
        cfg.engine = engine
        cfg.progress = False
    return cfg


class PairCountingRecorded(RecordedEngine):
    """engine=recorded that also counts each step's prefill query-key pairs: the sum over its
    prefill chunks of n x (p + (n+1)/2) for a chunk of n tokens after p computed ones (what the
    extend kernel's attention does; the timeline does not carry it)."""

    pairs: list[float] = []

    def step(self, batch) -> float:
        PairCountingRecorded.pairs.append(float(sum(s.num_new * (s.start + (s.num_new + 1) / 2)
                                                    for s in batch.seqs if not s.is_decode)))
        return super().step(batch)


def attention_check(base, gpu_run: Path, out: Path, graph_max: int) -> dict:
    """The GPU run's eager steps fitted (non-negative least squares, 1, P, D, K) with and without
    the prefill query-key pairs A as a fifth input: the coefficient of A and the per-step errors."""
    PairCountingRecorded.pairs = []
    timeline = (gpu_run / "timeline.parquet").resolve()
    cfg = with_engine(base, ["engine=recorded", f"engine.timeline={timeline}"])
    with open_dict(cfg):
        cfg.engine._target_ = f"{__name__}.PairCountingRecorded"
        cfg.redo = True  # (the counts come from running it)
    run(cfg, out)
    t = pd.read_parquet(timeline)
    t["pairs"] = PairCountingRecorded.pairs[:len(t)]
    e = t[t.prefill_tokens > graph_max]
    y, row = e.dt_s.to_numpy(float), {"eager_steps": len(e)}
    for label, cols in (("without", ["prefill_tokens", "decode_tokens", "kv_read_tokens"]),
                        ("with", ["prefill_tokens", "decode_tokens", "kv_read_tokens", "pairs"])):
        if len(e) < len(cols) + 1:
            return row
        x = np.column_stack([np.ones(len(e)), e[cols].to_numpy(float)])
        c = _nnls(x, y)
        err = abs(x @ c - y) / y
        row |= {f"step_err_p50_{label}_A": float(np.median(err)), f"step_err_p90_{label}_A": float(np.quantile(err, 0.9))}
    row["s_per_pair"] = float(c[-1])
    return row


def same(ta: pd.DataFrame, tb: pd.DataFrame) -> bool:
    return len(ta) == len(tb) and bool((ta[DECISIONS].to_numpy() == tb[DECISIONS].to_numpy()).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=300, help="requests of the offline replays")
    ap.add_argument("--rate-limit", type=int, default=150, help="requests of the finite-rate replays")
    ap.add_argument("--model", default="llama3_2_1b")
    ap.add_argument("--trace", default="azure_conv")
    ap.add_argument("--capacity", type=int, default=131072, help="kv_capacity_tokens")
    ap.add_argument("--engine", default="gpu", help="gpu, or torch for a CPU smoke test (model=tiny)")
    ap.add_argument("--no-repeat", action="store_true", help="skip the second GPU run of each config")
    ap.add_argument("--cases", default=None, metavar="TEXT",
                    help="only the configs whose name contains TEXT (e.g. rate: paged-16_rate4 and _rate8)")
    ap.add_argument("--prefix-runs", nargs="*", type=Path, default=[],
                    help="sweep folders of +experiment=gpu_prefix_saving (GPU run dirs inside, each with "
                         "config.yaml, summary.json, timeline.parquet): fitted and replayed too")
    ap.add_argument("--fit-apart", nargs="*", default=["mooncake"],
                    help="traces whose runs get only their own fit, left out of the one-for-all and per-strategy "
                         "fits (default mooncake: its prefill chunks attend over up to 64k positions, a cost the "
                         "timeline's step inputs do not carry, see results/gpu_strategies/README.md)")
    ap.add_argument("--attention-check", action="store_true",
                    help="also replay each GPU run on its own clock counting prefill query-key pairs, and fit its eager "
                         "steps with and without them (DIR/attention_check.md)")
    ap.add_argument("--commit", default=None, help="commit of the GPU runs, for the reports (default: the summaries')")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides of the GPU runs, e.g. engine.graph_warmup=decode (graphs of steps with prefill "
                         "captured on first use, their capture time taken out of the step's: minutes less start-up)")
    args = ap.parse_args()
    register()
    common = [f"trace={args.trace}", f"model={args.model}", f"kv_capacity_tokens={args.capacity}"]
    todo = cases(args.limit, args.rate_limit, "limit" if args.trace not in ("synthetic",) else "num_requests")
    if args.cases is not None:
        todo = {n: ov for n, ov in todo.items() if args.cases in n}
        if not todo:
            print(f"gpu_strategies: --cases {args.cases!r} matches none of {sorted(cases(1, 1))}", file=sys.stderr)
            sys.exit(2)

    gpu, repeat = {}, []
    real = ["engine=gpu", "engine.cuda_graphs=true", *args.set] if args.engine == "gpu" else [f"engine={args.engine}"]
    for name, ov in todo.items():
        cfg = compose_cfg([*common, *ov, *real])
        gpu[name] = run(cfg, args.out / "runs" / name / "gpu")
        print(f"gpu  {name}: {gpu[name]['request_throughput']:.2f} req/s, wall {gpu[name]['wall_time_s']:.0f} s", flush=True)
    for name, ov in todo.items() if not args.no_repeat else ():   # the same config again: run-to-run noise
        again = run(compose_cfg([*common, *ov, *real]), args.out / "runs" / name / "gpu_repeat")
        ta, tb = (pd.read_parquet(args.out / "runs" / name / d / "timeline.parquet")[DECISIONS]
                  for d in ("gpu", "gpu_repeat"))
        g = gpu[name]
        repeat.append({"case": name, "steps": len(ta), "steps_repeat": len(tb),
                       "ttft_mean_ms": 1e3 * gpu[name]["ttft_mean_s"], "ttft_mean_ms_repeat": 1e3 * again["ttft_mean_s"],
                       "same_decisions": len(ta) == len(tb) and bool((ta.to_numpy() == tb.to_numpy()).all()),
                       "throughput_diff": rel_err(again["request_throughput"], g["request_throughput"]),
                       "ttft_mean_diff": rel_err(again["ttft_mean_s"], g["ttft_mean_s"]),
                       "tpot_mean_diff": rel_err(again["tpot_mean_s"], g["tpot_mean_s"])})

    # the prefix-saving sweeps' GPU runs: other traces, replayed from their saved configs
    gpu_dir = {n: args.out / "runs" / n / "gpu" for n in todo}
    base_cfg = {n: compose_cfg([*common, *ov]) for n, ov in todo.items()}
    for sweep in args.prefix_runs:
        for d in sorted(sweep.iterdir()):
            if not ((d / "summary.json").exists() and (d / "timeline.parquet").exists() and (d / "config.yaml").exists()):
                continue  # (a run cut short: no summary)
            name = f"{sweep.name}/{d.name}"
            gpu_dir[name], base_cfg[name] = d, OmegaConf.load(d / "config.yaml")
            gpu[name] = json.loads((d / "summary.json").read_text())
    # one cost model for every run, one per strategy (the kernels' cost depends a little on the
    # layout: contiguous slab, 16-token pages, 1-token pages), one per trace if there are several
    timeline = {n: pd.read_parquet(d / "timeline.parquet") for n, d in gpu_dir.items()}
    graph_max = {graph_prefill_tokens(d) for d in gpu_dir.values()}
    if len(graph_max) > 1:
        raise SystemExit(f"the GPU runs replayed different step shapes from CUDA graphs: {sorted(graph_max)}")
    graph_max = graph_max.pop()
    trace_of = {n: gpu[n].get("trace") or str(base_cfg[n].trace.name) for n in gpu_dir}
    shared = [n for n in gpu_dir if trace_of[n] not in args.fit_apart]
    groups = {"all": shared}
    for n in shared:
        groups.setdefault(gpu[n]["strategy"], []).append(n)
    if len(set(trace_of.values())) > 1:
        for n in gpu_dir:
            groups.setdefault(f"trace_{trace_of[n]}", []).append(n)
    coefs = {g: fit(pd.concat([timeline[n] for n in names], ignore_index=True), stall=STALL,
                    graph_prefill_tokens=graph_max) for g, names in groups.items()}
    device = gpu[next(iter(gpu))].get("device")
    commit = args.commit or gpu[next(iter(gpu))].get("commit", "?")
    for g, coef in coefs.items():
        write_text_atomic(args.out / f"sim_fitted_{g}.yaml",
                          f"# fitted by experiments/gpu_strategies.py on {device}, commit {commit}, model {args.model}, "
                          f"runs: {', '.join(groups[g])}\n"
                          "defaults:\n  - sim\n  - _self_\n" + "".join(line + "\n" for line in yaml_lines(coef)))

    rows, fidelity = [], []
    for name in gpu_dir:
        g, tl = gpu[name], timeline[name]
        out = args.out / "runs" / name
        # the GPU run's own step times, replayed: its decisions must come back exactly (the
        # clock is the only input the engines differ in); a divergence raises, naming the step
        timeline_path = (gpu_dir[name] / "timeline.parquet").resolve()
        run(with_engine(base_cfg[name], ["engine=recorded", f"engine.timeline={timeline_path}"]), out / "recorded")
        same_recorded = same(tl, pd.read_parquet(out / "recorded" / "timeline.parquet"))
        repeat_dir = gpu_dir[name].parent / "gpu_repeat"
        again = json.loads((repeat_dir / "summary.json").read_text()) if gpu_dir[name].name == "gpu" and (
            repeat_dir / "summary.json").exists() else None
        fits = ["all", *([g["strategy"]] if g["strategy"] in coefs else []),
                *([f"trace_{trace_of[name]}"] if f"trace_{trace_of[name]}" in coefs else [])]
        for fit_name in fits:
            coef = coefs[fit_name]
            sim = run(with_engine(base_cfg[name], ["engine=sim"], coef), out / f"sim_{fit_name}")
            ts = pd.read_parquet(out / f"sim_{fit_name}" / "timeline.parquet")
            # per-step error of the cost model on the GPU's own steps (same batches)
            pred = predict(tl, coef)
            dt = tl.dt_s.to_numpy()
            step_err = abs(pred - dt) / dt
            stall = dt > STALL * pred
            fidelity.append({"case": name, "trace": trace_of[name],
                             "fit": {"all": "one for all", g["strategy"]: "per strategy"}.get(fit_name, "per trace")
                             + ("" if name in groups[fit_name] else " (not fitted on it)"),
                             "steps_gpu": len(tl), "steps_sim": len(ts), "same_decisions": same(tl, ts),
                             "same_decisions_on_gpu_clock": same_recorded,
                             "step_err_p50": float(np.median(step_err)),
                             "step_err_p90": float(np.quantile(step_err, 0.9)),
                             "stall_steps": int(stall.sum()), "stall_excess_s": float((dt - pred)[stall].sum()),
                             "throughput_err": rel_err(sim["request_throughput"], g["request_throughput"]),
                             "ttft_mean_err": rel_err(sim["ttft_mean_s"], g["ttft_mean_s"]),
                             "tpot_mean_err": rel_err(sim["tpot_mean_s"], g["tpot_mean_s"]),
                             "ttft_p50_err": rel_err(sim["ttft_p50_s"], g["ttft_p50_s"]),
                             "ttft_mean_err_vs_repeat": rel_err(sim["ttft_mean_s"], again["ttft_mean_s"]) if again else float("nan"),
                             "total_time_err": float(pred.sum() / dt.sum() - 1)})
        rows.append({"case": name, "label": g["label"], "finished": g["finished"], "preemptions": g["preemptions"],
                     "req/s": g["request_throughput"], "out tok/s": g["output_throughput"],
                     "ttft p50 s": g["ttft_p50_s"], "ttft p99 s": g["ttft_p99_s"],
                     "tpot p50 ms": 1e3 * g["tpot_p50_s"], "tpot p99 ms": 1e3 * g["tpot_p99_s"],
                     "peak running": g["peak_running"], "mean running": g["mean_running"],
                     "waste": g["waste_frac"], "hit rate": g.get("prefix_hit_rate", 0.0),
                     "peak GPU GB": g.get("peak_gpu_mem_bytes", 0) / 1e9})
    table, fid = pd.DataFrame(rows), pd.DataFrame(fidelity)
    head = (f"device: {device}; commit {commit}; model {args.model} (random bf16 weights); trace {args.trace}; "
            f"kv_capacity_tokens={args.capacity}; prefix-saving sweeps: {', '.join(map(str, args.prefix_runs)) or 'none'}\n\n")
    write_text_atomic(args.out / "strategies.md", head + md_table(table))
    fitted = "".join(f"- {g}: " + ", ".join(f"{k}={c[k]:.3e}" for k in COEFFICIENTS) + "\n" for g, c in coefs.items())
    repeat_md = ""
    if repeat:  # stalls of each GPU run, counted against the one-for-all model
        for r in repeat:
            for key, d in (("stalls", "gpu"), ("stalls_repeat", "gpu_repeat")):
                t = pd.read_parquet(args.out / "runs" / r["case"] / d / "timeline.parquet")
                r[key] = int((t.dt_s.to_numpy() > STALL * predict(t, coefs["all"])).sum())
        repeat_md = ("\nthe GPU against itself (each config run twice; differences of the second run from the "
                     "first; stalls: steps over 3x the one-for-all model):\n\n" + md_table(pd.DataFrame(repeat)))
    write_text_atomic(args.out / "fidelity.md", head + "fitted cost models:\n\n" + fitted + "\n" + md_table(fid) + repeat_md)
    write_text_atomic(args.out / "gpu_strategies.json", json.dumps(
        {"device": device, "model": args.model, "trace": args.trace, "coefficients": coefs,
         "gpu": gpu, "fidelity": fidelity, "gpu_repeat": repeat, "fits": groups}, indent=2, default=str))
    if args.attention_check:
        att = pd.DataFrame([{"case": n, **attention_check(base_cfg[n], gpu_dir[n], args.out / "runs" / n / "recorded_pairs",
                                                           graph_max)} for n in gpu_dir])
        write_text_atomic(args.out / "attention_check.md", head + (
            "Each GPU run's eager steps (over graph_prefill_tokens prefill tokens) fitted by non-negative least squares "
            "on 1, prefill tokens P, decode tokens D, K/V positions read K, without and with the step's prefill "
            "query-key pairs A (sum over chunks of n x (p + (n+1)/2), counted by a replay on the run's own clock); "
            "s_per_pair: the coefficient of A.\n\n") + md_table(att))
        print(att.to_string(index=False))
    print(table.to_string(index=False))
    print(fid.to_string(index=False))
    if repeat:
        print(pd.DataFrame(repeat).to_string(index=False))


if __name__ == "__main__":
    main()
