#!/usr/bin/env python3
"""Hit-rate curves: prefix hit rate against cache capacity for every eviction policy, run by the
real paged allocator (strategies/paged.py with strategies/eviction/), with Belady's optimal
eviction as a runnable policy and the trace's bounds (unbounded cache; MIN with bypass) on the
same plot, and each policy as a fraction of runnable Belady at each capacity.

    python experiments/eviction_curves.py --out results/eviction_curves     # ~3 min on 2 cores
    python experiments/eviction_curves.py --traces multi_turn --capacities 8  trace.limit=200

The replay: requests one at a time in arrival order (the offline Belady's assumption, exactly):
admit (its prompt's cached prefix is the hit), compute the rest of the prompt and the outputs,
release (every full page it computed is cached), then `evict` down to C cached pages (the
policy picks: Belady may drop the pages just released, as MIN with bypass does). The pool is C
pages plus room for the longest request, so every request is admitted and never evicts while it
runs: C is the memory set aside for reuse, as in the bound's model. Hit rate = prompt tokens served from cache / prompt tokens (the bound's
`token_hit_rate`, kvbench/traces/belady.py, same page size). Capacities: `--capacities` points,
log-spaced from 1 % of the trace's distinct pages (prompts and outputs, whole pages) to all.
Trailing `key=value` words are Hydra overrides of kvbench's config (every trace).
LRU comes from one pass over the trace's stack depths (kvbench/traces/stack_distance.py) at every
capacity where that equals the replay (below the first duplicate's depth), replayed elsewhere;
the plot also draws the one-pass curve at 48 capacities. A trace with no page read twice (the
Azure traces: no prefix information) has an unbounded bound of 0: every policy is 0, not replayed.
Writes curves.csv, fraction_of_belady.md and hit_rate_curves.png into --out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from kvbench.report.page import markdown_table
from kvbench.strategies.eviction.base import POLICIES
from kvbench.strategies.eviction.belady import Belady, paged_future
from kvbench.strategies.paged import PagedStrategy
from kvbench.traces.belady import belady_hits, block_references, unbounded_hits
from kvbench.traces.stack_distance import lru_curve

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# azure_conv: no prefix information (every prompt gets its own ids): the unbounded bound is 0, so
# every policy is 0 without a replay; the whole trace costs only its page stream and LRU's one pass
DEFAULT_TRACES = ["shared_prefix", "multi_turn", "mooncake", "azure_conv"]
LIMITS = {"mooncake": 500}  # first N requests (1500: 843k distinct pages, 7 min for the 64 runs)


def load_trace(choice: str, overrides: list[str]):
    """The requests of trace group choice `choice` with kvbench's config and `overrides`."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from kvbench.schema import register

    register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"trace={choice}", *overrides])
    return instantiate(cfg.trace)


def replay(items: list, policy, capacity_pages: int, page_size: int, room_pages: int,
           dedup_touch: bool = False) -> int:
    """Prompt tokens served from cache when `items` (tokens, prompt_len, kv_len) are served one at
    a time by paged with `policy` on C + room pages (paged's `dedup_touch` option as given).
    Mutates nothing outside."""
    s = PagedStrategy((capacity_pages + room_pages) * page_size, 1 << 40, page_size=page_size, eviction=policy,
                      dedup_touch=dedup_touch)
    hit = 0
    for rid, (toks, prompt, kv) in enumerate(items):
        adm = s.admit(rid, toks, kv, prompt, prompt)
        assert adm.admitted, "the pool has room for the longest request"
        hit += adm.cached_tokens
        if kv > prompt:
            assert s.grow(rid, kv - prompt)
        s.release(rid)
        over = s.slot_states(None).cached - capacity_pages * page_size
        if over > 0:
            s.evict(over)
    return hit


DENSE = 48  # capacities of the one-pass LRU line on the plot


def curves(choice: str, requests, page_size: int, points: int, policies: list[str]) -> pd.DataFrame:
    """One row per (policy, capacity): its hit rate and how it was found (`method`): `replay` (paged
    served one request at a time), `one_pass` (LRU from stack depths, exact here: every capacity
    below the trace's first duplicate depth, kvbench/traces/stack_distance.py), `bound` (the
    trace's MIN-with-bypass bound; or every policy when the unbounded bound is 0: none can hit).
    Rows `lru_one_pass` (DENSE capacities, for the plot) are the one-pass curve everywhere: exact
    for paged with dedup_touch=true, and for the default below `first_duplicate_depth`."""
    requests = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    refs = block_references(requests, page_size)
    distinct = refs.num_blocks
    caps = sorted({max(1, int(round(c))) for c in np.geomspace(0.01 * distinct, distinct, points)})
    unbounded = unbounded_hits(refs)
    lru = lru_curve(requests, page_size, refs=refs)
    rows = [{"policy": "unbounded", "capacity_pages": None, "hit_rate": unbounded.token_hit_rate, "method": "bound"}]
    dense = sorted({max(1, int(round(c))) for c in np.geomspace(0.005 * distinct, distinct, DENSE)})
    rows += [{"policy": "lru_one_pass", "capacity_pages": c, "hit_rate": h / refs.prompt_tokens, "method": "one_pass"}
             for c, h in zip(dense, lru.hit_tokens(dense))]
    if unbounded.hit_tokens == 0:  # no page is ever read twice: every policy and bound hits 0
        rows += [{"policy": name, "capacity_pages": c, "hit_rate": 0.0, "method": "bound"}
                 for c in caps for name in ["bound_min_bypass", *policies]]
        return _frame(rows, choice, len(requests), distinct, page_size, lru.first_duplicate_depth)
    items = [(np.asarray(r.tokens, dtype=np.int32), r.prompt_len, r.prompt_len + r.output_len - 1) for r in requests]
    room = max(-(-kv // page_size) for _, _, kv in items) + 1
    future = paged_future([SimpleNamespace(id=i, tokens=t, prompt_len=p) for i, (t, p, _) in enumerate(items)], page_size)
    for c in caps:
        rows.append({"policy": "bound_min_bypass", "capacity_pages": c, "hit_rate": belady_hits(refs, c).token_hit_rate,
                     "method": "bound"})
        for name in policies:
            if name == "lru" and lru.exact_for_default_paged(c):
                hit, method = int(lru.hit_tokens([c])[0]), "one_pass"
            else:
                hit, method = replay(items, Belady(future) if name == "belady" else name, c, page_size, room), "replay"
            rows.append({"policy": name, "capacity_pages": c, "hit_rate": hit / refs.prompt_tokens, "method": method})
    return _frame(rows, choice, len(requests), distinct, page_size, lru.first_duplicate_depth)


def _frame(rows: list[dict], choice: str, requests: int, distinct: int, page_size: int, dup: int | None) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df.insert(0, "trace", choice)
    df.insert(1, "requests", requests)
    df.insert(2, "distinct_pages", distinct)
    df.insert(3, "page_size", page_size)
    df["capacity_fraction"] = df.capacity_pages / distinct
    df["first_duplicate_depth"] = dup  # LRU's one pass is exact for paged's default below this capacity
    return df


def fraction_table(df: pd.DataFrame) -> pd.DataFrame:
    """Each policy's hit rate / runnable Belady's, per trace and capacity (rows: policies)."""
    runs = df[df.capacity_pages.notna() & ~df.policy.isin(["bound_min_bypass", "lru_one_pass"])]
    bel = runs[runs.policy == "belady"].set_index(["trace", "capacity_pages"]).hit_rate
    out = runs.assign(frac=[h / bel[(t, c)] if bel[(t, c)] else float("nan")
                            for t, c, h in zip(runs.trace, runs.capacity_pages, runs.hit_rate)])
    out["capacity"] = (out.capacity_fraction * 100).map(lambda x: f"{x:.3g} %")
    return out


def plot(df: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(df.trace))
    fig, axes = plt.subplots(1, len(traces), figsize=(4.6 * len(traces), 3.8), squeeze=False)
    styles = {"lru_one_pass": "-", "lru": "o", "fifo": "v-", "lfu": "^-", "slru": "<-", "arc": ">-", "s3fifo": "D-",
              "priority": "x", "belady": "s-", "bound_min_bypass": "k--"}
    for ax, trace in zip(axes[0], traces):
        d = df[df.trace == trace]
        for policy in [p for p in styles if p in set(d.policy)]:
            p = d[d.policy == policy].sort_values("capacity_pages")
            ax.plot(p.capacity_fraction * 100, p.hit_rate * 100, styles[policy], ms=3, lw=1.6 if policy == "belady" else 1,
                    label={"belady": "Belady (runnable)", "bound_min_bypass": "MIN with bypass (bound)",
                           "lru_one_pass": "LRU, one pass (stack depths)", "lru": "lru (at the 8 points)",
                           "priority": "priority (no priorities: = LRU)"}.get(policy, policy))
        unb = d[d.policy == "unbounded"].hit_rate.iloc[0] * 100
        ax.axhline(unb, color="black", lw=1, label=f"unbounded ({unb:.1f} %)")
        ax.set_xscale("log")
        ax.set_xlabel("cache capacity [% of the trace's distinct pages]")
        ax.set_ylabel("prompt tokens from cache [%]")
        ax.set_title(f"{trace}: {int(d.requests.iloc[0])} requests, {int(d.distinct_pages.iloc[0])} pages of "
                     f"{int(d.page_size.iloc[0])}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "hit_rate_curves.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", nargs="+", default=DEFAULT_TRACES, help="trace group choices (configs/trace/)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--capacities", type=int, default=8, help="capacity points (>= 2)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES),
                   help="default: all (priority: the traces carry no priorities, so it is LRU, a check)")
    p.add_argument("--out", type=Path, default=Path("results/runs/eviction_curves"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trace.limit=1000")
    a = p.parse_args(argv)
    if a.capacities < 2 or a.page_size < 1:
        p.error("--capacities must be >= 2 and --page-size >= 1")
    a.out.mkdir(parents=True, exist_ok=True)
    frames = []
    for choice in a.traces:
        t0 = time.perf_counter()
        limit = [f"trace.limit={LIMITS[choice]}"] if choice in LIMITS and not any(o.startswith("trace.limit") for o in a.overrides) else []
        df = curves(choice, load_trace(choice, [*limit, *a.overrides]), a.page_size, a.capacities, a.policies)
        frames.append(df)
        print(f"{choice}: {int(df.requests.iloc[0])} requests, {int(df.distinct_pages.iloc[0])} distinct pages "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(a.out / "curves.csv", index=False)
    fr = fraction_table(df)
    lines = []
    for trace in dict.fromkeys(fr.trace):
        t = fr[fr.trace == trace].pivot(index="policy", columns="capacity_pages", values="frac")
        caps = fr[fr.trace == trace].drop_duplicates("capacity_pages").set_index("capacity_pages").capacity
        t.columns = [caps[c] for c in t.columns]
        t = t.loc[[q for q in POLICIES if q in t.index]]
        d = df[df.trace == trace]
        lines += [f"### {trace}: hit rate as a fraction of runnable Belady's, per capacity (% of distinct pages)", ""]
        if d[d.policy == "unbounded"].hit_rate.iloc[0] == 0:
            lines += [f"No page is read twice ({int(d.requests.iloc[0])} requests, {int(d.distinct_pages.iloc[0])} "
                      "pages): the unbounded bound is 0 %, so every policy hits 0 % at every capacity.", ""]
            continue
        lines += [markdown_table(t.round(3).reset_index()), ""]
        b = d[d.policy == "belady"].sort_values("capacity_pages")
        lines += ["Belady's hit rate: " + ", ".join(f"{h:.1%}" for h in b.hit_rate), ""]
        one = d[(d.policy == "lru") & (d.method == "one_pass")]
        dup = d.first_duplicate_depth.iloc[0]
        where = "at every capacity (no duplicate)" if pd.isna(dup) else f"below {int(dup)} pages (the first duplicate's depth)"
        lines += [f"LRU: {len(one)} of {d[d.policy == 'lru'].shape[0]} points from the one-pass curve (exact {where}), "
                  "the others replayed.", ""]
    (a.out / "fraction_of_belady.md").write_text("\n".join(lines))
    print(f"wrote {plot(df, a.out)}, curves.csv and fraction_of_belady.md")


if __name__ == "__main__":
    main()
