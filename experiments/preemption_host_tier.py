#!/usr/bin/env python3
"""Tables and figures of the preemption_host_tier experiment (configs/experiment/preemption_host_tier.yaml):
recompute against swap, and the host tier's size, from the runs of its sweep folder.

    kvbench -m experiment=preemption_host_tier publish=true   # the runs, and kvbench-report's page
    python experiments/preemption_host_tier.py                # tables.md, host_tier_*.png

Reads each run's summary.json and config.yaml (the preemption mode is a config key, not a summary
key) under DIR (default results/multirun/preemption_host_tier) and the trace bounds that
kvbench-report wrote (hit_rate_bounds.csv in --out, or in DIR/report). Writes into --out (default
results/preemption_host_tier): tables.md (one table per trace), host_tier_latency.png (TTFT mean
and p99, throughput, TPOT, bytes copied against the host tier's size, a line per strategy and mode) and
host_tier_hits.png (prefix hit rate against the host tier's size, split by tier, against the
unbounded cache), and prints the cost per token of each way back from a preemption.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from kvbench.report.page import markdown_table  # noqa: E402

GB = 1e9


def fail(why: str) -> None:
    """Bad input: one line on stderr, exit 2."""
    print(f"preemption_host_tier: error: {why}", file=sys.stderr)
    sys.exit(2)


def load_runs(sweep: Path) -> tuple[pd.DataFrame, dict]:
    """One row per finished run under `sweep`; and the engine config of the first run."""
    rows, engine = [], {}
    for summary in sorted(sweep.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        cfg = OmegaConf.to_container(OmegaConf.load(summary.parent / "config.yaml"))
        engine = engine or {**cfg["engine"], "kv_bytes_per_token": s["kv_bytes_per_token"]}
        prompt = s["prefix_hit_tokens_gpu"] + s["prefix_hit_tokens_host"]
        rows.append({
            "trace": s["trace"], "strategy": s["label"].split("-host")[0], "preemption": cfg["scheduler"]["preemption"],
            "host_x": s["host_tier_tokens"] / s["kv_capacity_tokens"], "host_tokens": s["host_tier_tokens"],
            "finished": s["finished"], "rejected": s["rejected"], "preemptions": s["preemptions"],
            "req_s": s["request_throughput"], "out_tok_s": s["output_throughput"],
            "ttft_mean_ms": 1e3 * s["ttft_mean_s"], "ttft_p99_ms": 1e3 * s["ttft_p99_s"],
            "tpot_mean_ms": 1e3 * s["tpot_mean_s"], "tpot_p99_ms": 1e3 * s["tpot_p99_s"],
            "hit_rate": s["prefix_hit_rate"], "hit_tok_gpu": s["prefix_hit_tokens_gpu"],
            "hit_tok_host": s["prefix_hit_tokens_host"],
            "host_share": s["prefix_hit_tokens_host"] / prompt if prompt else 0.0,
            "swap_out_tok": s["swap_out_tokens"], "swap_in_tok": s["swap_in_tokens"],
            "d2h_GB": s["d2h_bytes"] / GB, "h2d_GB": s["h2d_bytes"] / GB,
            "copy_s": (s["d2h_bytes"] / cfg["engine"]["d2h_bytes_per_s"]
                       + s["h2d_bytes"] / cfg["engine"]["h2d_bytes_per_s"]),
            "duration_s": s["duration_s"], "num_requests": s["num_requests"],
        })
    if not rows:
        fail(f"no finished runs under {sweep}")
    df = pd.DataFrame(rows).sort_values(["trace", "strategy", "preemption", "host_x"], ignore_index=True)
    return df, engine


def break_even(engine: dict) -> str:
    """The modelled cost per token of each way back from a preemption."""
    kv = engine["kv_bytes_per_token"]
    swap = kv / engine["d2h_bytes_per_s"] + kv / engine["h2d_bytes_per_s"]
    recompute = engine["prefill_token_s"]
    bw = 2 * kv / recompute
    return (f"kv_bytes_per_token {kv} B; swap out + in {1e6 * swap:.2f} us/token "
            f"({1e6 * kv / engine['d2h_bytes_per_s']:.2f} + {1e6 * kv / engine['h2d_bytes_per_s']:.2f}); "
            f"recompute (prefill_token_s) {1e6 * recompute:.2f} us/token: swap is {recompute / swap:.1f}x cheaper "
            f"per token; break-even at {bw / GB:.1f} GB/s each way")


def read_bounds(bounds: Path | None) -> dict:
    """{(trace, block_size, policy): token hit rate} from kvbench-report's bounds: the unbounded
    cache, and Belady and LRU with a cache of the GPU pool's size (one pool in this experiment)."""
    if bounds is None or not bounds.exists():
        return {}
    return {(r.trace, int(r.block_size), r.policy): r.token_hit_rate for r in pd.read_csv(bounds).itertuples()}


def _block(strategy_label: str) -> int:
    return 1 if strategy_label.startswith("radix") else int(strategy_label.split("-")[-1])


def tables(df: pd.DataFrame, bound: dict) -> str:
    out = []
    for trace, g in df.groupby("trace"):
        g = g.drop(columns=["trace"]).copy()
        for strat in g.strategy.unique():
            found = {p: bound[(trace, _block(strat), p)] for p in ("unbounded", "belady", "lru")
                     if (trace, _block(strat), p) in bound}
            if found:
                out.append(f"{trace}, {strat}: hit rate bounds at {_block(strat)}-token blocks, one request at a "
                           f"time: " + ", ".join(f"{p} {v:.4f}" for p, v in found.items())
                           + " (belady, lru: a cache of the GPU pool's size)\n")
        out += [f"\n## {trace}\n", markdown_table(g), "\n"]
    return "\n".join(out)


def _host_axis(ax, xs: list[float]) -> None:
    """Host tier sizes as equally spaced categories (0, 1/4, 1, ... x the pool)."""
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_xlabel("host tier (x GPU pool)")


def latency_figure(df: pd.DataFrame, out: Path) -> None:
    cols = [("ttft_mean_ms", "TTFT mean (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"), ("req_s", "requests / s"),
            ("tpot_mean_ms", "TPOT mean (ms)"), ("moved_GB", "GB copied (d2h + h2d)")]
    df = df.assign(moved_GB=df.d2h_GB + df.h2d_GB)
    traces = sorted(df.trace.unique())
    fig, axes = plt.subplots(len(traces), len(cols), figsize=(4 * len(cols), 3.2 * len(traces)), squeeze=False)
    for i, trace in enumerate(traces):
        for j, (col, name) in enumerate(cols):
            ax = axes[i][j]
            xs = sorted(df.host_x.unique())
            for (strat, mode), g in df[df.trace == trace].groupby(["strategy", "preemption"]):
                ax.plot(g.host_x.map(xs.index), g[col], marker="o", ls="-" if mode == "recompute" else "--",
                        label=f"{strat} {mode}")
            _host_axis(ax, xs)
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            ax.set_title(f"{trace}: {name}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "host_tier_latency.png", dpi=80)
    plt.close(fig)


def hits_figure(df: pd.DataFrame, bound: dict, out: Path) -> None:
    traces = [t for t in sorted(df.trace.unique()) if df[df.trace == t].hit_rate.max() > 1e-3]
    if not traces:
        return
    fig, axes = plt.subplots(1, len(traces), figsize=(5.5 * len(traces), 3.6), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        g = df[(df.trace == trace) & (df.preemption == "recompute")]
        xs = sorted(g.host_x.unique())
        for strat, s in g.groupby("strategy"):
            x = s.host_x.map(xs.index)
            line = ax.plot(x, s.hit_rate, marker="o", label=f"{strat}: hit rate (first admissions)")[0]
            ax.plot(x, s.hit_rate * (1 - s.host_share), ls=":", color=line.get_color(),
                    label=f"{strat}: of which from the GPU (approx.)")
            for policy, ls, name in (("unbounded", "--", "unbounded cache"), ("belady", "-.", "Belady, GPU pool only")):
                if (trace, _block(strat), policy) in bound:
                    ax.axhline(bound[(trace, _block(strat), policy)], color=line.get_color(), ls=ls, lw=0.8,
                               label=f"{strat}: {name}")
        _host_axis(ax, xs)
        ax.set_ylim(0, 1)
        ax.set_ylabel("prompt tokens from cache")
        ax.set_title(f"{trace} (recompute)", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "host_tier_hits.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", nargs="?", type=Path, default=Path("results/multirun/preemption_host_tier"))
    p.add_argument("--out", type=Path, default=Path("results/preemption_host_tier"))
    a = p.parse_args(argv)
    if not a.sweep.is_dir():
        fail(f"no such folder: {a.sweep} (run kvbench -m experiment=preemption_host_tier)")
    df, engine = load_runs(a.sweep)
    bounds = next((b for b in (a.out / "hit_rate_bounds.csv", a.sweep / "report" / "hit_rate_bounds.csv")
                   if b.exists()), None)
    bound = read_bounds(bounds)
    a.out.mkdir(parents=True, exist_ok=True)
    text = break_even(engine)
    (a.out / "tables.md").write_text(f"# preemption_host_tier: tables\n\nMade with `python experiments/"
                                     f"preemption_host_tier.py {a.sweep}`. {text}.\n\n" + tables(df, bound))
    df.to_csv(a.out / "tables.csv", index=False)
    latency_figure(df, a.out)
    hits_figure(df, bound, a.out)
    print(text)
    print(f"preemption_host_tier: {len(df)} runs -> {a.out / 'tables.md'}")


if __name__ == "__main__":
    main()
