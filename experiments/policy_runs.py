#!/usr/bin/env python3
"""The table of a policy experiment (eviction_gap, scheduling): one row per run with the prefix
hit rate against what the trace allowed, throughput, and TTFT to the worst case; optionally runs
paged with Belady eviction first (offline: no sweep value can hand it the trace's future).

    python experiments/policy_runs.py results/multirun/eviction_gap --belady eviction_gap --report results/eviction_gap/sweep
    python experiments/policy_runs.py results/multirun/scheduling --report results/scheduling/sweep

`--belady EXPERIMENT`: compose configs/experiment/EXPERIMENT.yaml (its fixed keys and the first
value of each swept key but the eviction) with `strategy.eviction` = Belady built from the same
trace config (`paged_future`), run it into `<DIR>_belady/`, and put it in the table. Trailing
`key=value` words are Hydra overrides of that run (e.g. trace.limit=200). A folder that does not
exist adds no row. Columns: `hit` (prompt tokens from cache), `bound` (the trace's unbounded
cache at the run's page size: what no order or policy can beat, kvbench/traces/belady.py),
`hit/bound`, requests and output tokens per second, TTFT mean / p99 / max, TPOT mean / p99 (ms),
preemptions, and the prefill tokens computed (millions; recomputes after preemptions included).
`--out FILE` writes the markdown table too; `--report DIR` writes kvbench-report's page of all
the runs into DIR.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BELADY = ("{_target_: kvbench.strategies.eviction.belady.Belady, future: {_target_: "
          "kvbench.strategies.eviction.belady.paged_future, requests: ${trace}, page_size: ${strategy.page_size}}}")


def run_belady(experiment: str, out: Path, overrides: list[str]) -> dict:
    """Paged with Belady on `experiment`'s setting (first value of each swept key but the
    eviction), into `out`. Returns the run's summary."""
    from hydra import compose, initialize_config_dir

    from kvbench.run import run
    from kvbench.schema import register

    register()
    params = OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    pinned = [f"{k}={str(v).split(',')[0]}" for k, v in params.items() if k != "strategy.eviction"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", *pinned, f"strategy.eviction={BELADY}",
                                           *overrides])
    return run(cfg, out)


_BOUNDS: dict[str, float] = {}
_ORDER = {"fcfs": 0, "lpm": 1, "dfs_weight": 2}


def unbounded_rate(run_dir: Path) -> float:
    """The unbounded-cache hit rate of the run's trace at its page size (cached per trace config)."""
    from hydra.utils import instantiate

    from kvbench.traces.belady import block_references, unbounded_hits

    cfg = OmegaConf.load(run_dir / "config.yaml")
    key = json.dumps([OmegaConf.to_container(cfg.trace), int(cfg.strategy.get("page_size", 1))], sort_keys=True)
    if key not in _BOUNDS:
        reqs = instantiate(cfg.trace)
        _BOUNDS[key] = unbounded_hits(block_references(reqs, int(cfg.strategy.get("page_size", 1)))).token_hit_rate
    return _BOUNDS[key]


def table(dirs: list[Path]) -> pd.DataFrame:
    rows = []
    for d in dirs:
        for summary in sorted(Path(d).rglob("summary.json")) if Path(d).is_dir() else []:
            run_dir = summary.parent
            if "report" in run_dir.parts:
                continue
            s = json.loads(summary.read_text())
            cfg = OmegaConf.load(run_dir / "config.yaml")
            req = pd.read_parquet(run_dir / "requests.parquet", columns=["ttft_s"])
            prefill = pd.read_parquet(run_dir / "timeline.parquet", columns=["prefill_tokens"]).prefill_tokens.sum()
            bound = unbounded_rate(run_dir)
            rows.append({"label": s["label"], "trace": s["trace"], "order": cfg.scheduler.get("policy", "fcfs"),
                         "requests": s["num_requests"], "hit": s["prefix_hit_rate"], "bound": bound,
                         "hit/bound": s["prefix_hit_rate"] / bound if bound else float("nan"),
                         "req/s": s["request_throughput"], "out tok/s": s["output_throughput"],
                         "TTFT mean s": s["ttft_mean_s"], "TTFT p99 s": s["ttft_p99_s"], "TTFT max s": req.ttft_s.max(),
                         "TPOT mean ms": s["tpot_mean_s"] * 1e3, "TPOT p99 ms": s["tpot_p99_s"] * 1e3,
                         "preemptions": s["preemptions"], "prefill M tok": prefill / 1e6})
    df = pd.DataFrame(rows)
    return df.sort_values(["trace", "label", "order"], key=lambda c: c.map(_ORDER.get) if c.name == "order" else c,
                          ignore_index=True) if len(df) else df


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="a sweep or run folder")
    p.add_argument("--belady", metavar="EXPERIMENT", help="first run paged with Belady on this experiment's setting")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--report", type=Path, help="write kvbench-report's page of all the runs into this folder")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the Belady run, e.g. trace.limit=200")
    a = p.parse_args(argv)
    if a.belady and not (CONFIG_DIR / "experiment" / f"{a.belady}.yaml").is_file():
        print(f"policy_runs: error: no experiment {a.belady!r} in {CONFIG_DIR / 'experiment'}", file=sys.stderr)
        sys.exit(2)
    dirs = [a.dir]
    if a.belady:
        belady_dir = a.dir.with_name(a.dir.name + "_belady")
        s = run_belady(a.belady, belady_dir, a.overrides)
        print(f"belady: hit {s['prefix_hit_rate']:.4f}, {s['request_throughput']:.3f} req/s -> {belady_dir}")
        dirs.append(belady_dir)
    df = table(dirs)
    if df.empty:
        print(f"policy_runs: no finished run under {', '.join(map(str, dirs))}")
        return
    from kvbench.report.page import markdown_table

    text = markdown_table(df.round(4))
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    if a.report:
        from kvbench.report.writer import write_report

        out, _ = write_report([d for d in dirs if d.is_dir()], a.report, f"{a.dir.name}: policies under load")
        print(f"report -> {out}")


if __name__ == "__main__":
    main()
