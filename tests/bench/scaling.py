"""Cost per request against trace length (issue 13: flat from 10k to 10M requests): replay the
synthetic trace (seed 0, rate 8 req/s, the default pool) at growing sizes, one process per size
(so a size's peak RSS is its own), and write the CPU time per request and the peak RSS.

    python tests/bench/scaling.py                          # 1k, 10k, 100k; slab_oracle and paged
    python tests/bench/scaling.py --sizes 1000 10000 --strategies paged
    python tests/bench/scaling.py --strategies radix --append   # add rows to the CSV
    python tests/bench/scaling.py --plot-only              # redraw the figure from the CSV

Writes results/benchmarks/scaling.csv (strategy, requests, trace_s, replay_s, us_per_request,
steps, peak_rss_mb) and scaling.png. Not a test: a measurement, minutes long (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "benchmarks"
FIELDS = ["strategy", "requests", "trace_s", "replay_s", "us_per_request", "steps", "peak_rss_mb"]

_ONE = """
import gc, json, resource, sys, time
sys.path.insert(0, {bench!r})
from hydra.utils import instantiate
from test_replay import compose_cfg
from kvbench.replay import replay
from kvbench.scheduler import Scheduler
strategy, n = sys.argv[1], int(sys.argv[2])
cfg = compose_cfg(strategy, ["trace=synthetic", f"trace.num_requests={{n}}"])
t = time.process_time()
requests = instantiate(cfg.trace)
trace_s = time.process_time() - t
st = instantiate(cfg.strategy, capacity_tokens=cfg.kv_capacity_tokens, max_model_len=cfg.max_model_len)
engine = instantiate(cfg.engine)
gc.collect()
t = time.process_time()
result = replay(requests, Scheduler(st, **cfg.scheduler), engine, progress=False)
replay_s = time.process_time() - t
print(json.dumps(dict(strategy=strategy, requests=n, trace_s=round(trace_s, 3), replay_s=round(replay_s, 3),
                      us_per_request=round(1e6 * replay_s / n, 1), steps=result.recorder.num_steps,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)))
"""


def measure(strategy: str, n: int) -> dict:
    code = _ONE.format(bench=str(REPO / "tests" / "bench"))
    out = subprocess.run([sys.executable, "-c", code, strategy, str(n)], check=True, capture_output=True,
                         text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for strategy in sorted({r["strategy"] for r in rows}):
        pts = sorted((int(r["requests"]), float(r["us_per_request"])) for r in rows if r["strategy"] == strategy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=strategy)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("synthetic requests in the trace")
    ax.set_ylabel("replay CPU time per request (µs)")
    ax.set_title("cost per request against trace length (flat = linear)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--strategies", nargs="+", default=["slab_oracle", "paged"])
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--append", action="store_true", help="keep the CSV's other rows (same strategy and size: replaced)")
    args = ap.parse_args()
    csv_path = OUT / "scaling.csv"
    if args.plot_only:
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        if args.append and csv_path.is_file():
            with open(csv_path) as f:
                rows = [r for r in csv.DictReader(f)
                        if not (r["strategy"] in args.strategies and int(r["requests"]) in args.sizes)]
        for strategy in args.strategies:
            for n in args.sizes:
                rows.append(measure(strategy, n))
                print(json.dumps(rows[-1]), flush=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
    plot(rows, OUT / "scaling.png")
    print(f"wrote {csv_path} and {OUT / 'scaling.png'}")


if __name__ == "__main__":
    main()
