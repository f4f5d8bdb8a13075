"""Write a report: collect the runs, draw the figures, write runs.csv, runs.md, index.md and
index.html into a folder (atomically: a temporary folder renamed into place, index.md last).
Imports pandas and matplotlib; `kvbench.report` imports this module only when it writes."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from functools import partial

import pandas as pd

from kvbench.report import cache_figures as C
from kvbench.report import figures as F
from kvbench.report.collect import Collection, collect
from kvbench.report.forked import fork_map
from kvbench.report.html import index_html
from kvbench.report.page import index_md, markdown_table, summary_columns

FIGURE_FILES = ["memory_breakdown.png", "slot_states.png", "vs_rate.png", "latency_cdf.png", "batch_size.png",
                "prefix_hit_rate.png", "vs_page_size.png"]
BOUND_BLOCK = 16  # tokens per block of the hit-rate bounds (paged's default page)


def trace_bounds(col: Collection, block_size: int = BOUND_BLOCK) -> pd.DataFrame:
    """For each trace with prefix hits: unbounded, Belady and LRU hit rates with a cache the
    size of each pool its runs used (in blocks of `block_size` tokens).

    The trace is rebuilt from the first run's saved config (so its file must be reachable)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kvbench.report.cache_figures import bound_block_sizes
    from kvbench.traces.belady import hit_rate_bounds

    rows = []
    t = col.table
    for trace, g in t[t.prefix_hit_rate.fillna(0) >= F.HIT_MIN].groupby("trace"):
        run = col.root / g.run.iloc[0]
        cfg = OmegaConf.load(run / "config.yaml") if (run / "config.yaml").exists() else None
        if cfg is None or "trace" not in cfg:
            continue
        capacities = sorted(int(c) for c in t[t.trace == trace].kv_capacity_tokens.unique())
        try:
            requests = instantiate(cfg.trace)
        except Exception as err:  # noqa: BLE001  the report goes on without this trace's bounds
            print(f"kvbench-report: no hit-rate bounds for {trace}: {' '.join(str(err).split())[:200]}",
                  file=sys.stderr)
            continue
        for bs in bound_block_sizes(g, requests, block_size):  # a bound per page size of its runs
            for hits in hit_rate_bounds(requests, bs, [c // bs for c in capacities]):
                cap = None if hits.capacity_blocks is None else hits.capacity_blocks * bs
                rows.append({"trace": trace, "capacity_tokens": cap, **hits.row()})
    return pd.DataFrame(rows)


def write_report(dirs: list[Path], out: Path | None = None, title: str | None = None,
                 run: str | None = None, bounds: bool = True,
                 kernel_times: Path | None = None) -> tuple[Path, Collection]:
    """Collect the runs under `dirs`, write the report into `out` (default: DIR/report).

    Every file is made in a temporary folder inside `out` and renamed into place when all are
    made, index.md last: an error or Ctrl-C leaves the earlier report as it was. A figure that
    cannot be drawn is named in index.md and on stderr; the rest of the report is written."""
    col = collect(dirs)
    out = Path(out) if out else Path(dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        made = _write_files(col, Path(tmp), dirs, title, run, bounds, kernel_times)
        for stale in (set(FIGURE_FILES) | {"hit_rate_bounds.csv", "index.html"}) - set(made):  # from an earlier report
            (out / stale).unlink(missing_ok=True)
        for name in sorted(made, key=lambda n: n == "index.md"):  # index.md last
            os.replace(Path(tmp) / name, out / name)
    return out, col


def _write_files(col: Collection, out: Path, dirs: list[Path], title: str | None, run: str | None,
                 bounds: bool, kernel_times: Path | None) -> list[str]:
    """Write the report's files into `out`; return their names."""
    col.table.to_csv(out / "runs.csv", index=False)
    table_md = markdown_table(col.table[summary_columns(col.table)]) if len(col.table) else "No runs.\n"
    (out / "runs.md").write_text(table_md)
    bound_table = trace_bounds(col) if bounds and len(col.table) and "prefix_hit_rate" in col.table else None
    if bound_table is not None and len(bound_table):
        bound_table.to_csv(out / "hit_rate_bounds.csv", index=False)
    kt = _kernel_times(kernel_times) if kernel_times else None
    notes = [f"Made with `kvbench-report {' '.join(str(d) for d in dirs)}`."]
    figs = []
    drawers = [(F.memory_breakdown, ()), (F.slot_states, (run,)), (F.vs_rate, ()), (F.latency_cdf, ()),
               (F.batch_size, ()), (C.prefix_hits, (bound_table,)), (C.vs_page_size, (kt,))]
    drawn = fork_map([partial(_draw, draw, col, out, args) for draw, args in drawers] if len(col.table) else [])
    for fig, why in drawn:  # (in the drawers' order, whichever process drew them)
        figs.append(fig)
        if why is not None:
            print(f"kvbench-report: warning: {why}", file=sys.stderr)
            notes.insert(0, f"Warning: {why}.")
    figs = [f for f in figs if f is not None]
    title = title or f"kvbench report: {Path(dirs[0]).name}"
    (out / "index.html").write_text(index_html(col, figs, title, [str(d) for d in dirs], bound_table, notes, out))
    (out / "index.md").write_text(index_md(col, figs, title, [str(d) for d in dirs], bound_table, notes))
    return sorted(p.name for p in out.iterdir())


def _draw(draw, col: Collection, out: Path, args: tuple) -> tuple:
    """(the Figure or None, None) or (None, why it was not drawn): one broken figure does not
    take the report with it."""
    try:
        return draw(col, out, *args), None
    except Exception as err:  # noqa: BLE001
        return None, f"figure {draw.__name__} not drawn: {type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _kernel_times(path: Path) -> pd.DataFrame:
    """Decode-kernel rows of a kernel timing CSV (experiments/page_size_kernel.py or
    bench_kernels.py): page_size is a number, or NaN for the contiguous (slab) layout."""
    df = pd.read_csv(path)
    df = df[df.kernel == "decode"].copy()
    df["page_size"] = pd.to_numeric(df.page_size, errors="coerce")
    if "shape" in df and df["shape"].nunique() > 1:  # one shape only: the first
        df = df[df["shape"] == df["shape"].iloc[0]]
    return df
