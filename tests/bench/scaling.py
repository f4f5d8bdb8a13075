"""Cost per request and peak memory against trace length (issue 13: flat from 10k to 10M requests;
peak memory under 2 GiB at 1M and 16 GiB at 10M): a whole `kvbench.run.run` of the synthetic
trace (seed 0, rate 8 req/s, the default pool and sim engine) at growing sizes, one process per
size (so a size's peak RSS is its own), into a temporary run dir.

    python tests/bench/scaling.py                              # 10k, 100k, 1M; slab_oracle and paged
    python tests/bench/scaling.py --sizes 10000 --strategies paged
    python tests/bench/scaling.py --sizes 10000000 --strategies slab_oracle --append
    python tests/bench/scaling.py --plot-only                  # redraw the figure from the CSV
    python tests/bench/scaling.py --plot-only --extrapolate 10000000   # add extrapolated rows (not run)

Writes results/benchmarks/scaling.csv and scaling.png (each to a temporary name, then renamed):
strategy, requests, cpu_s (the run's CPU time: trace, replay, summary, files), us_per_request,
steps, peak_rss_mb (the process's, imports included), timeline_mb (the parquet file), kind
("measured", or "extrapolated": a straight line through the two largest measured sizes of the
strategy, for a size too long to run here). Not a test: a measurement, minutes to hours long
(docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "benchmarks"
FIELDS = ["strategy", "requests", "cpu_s", "us_per_request", "steps", "peak_rss_mb", "timeline_mb", "kind"]
GOALS_MB = {1_000_000: 2048, 10_000_000: 16384}  # issue 13's peak-memory goals

_ONE = """
import json, resource, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {bench!r})
from test_replay import compose_cfg
from kvbench.run import run
strategy, n = sys.argv[1], int(sys.argv[2])
cfg = compose_cfg(strategy, ["trace=synthetic", f"trace.num_requests={{n}}"])
with tempfile.TemporaryDirectory(prefix="kvbench-scaling-") as d:
    t = time.process_time()
    summary = run(cfg, Path(d))
    cpu = time.process_time() - t
    timeline_mb = (Path(d) / "timeline.parquet").stat().st_size / 2**20
print(json.dumps(dict(strategy=strategy, requests=n, cpu_s=round(cpu, 2), us_per_request=round(1e6 * cpu / n, 1),
                      steps=summary["num_steps"], peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      timeline_mb=round(timeline_mb, 1), kind="measured")))
"""


def measure(strategy: str, n: int) -> dict:
    code = _ONE.format(bench=str(REPO / "tests" / "bench"))
    out = subprocess.run([sys.executable, "-c", code, strategy, str(n)], check=True, capture_output=True,
                         text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def extrapolate(rows: list[dict], strategy: str, n: int) -> dict:
    """A size not run: CPU time and peak RSS on the line through the strategy's two largest sizes."""
    pts = sorted((int(r["requests"]), r) for r in rows if r["strategy"] == strategy and r["kind"] == "measured")
    (n0, a), (n1, b) = pts[-2], pts[-1]

    def line(key: str) -> float:
        return float(a[key]) + (float(b[key]) - float(a[key])) * (n - n0) / (n1 - n0)

    cpu = line("cpu_s")
    return dict(strategy=strategy, requests=n, cpu_s=round(cpu, 1), us_per_request=round(1e6 * cpu / n, 1),
                steps=round(line("steps")), peak_rss_mb=round(line("peak_rss_mb")),
                timeline_mb=round(line("timeline_mb"), 1), kind="extrapolated")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, mx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, strategy in enumerate(sorted({r["strategy"] for r in rows})):
        color = f"C{k}"
        for kind, style in (("measured", "-o"), ("extrapolated", "--o")):
            mine = sorted((int(r["requests"]), r) for r in rows if r["strategy"] == strategy
                          and (r["kind"] == kind or (kind == "extrapolated" and r["kind"] == "measured")))
            if kind == "extrapolated" and not any(r["kind"] == kind for _, r in mine):
                continue
            if kind == "extrapolated":  # the dashed segment from the largest measured size on
                mine = [p for p in mine if p[1]["kind"] == kind or p[0] == max(
                    n for n, r in mine if r["kind"] == "measured")]
            fill = color if kind == "measured" else "none"
            label = strategy if kind == "measured" else f"{strategy} (extrapolated)"
            ax.plot([n for n, _ in mine], [float(r["us_per_request"]) for _, r in mine], style, color=color,
                    mfc=fill, label=label)
            mx.plot([n for n, _ in mine], [float(r["peak_rss_mb"]) / 1024 for _, r in mine], style, color=color,
                    mfc=fill, label=label)
    for n, mb in GOALS_MB.items():
        mx.plot([n], [mb / 1024], "k_", ms=18, mew=2)
        mx.annotate(f"goal < {mb // 1024} GiB", (n, mb / 1024), textcoords="offset points", xytext=(-30, 6),
                    fontsize=8)
    for a in (ax, mx):
        a.set_xscale("log")
        a.set_xlabel("synthetic requests in the trace")
        a.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    mx.set_yscale("log")
    ax.set_ylabel("run CPU time per request (µs)")
    mx.set_ylabel("peak RSS of the run (GiB)")
    ax.set_title("cost per request (flat = linear)")
    mx.set_title("peak memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(sorted(rows, key=lambda r: (r["strategy"], int(r["requests"]))))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--strategies", nargs="+", default=["slab_oracle", "paged"])
    ap.add_argument("--extrapolate", type=int, nargs="*", default=[],
                    help="sizes to add as extrapolated rows (not run), for every strategy in the CSV")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--append", action="store_true", help="keep the CSV's other rows (same strategy and size: replaced)")
    args = ap.parse_args()
    csv_path = OUT / "scaling.csv"
    rows = []
    if (args.append or args.plot_only or args.extrapolate) and csv_path.is_file():
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
    if not args.plot_only:
        rows = [r for r in rows if not (r["strategy"] in args.strategies and int(r["requests"]) in args.sizes)]
        for strategy in args.strategies:
            for n in args.sizes:
                rows.append(measure(strategy, n))
                print(json.dumps(rows[-1]), flush=True)
                write_csv(rows, csv_path)  # after every size: a long sweep keeps what it measured
    for n in args.extrapolate:
        for strategy in sorted({r["strategy"] for r in rows}):
            rows = [r for r in rows if not (r["strategy"] == strategy and int(r["requests"]) == n
                                            and r["kind"] == "extrapolated")]
            if not any(r["strategy"] == strategy and int(r["requests"]) == n for r in rows):
                rows.append(extrapolate(rows, strategy, n))
    write_csv(rows, csv_path)
    plot(rows, OUT / "scaling.png")
    print(f"wrote {csv_path} and {OUT / 'scaling.png'}")


if __name__ == "__main__":
    main()
