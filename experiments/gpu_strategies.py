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

    python experiments/gpu_strategies.py --out DIR [--limit 400] [--model llama3_2_1b]

Writes DIR/runs/<name>/{gpu,sim_all,sim_<strategy>}/ run dirs, DIR/sim_fitted_{all,<strategy>}.yaml
(one cost model for every run, and one per strategy), DIR/strategies.md, DIR/fidelity.md and
DIR/gpu_strategies.json. Run dirs that already hold a config's results are kept, so pointing
--out at the folder a GPU run left behind redoes only the simulations (on any machine).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir

from kvbench.calibrate import COEFFICIENTS, fit, predict
from kvbench.run import run
from kvbench.schema import register

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STRATEGIES = {"slab-max": ["strategy=slab"], "slab-oracle": ["strategy=slab", "strategy.reservation=oracle"],
              "paged-16": ["strategy=paged"], "radix-1": ["strategy=radix"]}
DECISIONS = ["running", "waiting", "prefill_tokens", "decode_tokens", "kv_read_tokens", "preemptions"]


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
    args = ap.parse_args()
    register()
    common = [f"trace={args.trace}", f"model={args.model}", f"kv_capacity_tokens={args.capacity}"]
    todo = cases(args.limit, args.rate_limit, "limit" if args.trace not in ("synthetic",) else "num_requests")

    gpu, repeat = {}, []
    real = ["engine=gpu", "engine.cuda_graphs=true"] if args.engine == "gpu" else [f"engine={args.engine}"]
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
                       "same_decisions": len(ta) == len(tb) and bool((ta.to_numpy() == tb.to_numpy()).all()),
                       "throughput_diff": rel_err(again["request_throughput"], g["request_throughput"]),
                       "ttft_mean_diff": rel_err(again["ttft_mean_s"], g["ttft_mean_s"]),
                       "tpot_mean_diff": rel_err(again["tpot_mean_s"], g["tpot_mean_s"])})

    # one cost model for every run, and one per strategy (the kernels' cost depends a little on
    # the layout: contiguous slab, 16-token pages, 1-token pages)
    timeline = {n: pd.read_parquet(args.out / "runs" / n / "gpu" / "timeline.parquet") for n in todo}
    groups = {"all": list(todo)}
    for n in todo:
        groups.setdefault(gpu[n]["strategy"], []).append(n)
    coefs = {g: fit(pd.concat([timeline[n] for n in names], ignore_index=True)) for g, names in groups.items()}
    device = gpu[next(iter(gpu))].get("device")
    for g, coef in coefs.items():
        (args.out / f"sim_fitted_{g}.yaml").write_text(
            f"# fitted by experiments/gpu_strategies.py on {device}, model {args.model}, runs: {', '.join(groups[g])}\n"
            "defaults:\n  - sim\n  - _self_\n" + "".join(f"{k}: {v:.6e}\n" for k, v in coef.items()))

    rows, fidelity = [], []
    for name, ov in todo.items():
        g = gpu[name]
        tg = timeline[name][DECISIONS]
        # the GPU run's own step times, replayed: its decisions must come back exactly (the
        # clock is the only input the engines differ in); a divergence raises, naming the step
        timeline_path = (args.out / "runs" / name / "gpu" / "timeline.parquet").resolve()
        cfg = compose_cfg([*common, *ov, "engine=recorded", f"engine.timeline={timeline_path}"])
        run(cfg, args.out / "runs" / name / "recorded")
        tr = pd.read_parquet(args.out / "runs" / name / "recorded" / "timeline.parquet")[DECISIONS]
        same_recorded = len(tg) == len(tr) and bool((tg.to_numpy() == tr.to_numpy()).all())
        for fit_name in ("all", g["strategy"]):
            coef = coefs[fit_name]
            cfg = compose_cfg([*common, *ov, "engine=sim", *(f"engine.{k}={v!r}" for k, v in coef.items())])
            sim = run(cfg, args.out / "runs" / name / f"sim_{fit_name}")
            ts = pd.read_parquet(args.out / "runs" / name / f"sim_{fit_name}" / "timeline.parquet")[DECISIONS]
            same = len(tg) == len(ts) and bool((tg.to_numpy() == ts.to_numpy()).all())
            # per-step error of the cost model on the GPU's own steps (same batches)
            pred = predict(timeline[name], coef)
            step_err = abs(pred - timeline[name].dt_s.to_numpy()) / timeline[name].dt_s.to_numpy()
            fidelity.append({"case": name, "fit": "one for all" if fit_name == "all" else "per strategy",
                             "steps_gpu": len(tg), "steps_sim": len(ts), "same_decisions": same,
                             "same_decisions_on_gpu_clock": same_recorded,
                             "step_err_p50": float(np.median(step_err)),
                             "step_err_p90": float(np.quantile(step_err, 0.9)),
                             "throughput_err": rel_err(sim["request_throughput"], g["request_throughput"]),
                             "ttft_mean_err": rel_err(sim["ttft_mean_s"], g["ttft_mean_s"]),
                             "tpot_mean_err": rel_err(sim["tpot_mean_s"], g["tpot_mean_s"])})
        rows.append({"case": name, "label": g["label"], "finished": g["finished"], "preemptions": g["preemptions"],
                     "req/s": g["request_throughput"], "out tok/s": g["output_throughput"],
                     "ttft p50 s": g["ttft_p50_s"], "ttft p99 s": g["ttft_p99_s"],
                     "tpot p50 ms": 1e3 * g["tpot_p50_s"], "tpot p99 ms": 1e3 * g["tpot_p99_s"],
                     "peak running": g["peak_running"], "mean running": g["mean_running"],
                     "waste": g["waste_frac"], "peak GPU GB": g.get("peak_gpu_mem_bytes", 0) / 1e9})
    table, fid = pd.DataFrame(rows), pd.DataFrame(fidelity)
    head = f"device: {device}; model {args.model} (random bf16 weights); trace {args.trace}; kv_capacity_tokens={args.capacity}\n\n"
    (args.out / "strategies.md").write_text(head + md_table(table))
    fitted = "".join(f"- {g}: " + ", ".join(f"{k}={c[k]:.3e}" for k in COEFFICIENTS) + "\n" for g, c in coefs.items())
    repeat_md = ("\nthe GPU against itself (each config run twice; differences of the second run from the "
                 "first):\n\n" + md_table(pd.DataFrame(repeat))) if repeat else ""
    (args.out / "fidelity.md").write_text(head + "fitted cost models:\n\n" + fitted + "\n" + md_table(fid) + repeat_md)
    (args.out / "gpu_strategies.json").write_text(json.dumps(
        {"device": device, "model": args.model, "trace": args.trace, "coefficients": coefs,
         "gpu": gpu, "fidelity": fidelity, "gpu_repeat": repeat}, indent=2, default=str))
    print(table.to_string(index=False))
    print(fid.to_string(index=False))
    if repeat:
        print(pd.DataFrame(repeat).to_string(index=False))


if __name__ == "__main__":
    main()
