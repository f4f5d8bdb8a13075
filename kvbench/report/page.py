"""The report's text: the tidy table as Markdown, and index.md that embeds the figures."""
from __future__ import annotations

import math

import pandas as pd

from kvbench.report.collect import Collection
from kvbench.report.figures import Figure, varying

TABLE_COLUMNS = ["label", "trace", "offered_rate", "finished", "rejected", "preemptions",
                 "request_throughput", "output_throughput", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                 "tpot_p99_s", "mem_token_states_frac", "held_token_states_frac", "waste_frac",
                 "prefix_hit_rate", "mean_running", "peak_running"]


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table of `df` (numbers to 4 significant digits)."""
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join(" --- " for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def summary_columns(table: pd.DataFrame) -> list[str]:
    """The headline columns of the Markdown table: the run, what varies, then the metrics."""
    extra = [c for c in varying(table) if c not in ("trace",)]
    cols = ["run", *[c for c in TABLE_COLUMNS[:2]], *extra, *TABLE_COLUMNS[2:]]
    return [c for c in dict.fromkeys(cols) if c in table]


def index_md(col: Collection, figures: list[Figure], title: str, sources: list[str],
             bounds: pd.DataFrame | None, notes: list[str]) -> str:
    t = col.table
    out = [f"# {title}", "",
           f"{len(t)} run(s) from {', '.join(f'`{s}`' for s in sources)}. Every column of every "
           "run is in [`runs.csv`](runs.csv); the headline ones are below (fractions are of the KV "
           "pool unless named `held_`: of the memory requests hold; times in seconds; rates per second).",
           ""]
    if col.missing:
        out += [f"## Missing runs ({len(col.missing)})", "",
                "These runs of the sweep have no results; everything else below is reported without them.", "",
                "| where | job | why |", "| --- | --- | --- |"]
        out += [f"| `{m.where}` | `{m.job}` | {m.why} |" for m in col.missing] + [""]
    if col.ignored:
        out += [f"## Ignored runs ({len(col.ignored)})", "",
                "Run folders of a sweep folder that the sweep's grid (its multirun.yaml) does not "
                "contain: an earlier sweep with other parameters left them. Not reported.", "",
                "| where | job | why |", "| --- | --- | --- |"]
        out += [f"| `{m.where}` | `{m.job}` | {m.why} |" for m in col.ignored] + [""]
    out += ["## Runs", "", markdown_table(t[summary_columns(t)]) if len(t) else "No finished runs.\n"]
    if bounds is not None and len(bounds):
        out += ["## What the traces allowed (prefix hit rates)", "",
                "Hit rates of prompt tokens with an unbounded cache, with Belady's optimal eviction and "
                "with sequential LRU at the pool's capacity (requests served one at a time; definitions "
                "in `kvbench/traces/belady.py`).", "",
                markdown_table(bounds[["trace", "policy", "block_size", "capacity_blocks", "capacity_tokens",
                                       "token_hit_rate", "block_hit_rate"]])]
    for f in figures:
        out += [f"## {f.title}", "", f"![{f.title}]({f.file})", "", f.caption, ""]
    out += notes
    return "\n".join(out).rstrip() + "\n"
