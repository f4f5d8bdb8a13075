"""The report's figures. Each function draws one PNG from a Collection and returns a Figure
(file name and a one-sentence caption), or None when the runs hold nothing to draw for it.

Figures are matplotlib `Figure`s on an Agg canvas (`subplots` below), not pyplot's: no figure
manager, nothing to close, and pyplot (~0.15 s) is not imported. Each is laid out once
(`tight_layout`) and drawn once, straight into PIL (`_save`)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as _MplFigure

from kvbench.report.collect import Collection
from kvbench.report.style import HELD, STATE_COLOURS, STATE_NAMES, STATES, colour, label_order, line_kw

DPI = 80
HIT_MIN = 1e-3  # prefix hit rates below this are chance matches of random ids: no hit figure
PLOT_BINS = 400  # time bins drawn per timeline (keeps PNGs small)
MAX_RATE_ROWS = 3  # a sweep over more rates shows only its highest rate in the memory breakdown
SWEPT = ["trace", "trace_rate", "kv_capacity_tokens", "max_model_len", "engine", "model", "trace_limit"]
_SHORT = {"trace_rate": "rate", "kv_capacity_tokens": "capacity", "max_model_len": "max_len",
          "trace_limit": "limit"}


class Figure(NamedTuple):
    file: str
    title: str
    caption: str


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple = (6.4, 4.8), squeeze: bool = True):
    """pyplot.subplots' (fig, axes) for a Figure of its own on an Agg canvas, at the PNG's DPI."""
    fig = _MplFigure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_of_two(v: float, _pos=None) -> str:
    """A base-2 log axis' tick as a plain number (1, 2, 4, 0.5, 1024), 2 with a superscript
    power far from 1 (2\u207b\u00b9\u2070): the ticks matplotlib's default formatter writes in mathtext,
    whose parse cost ~0.1 s a figure."""
    if v <= 0 or not np.isfinite(v):
        return ""
    k = np.log2(v)
    if k != round(k) or -6 <= k < 20:
        return f"{v:g}"
    return "2" + str(int(round(k))).translate(_SUPERSCRIPT)


def log2_axis(axis) -> None:
    """A base-2 log scale on `axis` (ax.xaxis / ax.yaxis), its ticks labelled by _power_of_two."""
    (axis.axes.set_xscale if axis.axis_name == "x" else axis.axes.set_yscale)("log", base=2)
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(_power_of_two))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def varying(table: pd.DataFrame, cols=SWEPT) -> list[str]:
    """Columns (of `cols`) that take more than one value across the runs."""
    return [c for c in cols if c in table and table[c].astype(str).nunique() > 1]


def run_names(table: pd.DataFrame) -> pd.Series:
    """A short name per run: its label, plus the parameters that vary across runs."""
    vary = varying(table)
    def name(row) -> str:
        parts = [str(row["label"])]
        for c in vary:
            v = row[c]
            parts.append(str(v) if c == "trace" else f"{_SHORT.get(c, c)}={_fmt(v)}")
        return " · ".join(parts)
    return table.apply(name, axis=1)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "all" if np.isnan(v) else f"{v:g}"
    return str(v)


def _rate_col(table: pd.DataFrame) -> str:
    return "trace_rate" if table.trace_rate.notna().all() else "offered_rate"


def representative(table: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """One run per (trace, label) (or `keys` + label): the middle one by offered rate, taken
    among the rates every label of the group ran at when there are such rates (so that the
    runs shown side by side ran at the same rate)."""
    picks = []
    for _, grp in table.groupby(keys or ["trace"], sort=False):
        rate = _rate_col(grp)
        per_label = [set(g[rate].astype(str)) for _, g in grp.groupby("label", sort=False)]
        shared = set.intersection(*per_label) if per_label else set()
        for _, g in grp.groupby("label", sort=False):
            g = g[g[rate].astype(str).isin(shared)] if shared else g
            g = g.sort_values(rate, kind="stable")
            picks.append(g.iloc[(len(g) - 1) // 2])
    return pd.DataFrame(picks).reset_index(drop=True)


def _slice_note(picked: pd.DataFrame, table: pd.DataFrame) -> str:
    """Which slice of a sweep `picked` (one trace's representative runs) is, e.g. " at 8 req/s"."""
    rate = _rate_col(picked)
    note = f" at {picked[rate].iloc[0]:.3g} req/s" if picked[rate].notna().any() else ""
    for c in varying(table):
        if c not in ("trace", "trace_rate") and picked[c].astype(str).nunique() == 1:
            note += f", {_SHORT.get(c, c)}={_fmt(picked[c].iloc[0])}"
    return note


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    order = {lab: i for i, lab in enumerate(label_order(table.label))}
    return table.assign(_o=table.label.map(order)).sort_values(["trace", "_o", "offered_rate"], kind="stable")


def _coarse(tl: pd.DataFrame, bins: int = PLOT_BINS) -> pd.DataFrame:
    """Merge neighbouring bins of an equal-width binned timeline down to at most `bins`."""
    if len(tl) <= bins:
        return tl
    group = np.arange(len(tl)) * bins // len(tl)
    return tl.groupby(group).mean()  # equal-width bins: the plain mean is the time-weighted one


def _plain_log_ticks(axis) -> None:
    """Ticks at 1, 2, 5 x 10^k (at 10^k over wide ranges) labelled as plain numbers; call after plotting."""
    lo, hi = sorted(axis.get_data_interval())
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > 0):  # nothing positive drawn: matplotlib's own ticks
        return
    wide = lo <= 0 or np.log10(hi / lo) > 2.5
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _latency_axis(ax) -> None:
    """Log scale with plain 1-2-5 ticks when the data spans a decade or more; otherwise linear
    (a log axis over a narrow range shows one tick or none)."""
    lo, hi = sorted(ax.yaxis.get_data_interval())
    if np.isfinite(lo) and lo > 0 and hi / lo >= 10:
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    else:
        ax.set_ylim(bottom=0)


def _save(fig, out: Path, file: str) -> None:
    """The figure (laid out by its tight_layout) as a 256-colour PNG (a third of the bytes, no
    visible change): drawn once on its Agg canvas, whose RGBA buffer PIL reads in place. (Was:
    savefig with bbox_inches="tight", which drew the figure twice and laid out every tick label
    again to crop it, then a PNG encoded and decoded on the way: ~40 % of a figure's time.)"""
    from PIL import Image  # matplotlib's own dependency

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = canvas.buffer_rgba()
    im = Image.frombuffer("RGBA", (rgba.shape[1], rgba.shape[0]), rgba, "raw", "RGBA", 0, 1)
    im.convert("RGB").quantize(colors=256).save(out / file, optimize=True)


def _where(r) -> str:
    """A trace and how it was replayed: rescaled to a rate, all at t=0, or at its own timestamps."""
    if np.isfinite(r.trace_rate):
        return f"{r.trace} at {r.trace_rate:g} req/s"
    if r.trace_rate == np.inf:
        return f"{r.trace}, all at t=0"
    return f"{r.trace} at its own arrival times ({r.offered_rate:.3g} req/s)"


def memory_breakdown(col: Collection, out: Path) -> Figure | None:
    """Stacked bars of the six slot states, as shares of capacity and of the memory requests
    hold; one row of panels per trace."""
    t = col.table
    if not len(t) or "mem_token_states_frac" not in t:
        return None
    rate = _rate_col(t)
    note = ""
    if t[rate].nunique() > MAX_RATE_ROWS:  # a rate sweep: the highest rate of each trace only
        t = t[t[rate] == t.groupby("trace")[rate].transform("max")]
        note = " (the runs at the highest request rate of each trace)"
    t = _ordered(t)
    by_rate = t[rate].nunique() > 1
    t = t.assign(where_=[_where(r) if by_rate else r.trace for r in t.itertuples()])
    names = run_names(t.drop(columns=["trace", "trace_rate"] if by_rate else ["trace"])).tolist()
    t = t.assign(name_=names)
    groups = list(t.groupby("where_", sort=False))
    width = max(len(g) for _, g in groups)
    fig, axes = subplots(len(groups), 2, figsize=(max(9, 0.5 * width * 2 + 3), 3.4 * len(groups) + 0.6),
                             squeeze=False)
    for row, (where, g) in zip(axes, groups):
        x = np.arange(len(g))
        for ax, states, what in ((row[0], STATES, "capacity"), (row[1], HELD, "held")):
            fracs = g[[f"mem_{s}_frac" for s in states]].to_numpy(dtype=float) * 100  # [runs, states]
            if what == "held":
                fracs = fracs / np.maximum(fracs.sum(axis=1, keepdims=True), 1e-12) * 100
            bottom = np.zeros(len(g))
            for j, s in enumerate(states):
                ax.bar(x, fracs[:, j], bottom=bottom, color=STATE_COLOURS[s], label=STATE_NAMES[s],
                       edgecolor="white", linewidth=0.5)
                bottom += fracs[:, j]
            for i in range(len(g)):
                ax.text(x[i], min(fracs[i, 0], 90) + 1.5, f"{fracs[i, 0]:.1f}", ha="center", fontsize=7,
                        bbox=dict(facecolor="white", alpha=0.7, lw=0, pad=0.5))
            ax.set_xticks(x, g.name_.tolist(), rotation=35, ha="right", fontsize=8)
            ax.set_ylim(0, 100)
            ax.set_ylabel("% of KV pool capacity" if what == "capacity" else "% of memory held by requests")
        row[0].set_title(f"{where}: the KV pool", fontsize=10)
        row[1].set_title(f"{where}: memory held by requests", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    ncol = 6 if fig.get_figwidth() >= 10.5 else 3  # (the figure is not cropped: the legend fits inside it)
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=8, bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.45 if ncol == 6 else 0.7) / fig.get_figheight()))
    _save(fig, out, "memory_breakdown.png")
    return Figure("memory_breakdown.png", "Memory breakdown per strategy",
                  "Where the KV pool's slots went, time-weighted over each run: left as shares of the "
                  "pool, right as shares of the memory requests held (token states + reserved + "
                  "internal + external fragmentation, the view of the vLLM paper's Figure 2); the "
                  "number on each bar is the token-states share." + note)


def slot_states(col: Collection, out: Path, run: str | None = None) -> Figure | None:
    """Stacked areas of the slot states over time: the run asked for, else one per strategy."""
    t = col.table
    if run:
        runs = [run]
    else:  # one run per strategy, of the first trace
        reps = representative(_ordered(t))
        runs = reps[reps.trace == reps.trace.iloc[0]].run.tolist() if len(reps) else []
    runs = [r for r in runs if r in col.timelines and len(col.timelines[r])][:6]
    if not runs:
        return None
    names = dict(zip(t.run, run_names(t)))
    fig, axes = subplots(len(runs), 1, figsize=(9, 1.9 * len(runs) + 0.8), squeeze=False)
    for ax, r in zip(axes[:, 0], runs):
        tl = _coarse(col.timelines[r])
        ax.stackplot(tl.t_s, *[tl[s] * 100 for s in STATES], colors=[STATE_COLOURS[s] for s in STATES],
                     labels=[STATE_NAMES[s] for s in STATES], linewidth=0)
        ax.set_xlim(tl.t_s.iloc[0], tl.t_s.iloc[-1])
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of pool")
        row = t[t.run == r].iloc[0]
        ax.set_title(f"{names.get(r, r)} — {_where(row)}", fontsize=9, loc="left")  # which rate it shows
    axes[-1, 0].set_xlabel("time since the first arrival [s]")
    axes[0, 0].legend(loc="upper center", ncol=6, fontsize=7, bbox_to_anchor=(0.5, 1.55), frameon=False)
    fig.tight_layout()
    _save(fig, out, "slot_states.png")
    return Figure("slot_states.png", "Slot states over time",
                  "The state of every slot of the KV pool over the run (time-weighted means over "
                  f"{len(_coarse(col.timelines[runs[0]]))} bins), one panel per run; a gap is a time "
                  "when nothing ran (the simulation skips to the next arrival).")


def vs_rate(col: Collection, out: Path) -> Figure | None:
    """Throughput, TTFT and TPOT (p50 solid, p99 dashed) against the request rate, per strategy."""
    t = col.table
    t = t[t.finished > 0] if "finished" in t else t  # a run that finished nothing has no latency or throughput
    if not len(t):
        return None
    rate = _rate_col(t)
    if t.groupby(["trace", "label"])[rate].nunique().max() < 3:  # a line needs a few rates
        return None
    traces = sorted(t.trace.unique())
    fig, axes = subplots(len(traces), 3, figsize=(13, 3.6 * len(traces)), squeeze=False)
    for row, trace in zip(axes, traces):
        g = t[t.trace == trace]
        ttft_k = 1.0 if g.ttft_p99_s.max() > 10 else 1e3  # past saturation TTFT runs to minutes: seconds
        for lab in label_order(g.label):
            d = g[g.label == lab].sort_values(rate)
            kw = line_kw(lab)
            row[0].plot(d[rate], d.request_throughput, label=lab, **kw)
            for ax, m, k in ((row[1], "ttft", ttft_k), (row[2], "tpot", 1e3)):
                ax.plot(d[rate], d[f"{m}_p50_s"] * k, label=f"{lab} p50", lw=1.8, **kw)
                ax.plot(d[rate], d[f"{m}_p99_s"] * k, label=f"{lab} p99", lw=0.8, alpha=0.6,
                        **{**kw, "marker": "x"})
        xs = np.sort(g[rate].dropna().unique())
        row[0].plot(xs, xs, ":", color="grey", label="served = offered")
        log2_axis(row[0].yaxis)
        row[0].set_ylabel("request throughput [req/s]")
        row[1].set_ylabel("TTFT [ms]" if ttft_k == 1e3 else "TTFT [s]")
        row[2].set_ylabel("TPOT [ms/token]")
        for ax, what in zip(row, ("throughput", "time to first token", "time per output token")):
            log2_axis(ax.xaxis)
            ax.set_xlabel("request rate offered [req/s]")
            ax.set_title(f"{trace}: {what}", fontsize=10)
            ax.grid(alpha=0.3)
        for ax in row[1:]:
            _latency_axis(ax)
        row[0].legend(fontsize=7)
        row[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, out, "vs_rate.png")
    return Figure("vs_rate.png", "Throughput and latency against request rate",
                  "Each strategy's served request rate, p50 (thick) and p99 (thin, x markers) TTFT and TPOT as "
                  "the offered rate grows; a strategy saturates where its throughput leaves the dotted "
                  "diagonal and its TTFT climbs.")


def _representatives_with(col: Collection, data: dict) -> pd.DataFrame:
    """The representative run of each strategy and trace, among the runs with rows in `data`."""
    reps = representative(_ordered(col.table)) if len(col.table) else col.table
    return reps[[bool(r in data and len(data[r])) for r in reps.run]] if len(reps) else reps


def latency_cdf(col: Collection, out: Path) -> Figure | None:
    """CDFs of TTFT, TPOT and E2E latency, one line per run (one run per strategy and trace)."""
    reps = _representatives_with(col, col.requests)
    if not len(reps):
        return None
    traces = sorted(reps.trace.unique())
    fig, axes = subplots(len(traces), 3, figsize=(13, 3.4 * len(traces)), squeeze=False)
    for row, trace in zip(axes, traces):
        g = reps[reps.trace == trace]
        for _, r in g.iterrows():
            req = col.requests[r.run]
            for ax, m in zip(row, ("ttft_s", "tpot_s", "e2e_s")):
                v = np.sort(req[m].dropna().to_numpy())
                if len(v):
                    ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=r.label, lw=1.3,
                            **{**line_kw(r.label), "marker": None})
        rate = _slice_note(g, col.table)
        for ax, what in zip(row, ("TTFT [s]", "TPOT [s/token]", "end-to-end latency [s]")):
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel(what)
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"{trace}{rate}: {what.split(' [')[0]}", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out, "latency_cdf.png")
    return Figure("latency_cdf.png", "Latency distributions",
                  "Cumulative distributions of time to first token, time per output token and "
                  "end-to-end latency over the finished requests, one line per strategy.")


def batch_size(col: Collection, out: Path) -> Figure | None:
    """Running requests over time, one line per strategy (the representative run of each)."""
    reps = _representatives_with(col, col.timelines)
    if not len(reps):
        return None
    traces = sorted(reps.trace.unique())
    fig, axes = subplots(len(traces), 1, figsize=(9, 3.0 * len(traces)), squeeze=False)
    for ax, trace in zip(axes[:, 0], traces):
        for _, r in reps[reps.trace == trace].iterrows():
            tl = _coarse(col.timelines[r.run])
            ax.plot(tl.t_s, tl.running, lw=1, **{**line_kw(r.label), "marker": None},
                    label=f"{r.label} (mean {r.mean_running:.1f}, peak {r.peak_running})")
        ax.set_ylabel("running requests")
        ax.set_title(f"{trace}{_slice_note(reps[reps.trace == trace], col.table)}: batch size", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("time since the first arrival [s]")
    fig.tight_layout()
    _save(fig, out, "batch_size.png")
    return Figure("batch_size.png", "Running batch size over time",
                  "How many requests each strategy keeps running at once (time-weighted means over "
                  "short bins): the memory a strategy wastes is batch size it loses.")
