#!/usr/bin/env python3
"""Trace analysis: the prefix hit rate a trace allows, with an unbounded cache and with Belady's
optimal eviction (and LRU for contrast) at a range of cache capacities.

    python experiments/trace_stats.py --traces mooncake shared_prefix --block-size 16 \
        --out results/trace_analysis
    python experiments/trace_stats.py --traces mooncake --capacities 256 8192 trace.limit=1000

Trailing `key=value` words are Hydra overrides of kvbench's config (applied to every trace).
Capacities are in blocks (default: 12 log-spaced points up to the trace's distinct blocks).
Writes hit_rate_bounds.csv, hit_rate_bounds.md and hit_rate_vs_capacity.png into --out.
Definitions: kvbench/traces/belady.py. Rows: `unbounded` (the bound on what a server serves from
cache: earlier prompts and outputs cached, the last prompt token always computed; its
`prompt_reuse_*` columns: blocks of a prompt seen in an earlier prompt, every block counted, the
figure trace publishers give), then `belady` and `lru` at each capacity.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.report.page import markdown_table
from kvbench.report.style import colour
from kvbench.traces.belady import belady_hits, block_references, lru_hits, unbounded_hits

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load_trace(choice: str, overrides: list[str]):
    """The requests of trace group choice `choice` with kvbench's config and `overrides`."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from kvbench.schema import register

    register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"trace={choice}", *overrides])
    return instantiate(cfg.trace)


def analyse(name: str, requests, block_size: int, capacities: list[int] | None) -> pd.DataFrame:
    refs = block_references(requests, block_size)
    top = refs.num_blocks
    caps = capacities or sorted({max(1, int(c)) for c in np.geomspace(max(1, top / 2048), top, 12)})
    # reuse among prompts only (every prompt block, as trace publishers count it), then the bound
    prompts = unbounded_hits(block_references(requests, block_size, outputs=False, last_token_computed=False))
    rows = [{**unbounded_hits(refs).row(), "prompt_reuse_block_rate": prompts.block_hit_rate,
             "prompt_reuse_token_rate": prompts.token_hit_rate}]
    for c in caps:
        rows += [belady_hits(refs, c).row(), lru_hits(refs, c).row()]
    df = pd.DataFrame(rows)
    df.insert(0, "trace", name)
    df.insert(1, "requests", len(refs.starts) - 1)
    df.insert(2, "distinct_blocks", top)
    return df


def plot(df: pd.DataFrame, out: Path, mark_tokens: list[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(df.trace))
    fig, axes = plt.subplots(1, len(traces), figsize=(5.2 * len(traces), 3.8), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        d = df[df.trace == trace]
        unb = d[d.policy == "unbounded"].block_hit_rate.iloc[0] * 100
        for policy, c, style in (("belady", colour("radix-1"), "o-"), ("lru", colour("slab-pow2"), "s--")):
            p = d[d.policy == policy].sort_values("capacity_blocks")
            ax.plot(p.capacity_blocks, p.block_hit_rate * 100, style, color=c, ms=3,
                    label={"belady": "Belady (optimal)", "lru": "LRU (sequential)"}[policy])
        ax.axhline(unb, color="black", lw=1, label=f"unbounded cache ({unb:.1f} %)")
        bs = int(d.block_size.iloc[0])
        for tokens in mark_tokens:  # pool sizes the experiments use
            ax.axvline(tokens / bs, color="grey", ls=":", lw=1)
            ax.text(tokens / bs, 97, f" {tokens // 1024}k-token pool", fontsize=7, va="top", color="grey")
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"cache capacity [blocks of {bs} tokens]")
        ax.set_ylabel("block references that hit [%]")
        ax.set_title(f"{trace}: {int(d.requests.iloc[0])} requests, {int(d.distinct_blocks.iloc[0])} distinct blocks",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    path = out / "hit_rate_vs_capacity.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", nargs="+", default=["mooncake"], help="trace group choices (configs/trace/)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (a page)")
    p.add_argument("--capacities", type=int, nargs="*", help="cache capacities in blocks")
    p.add_argument("--out", type=Path, default=Path("results/runs/trace_analysis"),
                   help="where to write (default: not committed; --out results/trace_analysis publishes)")
    p.add_argument("--mark-tokens", type=int, nargs="*", default=[131072, 1048576],
                   help="pool sizes (tokens) to mark on the figure")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trace.limit=1000")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    frames = []
    for choice in a.traces:
        t0 = time.perf_counter()
        requests = load_trace(choice, a.overrides)
        df = analyse(choice, requests, a.block_size, a.capacities)
        frames.append(df)
        unb = df[df.policy == "unbounded"].iloc[0]
        print(f"{choice}: {len(requests)} requests, unbounded hit rate {unb.block_hit_rate:.1%} of "
              f"prompt blocks, {unb.token_hit_rate:.1%} of prompt tokens; reuse among prompts "
              f"{unb.prompt_reuse_block_rate:.1%} of blocks ({time.perf_counter() - t0:.1f} s)")
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(a.out / "hit_rate_bounds.csv", index=False)
    cols = ["trace", "policy", "block_size", "capacity_blocks", "block_hit_rate", "token_hit_rate"]
    (a.out / "hit_rate_bounds.md").write_text(markdown_table(df[cols]))
    print(f"wrote {plot(df, a.out, a.mark_tokens)} and hit_rate_bounds.csv/.md")


if __name__ == "__main__":
    main()
