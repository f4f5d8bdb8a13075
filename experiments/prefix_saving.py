"""What a prefix hit saves on the GPU: tables and a figure from `+experiment=gpu_prefix_saving` runs.

    python experiments/prefix_saving.py RUN_DIR [RUN_DIR ...] --out results/gpu_prefix_saving

Each RUN_DIR is a sweep folder of that experiment (one run per strategy, same model). Per model:
  - step time against prefill tokens computed (median per bin; decode-only steps as their own row),
  - a step's prefill cost: its time minus the median decode-only step of the same batch size
    (same run); the per-token prefill cost: the median of prefill cost / prefill tokens over the
    steps of the run without prefix caching,
  - the saving per cached token: (total prefill cost without caching - with caching) / cached
    tokens, against that per-token cost (ratio 1 = a hit saves exactly the compute it skips),
  - steps with a prefill of at most 64 tokens (a hit: only the question is computed) against
    decode-only steps of the same batch size (median of the per-step ratios),
  - TTFT (mean, p50, p99) with and without caching.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

BINS = [0, 1, 65, 257, 513, 1025, 2049, 8193]
LABELS = ["decode only", "1-64", "65-256", "257-512", "513-1024", "1025-2048", "2049-8192"]


def load(run: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    return (json.loads((run / "summary.json").read_text()), pd.read_parquet(run / "timeline.parquet"),
            pd.read_parquet(run / "requests.parquet"))


def prefill_cost(tl: pd.DataFrame) -> pd.DataFrame:
    """Steps with prefill, with `cost_s`: dt minus the median decode-only step of the same batch
    size (steps whose batch size never decoded alone are left out)."""
    dec = tl[tl.prefill_tokens == 0].groupby("running").dt_s.median()
    p = tl[(tl.prefill_tokens > 0) & tl.running.isin(dec.index)].copy()
    p["cost_s"] = p.dt_s - dec.loc[p.running].to_numpy()
    return p


def hit_vs_decode(tl: pd.DataFrame) -> float:
    """Median over steps with 1..64 prefill tokens of dt / (median dt of decode-only steps of the same batch)."""
    dec = tl[tl.prefill_tokens == 0].groupby("running").dt_s.median()
    hits = tl[(tl.prefill_tokens > 0) & (tl.prefill_tokens <= 64)]
    ratios = [r.dt_s / dec[r.running] for r in hits.itertuples() if r.running in dec.index]
    return float(np.median(ratios)) if ratios else float("nan")


def model_report(runs: dict[str, tuple[dict, pd.DataFrame, pd.DataFrame]]) -> dict:
    nocache = next(v for k, v in runs.items() if k.endswith("nocache"))
    base = prefill_cost(nocache[1])
    b = float((base.cost_s / base.prefill_tokens).median())
    out = dict(model=nocache[0].get("model"), device=nocache[0].get("device"), commit=nocache[0].get("commit"),
               prefill_cost_per_token_us=b * 1e6, runs={})
    base_prefill_s = base.cost_s.sum()
    for name, (summary, tl, req) in runs.items():
        fin = req[req.status == "finished"]
        cached = int(fin.cached_tokens.sum())
        prefill_s = prefill_cost(tl).cost_s.sum()
        row = dict(prefix_hit_rate=summary.get("prefix_hit_rate"), cached_tokens=cached,
                   ttft_mean_ms=fin.ttft_s.mean() * 1e3, ttft_p50_ms=fin.ttft_s.median() * 1e3,
                   ttft_p99_ms=fin.ttft_s.quantile(0.99) * 1e3, tpot_mean_ms=fin.tpot_s.mean() * 1e3,
                   request_throughput=summary.get("request_throughput"),
                   prefill_cost_s=prefill_s, hit_step_vs_decode_step=hit_vs_decode(tl),
                   slowest_step_ms=float(tl.dt_s.max()) * 1e3)
        if cached:
            row["saving_per_cached_token_us"] = (base_prefill_s - prefill_s) / cached * 1e6
            row["saving_vs_prefill_cost"] = row["saving_per_cached_token_us"] / (b * 1e6)
        bins = pd.cut(tl.prefill_tokens, BINS, right=False, labels=LABELS)
        g = tl.groupby(bins, observed=True)
        row["step_ms_by_prefill_tokens"] = {str(k): dict(steps=int(n), median_ms=float(m) * 1e3,
                                                         median_ms_per_prefill_token=float(pt) * 1e3)
                                            for k, n, m, pt in zip(g.dt_s.median().index, g.size(), g.dt_s.median(),
                                                                   (tl.dt_s / tl.prefill_tokens.clip(lower=1))
                                                                   .groupby(bins, observed=True).median())}
        out["runs"][name] = row
    return out


def figure(reports: list[dict], data: list[dict], path: Path, note: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(reports), figsize=(6 * len(reports), 8), squeeze=False)
    styles = {"paged": ("C0", "o"), "paged_nocache": ("C3", "x"), "radix": ("C2", "^")}
    for j, (rep, runs) in enumerate(zip(reports, data)):
        ax, cdf = axes[0, j], axes[1, j]
        for name, (_, tl, req) in runs.items():
            kind = next((k for k in ("paged_nocache", "radix", "paged") if name.endswith(k)), None)
            colour, marker = styles.get(kind, ("C7", "."))
            p = tl[tl.prefill_tokens > 0]
            ax.scatter(p.prefill_tokens, p.dt_s * 1e3, s=6, alpha=0.4, color=colour, marker=marker, label=name)
            t = np.sort(req.loc[req.status == "finished", "ttft_s"].to_numpy() * 1e3)
            cdf.plot(t, np.arange(1, len(t) + 1) / len(t), color=colour, label=name)
        ax.set(xscale="log", yscale="log", xlabel="prefill tokens computed in the step", ylabel="step time (ms)",
               title=f"{rep['model']} on {rep['device']}: steps with prefill")
        cdf.set(xscale="log", xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT")
        ax.legend(fontsize=8)
        cdf.legend(fontsize=8)
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/gpu_prefix_saving"))
    ap.add_argument("--note", default="", help="a line over the figure (commit, date, copy bandwidth)")
    args = ap.parse_args()
    reports, data = [], []
    for sweep in args.runs:
        runs = {d.name: load(d) for d in sorted(sweep.iterdir()) if (d / "summary.json").exists()}
        reports.append(model_report(runs))
        data.append(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(reports, data, args.out / "prefix_saving.png", args.note)
    text = json.dumps(reports, indent=1, default=float)
    fd, tmp = tempfile.mkstemp(dir=args.out)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, args.out / "prefix_saving.json")
    for rep in reports:
        print(f"\n{rep['model']} on {rep['device']}: prefill {rep['prefill_cost_per_token_us']:.2f} us/token")
        for name, r in rep["runs"].items():
            print(f"  {name:28s} hit {r['prefix_hit_rate']:.3f}  TTFT mean {r['ttft_mean_ms']:.1f} ms "
                  f"p50 {r['ttft_p50_ms']:.1f} p99 {r['ttft_p99_ms']:.1f}  TPOT {r['tpot_mean_ms']:.2f} ms  "
                  f"<=64-token prefill step / decode step {r['hit_step_vs_decode_step']:.2f}  "
                  f"saving/cached token {r.get('saving_per_cached_token_us', float('nan')):.2f} us "
                  f"(x{r.get('saving_vs_prefill_cost', float('nan')):.2f} of the prefill cost)")
            for k, v in r["step_ms_by_prefill_tokens"].items():
                print(f"      {k:>10s}: {v['steps']:6d} steps, median {v['median_ms']:.2f} ms, "
                      f"{v['median_ms_per_prefill_token']:.4f} ms/prefill token")


if __name__ == "__main__":
    main()
