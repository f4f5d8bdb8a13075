"""`kvbench-report A B --compare`: how every headline metric changed from run set A to run set B.

Runs are matched by what they ran (strategy label, trace, and the swept parameters that tell the
runs of one set apart), so A and B may be two sweeps of the same grid (before and after an
allocator change) or two single runs. Writes compare.csv (one row per matched run and metric:
a, b, change, change %), compare.md (the same, per run) and compare.png (the per cent changes).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.report.collect import collect
from kvbench.report.page import _cell, markdown_table

# (summary key, better when) of the metrics compared; "-": neither (a count, the wall time of the harness)
METRICS = [("finished", "up"), ("rejected", "down"), ("preemptions", "down"), ("request_throughput", "up"),
           ("output_throughput", "up"), ("ttft_mean_s", "down"), ("ttft_p50_s", "down"), ("ttft_p99_s", "down"),
           ("tpot_mean_s", "down"), ("tpot_p50_s", "down"), ("tpot_p99_s", "down"), ("itl_p50_s", "down"),
           ("itl_p99_s", "down"), ("e2e_p50_s", "down"), ("e2e_p99_s", "down"), ("mem_token_states_frac", "up"),
           ("waste_frac", "down"), ("prefix_hit_rate", "up"), ("mean_running", "up"), ("peak_running", "up"),
           ("wall_time_s", "down")]
KEYS = ["label", "trace", "trace_rate", "kv_capacity_tokens", "max_model_len", "engine", "model", "trace_limit",
        "num_requests"]  # the label holds the page size


def _key_cols(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """label and trace, plus every key column that tells two runs of A (or of B) apart."""
    return [c for c in KEYS if c in a and c in b and (c in ("label", "trace") or
            a[c].astype(str).nunique() > 1 or b[c].astype(str).nunique() > 1)] or ["label"]


def _key(row: pd.Series, cols: list[str]) -> str:
    parts = []
    for c in cols:
        v = row[c]
        v = "all" if isinstance(v, float) and math.isnan(v) else (f"{v:g}" if isinstance(v, float) else str(v))
        parts.append(v if c in ("label", "trace") else f"{c}={v}")
    return " · ".join(parts)


def compare_tables(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """One row per (matched run, metric): run, metric, a, b, change, change_pct, better.

    Two single runs are compared whatever they ran; otherwise runs are matched by key and a run
    of one set without a match in the other is left out (ValueError if none matches)."""
    cols = _key_cols(a, b)
    a, b = a.copy(), b.copy()
    if len(a) == 1 and len(b) == 1:
        name = _key(a.iloc[0], cols) if _key(a.iloc[0], cols) == _key(b.iloc[0], cols) else \
            f"{_key(a.iloc[0], cols)} → {_key(b.iloc[0], cols)}"
        a["run_key"] = b["run_key"] = name
    else:
        a["run_key"] = a.apply(_key, axis=1, cols=cols)
        b["run_key"] = b.apply(_key, axis=1, cols=cols)
    for name, df in (("A", a), ("B", b)):
        if df.run_key.duplicated().any():
            raise ValueError(f"run set {name} has two runs of {df.run_key[df.run_key.duplicated()].iloc[0]}: "
                             "compare sets with one run per configuration")
    merged = a.merge(b, on="run_key", suffixes=("_a", "_b"))
    if merged.empty:
        raise ValueError(f"no run of A matches a run of B (by {', '.join(cols)}): "
                         f"A has {', '.join(a.run_key[:3])}; B has {', '.join(b.run_key[:3])}")
    rows = []
    for _, r in merged.iterrows():
        for m, better in METRICS:
            if f"{m}_a" not in merged or f"{m}_b" not in merged:
                continue
            va, vb = pd.to_numeric(r[f"{m}_a"], errors="coerce"), pd.to_numeric(r[f"{m}_b"], errors="coerce")
            if pd.isna(va) and pd.isna(vb):
                continue
            change = vb - va
            pct = change / abs(va) * 100 if va and not pd.isna(va) else (0.0 if change == 0 else np.nan)
            verdict = "-" if pd.isna(change) or change == 0 or better == "-" else \
                ("better" if (change > 0) == (better == "up") else "worse")
            rows.append({"run": r.run_key, "metric": m, "a": va, "b": vb, "change": change, "change_pct": pct,
                         "verdict": verdict})
    return pd.DataFrame(rows)


def _figure(diff: pd.DataFrame, path: Path) -> None:
    """Per cent change of every metric (rows) for every matched run (bars); wall time apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvbench.report.style import colour, line_style

    runs = list(dict.fromkeys(diff.run))
    metrics = [m for m, _ in METRICS if m in set(diff.metric)]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(metrics) * max(1, min(len(runs), 4)) + 1.5))
    h = 0.8 / len(runs)
    for k, run in enumerate(runs):
        d = diff[diff.run == run].set_index("metric").reindex(metrics)
        y = np.arange(len(metrics)) + (k - (len(runs) - 1) / 2) * h
        label = run.split(" · ")[0].split(" → ")[0]
        ax.barh(y, d.change_pct.fillna(0).clip(-200, 200), h, color=colour(label), label=run,
                hatch=line_style(label).hatch, edgecolor="black", linewidth=0.3)
    ax.set_yticks(np.arange(len(metrics)), metrics)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("change from A to B (%, clipped at ±200)")
    ax.grid(axis="x", alpha=0.3)
    if len(runs) <= 12:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_compare(a_dir: Path, b_dir: Path, out: Path | None = None) -> tuple[Path, str]:
    """Compare the runs under a_dir (A) with those under b_dir (B); write compare.csv, .md and
    .png into `out` (default b_dir/compare); return (out, the text printed on the console)."""
    a, b = collect([a_dir]).table, collect([b_dir]).table
    for name, t, d in (("A", a, a_dir), ("B", b, b_dir)):
        if t.empty:
            raise ValueError(f"no finished runs under {d} (run set {name})")
    diff = compare_tables(a, b)
    out = Path(out) if out else Path(b_dir) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    diff.to_csv(out / "compare.csv", index=False)
    _figure(diff, out / "compare.png")
    shown = diff.assign(change_pct=diff.change_pct.map(lambda v: "-" if pd.isna(v) else f"{v:+.1f} %"),
                        change=diff.change.map(lambda v: "-" if pd.isna(v) else ("+" if v > 0 else "") + _cell(v)))
    md = [f"# {b_dir} against {a_dir}", "",
          f"A = `{a_dir}` ({len(a)} runs), B = `{b_dir}` ({len(b)} runs); {diff.run.nunique()} matched. "
          "change = B − A; better/worse by the metric's direction (times in seconds).", "",
          "![per cent change](compare.png)", ""]
    for run, d in shown.groupby("run", sort=False):
        md += [f"## {run}", "", markdown_table(d.drop(columns="run"))]
    (out / "compare.md").write_text("\n".join(md))
    text = "\n\n".join(f"{run}\n{_text_table(d.drop(columns='run'))}" for run, d in shown.groupby("run", sort=False))
    return out, text


def _text_table(d: pd.DataFrame) -> str:
    cells = [list(d.columns)] + [[_cell(v) for v in r] for r in d.itertuples(index=False)]
    w = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in cells)
