"""The report's figures about caching: prefix hit rates against the trace's bounds, and what
a page size costs (waste, hits, kernel time). Same contract as kvbench.report.figures."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.report.collect import Collection
from kvbench.report.figures import HIT_MIN, Figure, _ordered, _save, log2_axis, representative, subplots
from kvbench.report.style import colour, label_order, line_style


MAX_BOUND_REFS = 8_000_000  # block references a bound may walk (Belady and LRU: ~1 s per million)


def bound_block_sizes(runs: pd.DataFrame, requests: list, default: int) -> list[int]:
    """The block sizes to bound `runs` (one trace's runs with prefix hits) at: each page size
    they ran with, where the trace is small enough at it; `default` if none is.

    A run with pages of p tokens is bounded by the trace's bound at blocks of p tokens (only
    whole pages are shared), not at a larger block; a smaller one bounds it too, more loosely."""
    sizes = sorted({int(p) for p in runs.page_size.dropna()}) if "page_size" in runs else []
    tokens = sum(r.kv_len for r in requests)
    fit = [b for b in sizes if tokens // b <= MAX_BOUND_REFS]
    for b in sorted(set(sizes) - set(fit)):
        print(f"kvbench-report: no hit-rate bound at {b}-token blocks ({tokens // b:,} block references; "
              f"the limit is {MAX_BOUND_REFS:,})", file=sys.stderr)
    return fit or [default]


def prefix_hits(col: Collection, out: Path, bounds: pd.DataFrame | None = None) -> Figure | None:
    """Prefix hit rate per strategy, per trace (and pool size), beside what the trace allowed."""
    t = col.table
    if not len(t) or "prefix_hit_rate" not in t or (t.prefix_hit_rate.fillna(0) < HIT_MIN).all():
        return None
    keys = ["trace", "kv_capacity_tokens"] if t.kv_capacity_tokens.nunique() > 1 else ["trace"]
    reps = representative(_ordered(t), keys)
    groups = list(reps.groupby(keys, sort=True))
    labels = label_order(reps.label)
    width = 0.8 / len(labels)
    fig, ax = subplots(figsize=(max(6, 1.6 * len(groups) + 3, 0.3 * len(labels) * len(groups) + 3), 4))
    for i, lab in enumerate(labels):
        for k, (_, g) in enumerate(groups):
            v = g[g.label == lab].prefix_hit_rate
            if not len(v):
                continue
            x = k + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, v.iloc[0] * 100, width, color=colour(lab), hatch=line_style(lab).hatch, edgecolor="white",
                   linewidth=0.3, label=lab if k == 0 else None)
            ax.text(x, 2, f"{v.iloc[0] * 100:.1f}", ha="center", va="bottom", rotation=90, fontsize=6,
                    bbox=dict(facecolor="white", alpha=0.85, lw=0, pad=0.6))  # at the foot: clear of the bound lines
    styles = {"unbounded": ("-", "unbounded cache"), "belady": ("--", "Belady at the pool size"),
              "lru": (":", "LRU at the pool size (sequential)")}
    ticked = False
    for k, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        if bounds is None or not len(bounds):
            break
        b = bounds[bounds.trace == key[0]]
        if not len(b):
            continue
        cap, smallest = int(g.kv_capacity_tokens.iloc[0]), int(b.block_size.min())
        for policy, (style, name) in styles.items():  # lines: at the smallest page size bounded
            v = b[(b.policy == policy) & (b.block_size == smallest)
                  & ((policy == "unbounded") | (b.capacity_tokens == cap))].token_hit_rate
            if len(v):
                ax.hlines(v.iloc[0] * 100, k - 0.45, k + 0.45, colors="black", linestyles=style,
                          label=f"{name}, {smallest}-token blocks" if k == 0 else None)
        if b.block_size.nunique() < 2 or "page_size" not in g:
            continue
        for i, lab in enumerate(labels):  # ticks: each bar's own bound, at its page size
            run = g[g.label == lab]
            if not len(run) or pd.isna(run.page_size.iloc[0]) or int(run.page_size.iloc[0]) == smallest:
                continue
            v = b[(b.policy == "unbounded") & (b.block_size == int(run.page_size.iloc[0]))].token_hit_rate
            if len(v):
                x = k + (i - (len(labels) - 1) / 2) * width
                ax.hlines(v.iloc[0] * 100, x - width / 2, x + width / 2, colors="black", linewidth=2,
                          label=None if ticked else "unbounded cache at the bar's page size")
                ticked = True
    names = [f"{key[0]}\n{int(key[1]) // 1024}k-token pool" if isinstance(key, tuple) and len(key) > 1 else
             (key[0] if isinstance(key, tuple) else key) for key, _ in groups]
    ax.set_xticks(np.arange(len(groups)), names, fontsize=8)
    ax.set_ylabel("prompt tokens served from cache [%]")
    ax.set_title("prefix hit rate per strategy, and what the trace allowed", fontsize=10)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, out, "prefix_hit_rate.png")
    return Figure("prefix_hit_rate.png", "Prefix hit rate",
                  "Share of prompt tokens each strategy served from its prefix cache; black lines "
                  "are what the trace allowed: an unbounded cache (no server that shares whole pages "
                  "of that size and admits in arrival order can do better; the cache holds every "
                  "prompt and output token that got K/V, and a prompt's last token is always "
                  "computed), and Belady's optimal eviction and LRU with a cache as large as the "
                  "whole pool, requests served one at a time (kvbench/traces/belady.py), at the "
                  "smallest page size of the runs; a short bar over a run is the unbounded cache at "
                  "that run's own page size. A real server also holds its running requests in the "
                  "pool, so it stays below the Belady line in practice (not by proof: a request "
                  "may find pages of an earlier one that is still running).")


def vs_page_size(col: Collection, out: Path, kernel_times: pd.DataFrame | None = None) -> Figure | None:
    """Waste, internal fragmentation and hit rate against page size (and kernel time if given)."""
    t = col.table
    if not len(t) or "page_size" not in t or t.groupby(["trace", "strategy"]).page_size.nunique().max() < 2:
        return None
    panels = [("waste_frac", "waste [% of held memory]", 100), ("held_internal_frag_frac",
              "internal fragmentation [% of held]", 100), ("prefix_hit_rate", "prefix hit rate [%]", 100),
              ("output_throughput", "output throughput [tok/s]", 1)]
    extra = kernel_times is not None and len(kernel_times)
    fig, axes = subplots(1, len(panels) + bool(extra), figsize=(3.6 * (len(panels) + bool(extra)), 3.6))
    for trace, style in zip(sorted(t.trace.unique()), ("o-", "s--", "^:", "d-.")):
        for (strategy, caching), d in t[t.trace == trace].groupby(["strategy", t.prefix_caching.fillna(True)]):
            d = d.sort_values("page_size")
            name = strategy + ("" if caching else "-nocache")
            for ax, (m, _, k) in zip(axes, panels):
                ax.plot(d.page_size, d[m] * k, style, color=colour(name), label=f"{name} · {trace}")
    for ax, (_, ylabel, _) in zip(axes, panels):
        ax.set_ylabel(ylabel)
    if extra:
        ax = axes[-1]
        paged = kernel_times[kernel_times.page_size.notna()].sort_values("page_size")
        ax.plot(paged.page_size, paged.median_ms * 1e3, "o-", color=colour("paged"), label="paged layout")
        for v in kernel_times[kernel_times.page_size.isna()].median_ms:
            ax.axhline(v * 1e3, color=colour("slab"), ls="--", label="contiguous (slab) layout")
        ax.set_ylim(0, kernel_times.median_ms.max() * 1e3 * 1.15)
        ax.set_ylabel("decode attention kernel [us]")
        shape = str(kernel_times["shape"].iloc[0]) if "shape" in kernel_times else ""
        ax.set_title(f"{str(kernel_times.get('device', pd.Series(['GPU'])).iloc[0])[:24]}\n{shape}", fontsize=7)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes:
        log2_axis(ax.xaxis)
        ax.set_xlabel("page size [tokens]")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out, "vs_page_size.png")
    return Figure("vs_page_size.png", "Page size",
                  "What a page size costs in memory (waste and the unused tails of last pages, as "
                  "shares of held memory) and in prefix hits (only whole pages are shared)"
                  + (", next to the decode kernel's time at that page size." if extra else "."))
