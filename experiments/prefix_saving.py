"""What a prefix hit saves on the GPU: tables and a figure from `+experiment=gpu_prefix_saving` runs.

    python experiments/prefix_saving.py RUN_DIR [RUN_DIR ...] --out results/gpu_prefix_saving

Sweeps of the same model and trace given more than once (repeats) get a section more: every run with
caching against every repeat of its baseline (`across_repeats`), the spread between processes.

    python experiments/prefix_saving.py RUN_DIR --chunked CHUNK_DIR [CHUNK_DIR ...] --out OUT

`--chunked`: sweeps of the runs without caching in small prefill chunks (`gpu_refit_runs.sh PS=mt64`). A run
without caching prefills whole prompts, so few of its steps attend over a long prefix, and its fit's pair term,
which an extend over a cached prefix depends on, is an extrapolation; the chunked runs' steps (few new tokens
over long prefixes of their own, as an extend's) join its fit, and each run with caching is judged against
that pooled fit too, and set beside the chunked steps cell by cell, without a fit (`side_by_side`). A sweep
without runs without caching takes the chunked ones as its baselines.

Each RUN_DIR is a sweep folder of that experiment (one run per strategy, same model). Per model:
  - step time against prefill tokens computed (median per bin; decode-only steps as their own row),
  - a step's prefill cost: its time minus the median decode-only step of the same batch size
    (same run); the per-token prefill cost: the median of prefill cost / prefill tokens over the
    steps of the run without prefix caching,
  - the saving per cached token: (total prefill cost without caching - with caching) / cached
    tokens, against that per-token cost (ratio 1 = a hit saves exactly the compute it skips), and
    against the marginal per-token cost: the slope of a least-squares line through the prefill
    cost of every run's steps with prefill against their prefill tokens. A hit skips tokens but
    not its step, so what it can save per token is the slope; the median cost per token also
    holds the step's fixed part (the intercept, reported beside it), which once the host floor
    is gone is a large share of a short prefill,
  - steps with a prefill of at most 64 tokens (a hit: only the question is computed) against
    decode-only steps of the same batch size (median of the per-step ratios),
  - TTFT (mean, p50, p99) with and without caching, and against the cached tokens of each
    request (binned: the prompt tokens its admission found in the cache),
  - tokens skipped: prefill tokens computed without caching minus with (the timelines' sums;
    equal to the cached tokens unless preemptions by recompute differ between the runs: a
    recomputed prompt hits the cache of its own earlier pass), and the saving per skipped token
    against both the median per-token prefill cost and the mean one (total cost / tokens),
  - the check "an extend over a cached prefix costs no more per new token than a plain prefill
    of the same length": per bin of prefill tokens, the median step time per prefill token of the
    run's steps over a prefix against the run without caching's plain prefills (`over_prefix`);
    a bin fails when it is over TOLERANCE more expensive with at least MIN_STEPS steps on both
    sides; and the same steps at equal work: their prefill cost against a fit of the run without
    caching's (per step, prefill token and query-key pair; `extend_at_equal_work`).

Writes OUT/prefix_saving.{json,md,png} (each through a temporary file and a rename): one section
per sweep (model and trace).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvbench.calibrate import _nnls, write_text_atomic  # noqa: E402

BINS = [0, 1, 65, 257, 513, 1025, 2049, 8193]
LABELS = ["decode only", "1-64", "65-256", "257-512", "513-1024", "1025-2048", "2049-8192"]
CACHED_BINS = [0, 1, 256, 512, 1024, 2048, 4096, 8192, 16384, 1 << 40]
CACHED_LABELS = ["0", "1-255", "256-511", "512-1023", "1024-2047", "2048-4095", "4096-8191", "8192-16383", ">=16384"]
ATTENDED_BINS = [0, 500, 1000, 2000, 4000, 1 << 40]  # query-key pairs per prefill token (the prefix a token attends over)
ATTENDED_LABELS = ["<500", "500-999", "1000-1999", "2000-3999", ">=4000"]
TOLERANCE = 0.10  # an extend may cost this much more per token than a plain prefill before the check fails
MIN_STEPS = 3     # steps a bin needs on both sides for the check to judge it


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


def ttft_by_cached(req: pd.DataFrame) -> dict:
    """Finished requests binned by their cached prompt tokens: count, TTFT mean / p50, prompt and new tokens."""
    fin = req[req.status == "finished"]
    bins = pd.cut(fin.cached_tokens, CACHED_BINS, right=False, labels=CACHED_LABELS)
    g = fin.groupby(bins, observed=True)
    return {str(k): dict(requests=int(len(v)), ttft_mean_ms=float(v.ttft_s.mean() * 1e3),
                         ttft_p50_ms=float(v.ttft_s.median() * 1e3), prompt_mean=float(v.prompt_len.mean()),
                         new_tokens_mean=float((v.prompt_len - v.cached_tokens).mean())) for k, v in g}


def by_prefill_bin(tl: pd.DataFrame) -> dict:
    bins = pd.cut(tl.prefill_tokens, BINS, right=False, labels=LABELS)
    per_token = (tl.dt_s / tl.prefill_tokens.clip(lower=1)).groupby(bins, observed=True).median()
    g = tl.groupby(bins, observed=True)
    return {str(k): dict(steps=int(n), median_ms=float(m) * 1e3, median_ms_per_prefill_token=float(pt) * 1e3)
            for k, n, m, pt in zip(g.dt_s.median().index, g.size(), g.dt_s.median(), per_token)}


def over_prefix(tl: pd.DataFrame) -> pd.Series:
    """Steps with prefill whose query-key pairs exceed those of one plain prefill of all their
    prefill tokens, N (N + 1) / 2: some chunk attends over a prefix (cached, or its own earlier
    chunks). Exact for a step with one chunk; a step of several chunks with a short prefix counts
    as plain. Without a `prefill_pairs` column (older timelines) every step with prefill counts."""
    n = tl.prefill_tokens.astype("int64")
    if "prefill_pairs" not in tl:
        return n > 0
    return (n > 0) & (tl.prefill_pairs.astype("int64") > n * (n + 1) // 2)


def extend_vs_prefill(run_bins: dict, base_bins: dict) -> dict:
    """Per bin of prefill tokens (decode-only excluded): the median step time per prefill token
    with caching over that without, and whether it passes (see TOLERANCE, MIN_STEPS)."""
    out = {}
    for k, v in run_bins.items():
        if k == "decode only" or k not in base_bins:
            continue
        b = base_bins[k]
        ratio = v["median_ms_per_prefill_token"] / b["median_ms_per_prefill_token"]
        judged = min(v["steps"], b["steps"]) >= MIN_STEPS
        out[k] = dict(steps=v["steps"], steps_nocache=b["steps"], median_ms=v["median_ms"],
                      median_ms_nocache=b["median_ms"], ratio_per_token=ratio,
                      verdict=("pass" if ratio <= 1 + TOLERANCE else "FAIL") if judged else "too few steps")
    return out


def pooled_cost(*tls: pd.DataFrame) -> pd.DataFrame:
    """`prefill_cost` of several runs' timelines as one table (each step priced against the
    decode-only steps of its own run)."""
    return pd.concat([prefill_cost(tl) for tl in tls], ignore_index=True)


def _work_rows(base: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`work_model`'s least-squares problem over `prefill_cost` rows: [1, prefill tokens,
    query-key pairs] per step, its cost, and the weights of relative errors."""
    y = base.cost_s.to_numpy(float)
    return (np.c_[np.ones(len(base)), base.prefill_tokens.to_numpy(float), base.prefill_pairs.to_numpy(float)], y,
            1 / np.maximum(np.abs(y), 1e-4) ** 2)


def work_model(*base_tls: pd.DataFrame) -> dict | None:
    """A fit of the prefill cost (`prefill_cost`) of the run without caching's steps with prefill,
    plain or over its own earlier chunks: s per step, per prefill token and per query-key pair
    (non-negative least squares on relative errors), and the range of prefill tokens it saw. None
    without a `prefill_pairs` column or with fewer than 3 distinct sizes. Several timelines (the
    run and its repeats in small prefill chunks, `--chunked`) are fitted as one."""
    base = pooled_cost(*base_tls)
    if "prefill_pairs" not in base or base.prefill_tokens.nunique() < 3:
        return None
    coef = _nnls(*_work_rows(base))
    return dict(step_ms=coef[0] * 1e3, token_us=coef[1] * 1e6, pair_ns=coef[2] * 1e9,
                tokens_min=int(base.prefill_tokens.min()), tokens_max=int(base.prefill_tokens.max()),
                attended_max=float((base.prefill_pairs / base.prefill_tokens).max()))


def extend_at_equal_work(tl: pd.DataFrame, work: dict, base_tls: list[pd.DataFrame] | None = None,
                         rounds: int = 200, seed: int = 0) -> dict:
    """Per bin of prefill tokens: the run's steps over a prefix within the fit's range of prefill
    tokens, their prefill cost against what the run without caching pays for the same prefill
    tokens and query-key pairs (`work_model`); median ratio, pass within TOLERANCE. An extend
    attends to its whole history, so at equal new tokens it does more work than a plain prefill
    (`extend_vs_prefill`); this asks whether it pays more than that work costs.

    With `base_tls` (the runs the fit came from, fitted as one) each bin also gets `interval`: the
    5th and 95th percentiles of the median ratio over `rounds` bootstrap rounds, each resampling
    the baseline's steps with prefill (the fit redone) and the bin's steps. A verdict whose
    interval straddles 1 + TOLERANCE is within the noise of one pair of runs."""
    p = prefill_cost(tl)
    p = p[over_prefix(p) & p.prefill_tokens.between(work["tokens_min"], work["tokens_max"])]
    tokens, pairs, cost = (p[c].to_numpy(float) for c in ("prefill_tokens", "prefill_pairs", "cost_s"))
    pred = work["step_ms"] * 1e-3 + work["token_us"] * 1e-6 * tokens + work["pair_ns"] * 1e-9 * pairs
    ratio = pd.Series(cost / pred, index=p.index)
    bins = pd.cut(p.prefill_tokens, BINS, right=False, labels=LABELS)
    g = ratio.groupby(bins, observed=True)
    out = {str(k): dict(steps=int(n), ratio=float(m), verdict=("pass" if m <= 1 + TOLERANCE else "FAIL")
                        if n >= MIN_STEPS else "too few steps")
           for k, n, m in zip(g.median().index, g.size(), g.median())}
    if base_tls is None or not out:
        return out
    x, y, w = _work_rows(pooled_cost(*base_tls))
    rng = np.random.default_rng(seed)
    at = {k: np.flatnonzero((bins == k).to_numpy()) for k in out}
    meds = {k: [] for k in out}
    for _ in range(rounds):
        i = rng.integers(0, len(y), len(y))
        coef = _nnls(x[i], y[i], w[i])
        r = cost / (coef[0] + coef[1] * tokens + coef[2] * pairs)
        for k, rows in at.items():
            meds[k].append(np.median(r[rng.choice(rows, len(rows))]))
    for k, m in meds.items():
        out[k]["interval"] = [float(np.quantile(m, 0.05)), float(np.quantile(m, 0.95))]
    return out


def side_by_side(tl: pd.DataFrame, chunked: list[pd.DataFrame]) -> dict:
    """A run's steps over a prefix beside the runs in small chunks' (`--chunked`), cell by cell:
    per bin of prefill tokens (up to 256) and of pairs per prefill token (the prefix attended
    over), each side's steps, median prefill cost (`prefill_cost`, against its own run's decode
    steps) and median prefill tokens. No fit: what the same kind of step costs in both."""
    def cells(p):
        p = p[over_prefix(p) & (p.prefill_tokens <= 256)]
        keys = [pd.cut(p.prefill_tokens, BINS, right=False, labels=LABELS),
                pd.cut(p.prefill_pairs / p.prefill_tokens, ATTENDED_BINS, right=False, labels=ATTENDED_LABELS)]
        g = p.groupby(keys, observed=True)
        return {(str(a), str(b)): (int(n), float(c), float(t)) for (a, b), n, c, t in
                zip(g.size().index, g.size(), g.cost_s.median(), g.prefill_tokens.median())}
    mine, theirs = cells(prefill_cost(tl)), cells(pooled_cost(*chunked))
    out: dict = {}
    for (tokens, attended), (n, c, t) in mine.items():
        m, cc, tc = theirs.get((tokens, attended), (0, float("nan"), float("nan")))
        out.setdefault(tokens, {})[attended] = dict(steps=n, cost_ms=c * 1e3, tokens=t, steps_chunked=m,
                                                    cost_ms_chunked=cc * 1e3, tokens_chunked=tc)
    return out


def marginal_cost(runs: dict[str, tuple[dict, pd.DataFrame, pd.DataFrame]]) -> tuple[float, float]:
    """(intercept s, slope s per token) of a least-squares line through the prefill cost of every
    run's steps with prefill against their prefill tokens (nan, nan with fewer than two sizes)."""
    p = pd.concat([prefill_cost(tl) for _, tl, _ in runs.values()], ignore_index=True)
    if p.prefill_tokens.nunique() < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(p.prefill_tokens.to_numpy(float), p.cost_s.to_numpy(float), 1)
    return float(intercept), float(slope)


def baseline(tl: pd.DataFrame) -> dict:
    """What a run without caching gives the runs compared with it: its prefill cost per step
    (`prefill_cost`), the median and mean per-token cost, the prefill tokens it computed, its
    plain prefills by bin and its `work_model`."""
    base = prefill_cost(tl)
    return dict(cost=base, b=float((base.cost_s / base.prefill_tokens).median()),
                b_mean=float(base.cost_s.sum() / base.prefill_tokens.sum()), computed=int(tl.prefill_tokens.sum()),
                bins=by_prefill_bin(tl[~over_prefix(tl)]), work=work_model(tl))


def baseline_of(name: str, bases: dict) -> str:
    """The run without caching a run is compared with: itself, its own strategy's (`X_nocache`
    for run X: radix against radix without caching, at its own page size and allocator), else
    the sweep's first (paged_nocache in the sweeps before radix_nocache existed)."""
    return name if name in bases else name + "_nocache" if name + "_nocache" in bases else next(iter(bases))


def model_report(runs: dict[str, tuple[dict, pd.DataFrame, pd.DataFrame]], commit: str | None = None,
                 chunked: dict[str, list[pd.DataFrame]] | None = None, chunked_baselines: frozenset = frozenset()) -> dict:
    """The sweep's report (see the module doc). `chunked`: per run without caching, the timelines of
    its runs in small prefill chunks (same model and trace, `--chunked`); each run with caching is
    then also judged at equal work against the fit of its baseline pooled with those
    (`extend_at_equal_work_pooled`), whose chunks over long prefixes of their own measure the pair
    term an extend over a cached prefix depends on, and is set beside them (`side_by_side`).
    `chunked_baselines`: the runs without caching that are themselves runs in small chunks."""
    chunked = chunked or {}
    bases = {k: baseline(v[1]) for k, v in runs.items() if k.endswith("nocache")}
    pools = {k: [runs[k][1], *v] for k, v in chunked.items() if k in bases}  # each baseline's run and its chunked runs
    first = next(iter(bases))
    nocache = runs[first]
    fixed, slope = marginal_cost(runs)
    out = dict(model=nocache[0].get("model"), trace=nocache[0].get("trace"), device=nocache[0].get("device"),
               commit=commit or ", ".join(dict.fromkeys(r[0]["commit"] for r in runs.values() if r[0].get("commit"))) or None,
               prefill_marginal_cost_per_token_us=slope * 1e6,
               prefill_step_fixed_cost_ms=fixed * 1e3, baselines={
                   k: dict(prefill_cost_per_token_us=v["b"] * 1e6, prefill_cost_per_token_mean_us=v["b_mean"] * 1e6,
                           work_model=v["work"], **({} if k not in pools else dict(
                               chunked_runs=len(chunked[k]), work_model_pooled=work_model(*pools[k]))))
                   for k, v in bases.items()}, runs={})
    out.update(out["baselines"][first])  # (the first baseline's figures at the top, as before radix_nocache)
    for name, (summary, tl, req) in runs.items():
        against = baseline_of(name, bases)
        base = bases[against]
        b, b_mean, work = base["b"], base["b_mean"], base["work"]
        base_prefill_s = base["cost"].cost_s.sum()
        fin = req[req.status == "finished"]
        cached = int(fin.cached_tokens.sum())
        prefill_s = prefill_cost(tl).cost_s.sum()
        row = dict(baseline=against, prefix_hit_rate=summary.get("prefix_hit_rate"), cached_tokens=cached,
                   ttft_mean_ms=fin.ttft_s.mean() * 1e3, ttft_p50_ms=fin.ttft_s.median() * 1e3,
                   ttft_p99_ms=fin.ttft_s.quantile(0.99) * 1e3, tpot_mean_ms=fin.tpot_s.mean() * 1e3,
                   request_throughput=summary.get("request_throughput"),
                   prefill_cost_s=prefill_s, hit_step_vs_decode_step=hit_vs_decode(tl),
                   slowest_step_ms=float(tl.dt_s.max()) * 1e3, preemptions=summary.get("preemptions"),
                   prefix_hit_tokens=int(summary.get("prefix_hit_tokens_gpu", 0) + summary.get("prefix_hit_tokens_host", 0)),
                   prefill_tokens_computed=int(tl.prefill_tokens.sum()),
                   tokens_skipped=base["computed"] - int(tl.prefill_tokens.sum()))
        if cached:
            row["saving_per_cached_token_us"] = (base_prefill_s - prefill_s) / cached * 1e6
            row["saving_vs_prefill_cost"] = row["saving_per_cached_token_us"] / (b * 1e6)
            row["saving_vs_marginal_cost"] = row["saving_per_cached_token_us"] / (slope * 1e6)
        if row["tokens_skipped"] > 0:
            row["saving_per_skipped_token_us"] = (base_prefill_s - prefill_s) / row["tokens_skipped"] * 1e6
            row["saving_per_skipped_vs_median_cost"] = row["saving_per_skipped_token_us"] / (b * 1e6)
            row["saving_per_skipped_vs_mean_cost"] = row["saving_per_skipped_token_us"] / (b_mean * 1e6)
        row["step_ms_by_prefill_tokens"] = by_prefill_bin(tl)
        row["ttft_by_cached_tokens"] = ttft_by_cached(req)
        if name not in bases:
            row["extend_vs_prefill"] = extend_vs_prefill(by_prefill_bin(tl[over_prefix(tl)]), base["bins"])
            if work is not None:
                row["extend_at_equal_work"] = extend_at_equal_work(tl, work, [runs[against][1]])
            pooled = out["baselines"][against].get("work_model_pooled")
            if pooled is not None:
                row["extend_at_equal_work_pooled"] = extend_at_equal_work(tl, pooled, pools[against])
            small = ([runs[against][1]] if against in chunked_baselines else []) + chunked.get(against, [])
            if small:
                row["side_by_side_chunked"] = side_by_side(tl, small)
        out["runs"][name] = row
    return out


def figure(reports: list[dict], data: list[dict], path: Path, note: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(reports), figsize=(6 * len(reports), 8), squeeze=False)
    styles = {"paged": ("C0", "o"), "paged_nocache": ("C3", "x"), "radix": ("C2", "^"), "radix_nocache": ("C1", "v")}
    for j, (rep, runs) in enumerate(zip(reports, data)):
        ax, cdf = axes[0, j], axes[1, j]
        for name, (_, tl, req) in runs.items():
            kind = next((k for k in ("paged_nocache", "radix_nocache", "radix", "paged") if name.endswith(k)), None)
            colour, marker = styles.get(kind, ("C7", "."))
            p = tl[tl.prefill_tokens > 0]
            ax.scatter(p.prefill_tokens, p.dt_s * 1e3, s=6, alpha=0.4, color=colour, marker=marker, label=name)
            t = np.sort(req.loc[req.status == "finished", "ttft_s"].to_numpy() * 1e3)
            cdf.plot(t, np.arange(1, len(t) + 1) / len(t), color=colour, label=name)
        ax.set(xscale="log", yscale="log", xlabel="prefill tokens computed in the step", ylabel="step time (ms)",
               title=f"{rep['model']}, {rep['trace']}, {rep['device']}: steps with prefill")
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


def across_repeats(data: list[dict]) -> dict:
    """Sweeps of the same runs repeated (`data`: each sweep's runs by name, same model and trace):
    per run with caching and bin of prefill tokens, `extend_at_equal_work`'s ratio of each of its
    repeats against each repeat of its baseline (every pair: how far the verdict moves between
    processes, which a bootstrap within one pair of runs does not see). {run: {bin: [ratios]}}."""
    out: dict = {}
    fits = [{k: work_model(tl) for k, (_, tl, _) in runs.items() if k.endswith("nocache")} for runs in data]
    bases = {k: None for f in fits for k in f}
    for cached in data:
        for name, (_, tl, _) in cached.items():
            if name.endswith("nocache"):
                continue
            bname = baseline_of(name, bases)  # (the same for every repeat: a sweep without it is left out as a base)
            for f in fits:
                work = f.get(bname)
                if work is None:
                    continue
                for k, v in extend_at_equal_work(tl, work).items():
                    if v["steps"] >= MIN_STEPS:
                        out.setdefault(name, {}).setdefault(k, []).append(v["ratio"])
    return out


def repeats_markdown(reports: list[dict], data: list[dict]) -> str:
    """A section per (model, trace) swept more than once: `across_repeats`."""
    groups: dict = {}
    for rep, runs in zip(reports, data):
        groups.setdefault((rep["model"], rep["trace"]), []).append(runs)
    out = []
    for (model, trace), sweeps in groups.items():
        rows = [f"| {name} | {k} | {len(r)} | {np.median(r):.2f} | {min(r):.2f}-{max(r):.2f} | "
                f"{sum(x <= 1 + TOLERANCE for x in r)} of {len(r)} |"
                for name, bins in across_repeats(sweeps).items() for k, r in bins.items()]
        if len(sweeps) > 1 and rows:
            out += [f"## {model}, trace {trace}: {len(sweeps)} repeats", "",
                    "Extend at equal work, each repeat of a run with caching against each repeat of its run without "
                    "caching (every pair):", "",
                    "| run | prefill tokens | pairs | median ratio | range | pairs passing |", "|---|---|---:|---:|---|---|",
                    *rows, ""]
    return "\n".join(out) + ("\n" if out else "")


def _f(x, fmt=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def markdown(reports: list[dict]) -> str:
    """One section per sweep (model, trace): runs, step time by prefill tokens, the extend check,
    TTFT against cached tokens per request, the saving per cached / skipped token."""
    out = []
    for rep in reports:
        bases = rep.get("baselines") or {"the run without caching": rep}
        out += [f"## {rep['model']}, trace {rep['trace']} ({rep['device']}, commit {rep['commit']})", "",
                *[f"Prefill cost in {k}: median {v['prefill_cost_per_token_us']:.2f} us per token (mean: total cost / "
                  f"tokens, {v['prefill_cost_per_token_mean_us']:.2f} us)." for k, v in bases.items()],
                *(["Each run with caching is compared with the run without caching of its own strategy (same page "
                   "size and allocator) where the sweep has one (the runs' `baseline`)."] if len(bases) > 1 else []),
                f"Marginal cost, the slope of a line through every run's steps with prefill: "
                f"{_f(rep.get('prefill_marginal_cost_per_token_us'))} us per token, plus "
                f"{_f(rep.get('prefill_step_fixed_cost_ms'), '.3f')} ms per step.", "",
                "| run | hit rate | preemptions | prefill tokens computed | cached tokens (admissions) | tokens skipped "
                "| TTFT mean / p50 / p99 ms | TPOT mean ms | req/s | saving per cached token (x median / x marginal cost) "
                "| saving per skipped token (x median / x mean cost) | <=64-token prefill step / decode step |",
                "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---:|"]
        for name, r in rep["runs"].items():
            out.append(f"| {name} | {_f(r['prefix_hit_rate'], '.3f')} | {r['preemptions']} | {r['prefill_tokens_computed']:,} "
                       f"| {r['cached_tokens']:,} | {r['tokens_skipped']:,} | {r['ttft_mean_ms']:.1f} / {r['ttft_p50_ms']:.1f} / "
                       f"{r['ttft_p99_ms']:.1f} | {r['tpot_mean_ms']:.2f} | {_f(r['request_throughput'])} "
                       f"| {_f(r.get('saving_per_cached_token_us'))} us (x{_f(r.get('saving_vs_prefill_cost'))} / x{_f(r.get('saving_vs_marginal_cost'))}) "
                       f"| {_f(r.get('saving_per_skipped_token_us'))} us (x{_f(r.get('saving_per_skipped_vs_median_cost'))} / "
                       f"x{_f(r.get('saving_per_skipped_vs_mean_cost'))}) | {_f(r['hit_step_vs_decode_step'])} |")
        out += ["", "Step time against prefill tokens computed in the step (median; ms per prefill token: median "
                "of step time / prefill tokens):", "", "| prefill tokens | " + " | ".join(rep["runs"]) + " |",
                "|---|" + "---|" * len(rep["runs"])]
        for label in LABELS:
            cells = []
            for r in rep["runs"].values():
                v = r["step_ms_by_prefill_tokens"].get(label)
                cells.append("-" if v is None else f"{v['steps']} steps, {v['median_ms']:.2f} ms"
                             + ("" if label == "decode only" else f", {v['median_ms_per_prefill_token'] * 1e3:.1f} us/token"))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += ["", f"Extend over a cached prefix against a plain prefill of the same length (median step time per "
                f"prefill token of steps over a prefix with caching / of plain prefills without; FAIL above {1 + TOLERANCE:.2f} with at least {MIN_STEPS} steps "
                "on both sides):", "", "| run | against | prefill tokens | steps (cache / no cache) | median step ms (cache / no cache) "
                "| ratio per token | verdict |", "|---|---|---|---|---|---:|---|"]
        rows = [f"| {name} | {r.get('baseline', '')} | {k} | {v['steps']} / {v['steps_nocache']} | {v['median_ms']:.2f} / "
                f"{v['median_ms_nocache']:.2f} | {v['ratio_per_token']:.2f} | {v['verdict']} |"
                for name, r in rep["runs"].items() for k, v in r.get("extend_vs_prefill", {}).items()]
        out += rows or ["| (no bin of prefill tokens has steps over a prefix with caching and plain prefills "
                        "without) | | | | | | |"]
        for key, fit_key, what in (("extend_at_equal_work", "work_model", "the run without caching pays"),
                                   ("extend_at_equal_work_pooled", "work_model_pooled",
                                    "the run without caching and its runs in small prefill chunks (`--chunked`, "
                                    "fitted as one) pay")):
            fits = {k: v[fit_key] for k, v in bases.items() if v.get(fit_key) is not None}
            rows = [f"| {name} | {r.get('baseline', '')} | {k} | {v['steps']} | {v['ratio']:.2f} | "
                    + ("-" if "interval" not in v else "{:.2f}-{:.2f}".format(*v["interval"])) + f" | {v['verdict']} |"
                    for name, r in rep["runs"].items() for k, v in r.get(key, {}).items()]
            if fits and rows:
                out += ["", f"The same steps at equal work: their prefill cost against what {what} for the same "
                        "prefill tokens and query-key pairs (steps with prefill, fitted per step, token and pair: "
                        + "; ".join(f"{k}: {w['tokens_min']}-{w['tokens_max']} tokens, up to "
                                    f"{_f(w.get('attended_max'), ',.0f')} pairs a token, {w['step_ms']:.3f} ms a step + "
                                    f"{w['token_us']:.2f} us a token + {w['pair_ns']:.4f} ns a pair" for k, w in fits.items())
                        + f"; steps in that range of tokens; median of measured / fitted; FAIL above {1 + TOLERANCE:.2f}; "
                        "the 90 % interval: bootstrap over the runs' steps, the fit redone each round):", "",
                        "| run | against | prefill tokens | steps | measured / at equal work | 90 % interval | verdict |",
                        "|---|---|---|---:|---:|---|---|", *rows]
        rows = [f"| {name} | {k} | {a} | {v['steps']} / {v['steps_chunked']} | {v['tokens']:.0f} / {_f(v['tokens_chunked'], '.0f')} "
                f"| {v['cost_ms']:.3f} / {_f(v['cost_ms_chunked'], '.3f')} | {_f(v['cost_ms'] / v['cost_ms_chunked'])} |"
                for name, r in rep["runs"].items() for k, cells in r.get("side_by_side_chunked", {}).items()
                for a, v in cells.items()]
        if rows:
            out += ["", "The same steps beside the runs without caching in small chunks, no fit: steps over a prefix "
                    "by prefill tokens and by query-key pairs per prefill token (the prefix attended over); median "
                    "prefill cost (step time minus its own run's decode step of the same batch):", "",
                    "| run | prefill tokens | pairs a token | steps (cache / chunks) | median prefill tokens "
                    "| median cost ms | ratio |", "|---|---|---|---|---|---|---:|", *rows]
        out += ["", "TTFT against cached tokens per request (finished requests, binned by the prompt tokens their "
                "admission found cached; new tokens = prompt - cached):", "",
                "| run | cached tokens | requests | TTFT mean ms | TTFT p50 ms | prompt mean | new tokens mean |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for name, r in rep["runs"].items():
            for k, v in r["ttft_by_cached_tokens"].items():
                out.append(f"| {name} | {k} | {v['requests']} | {v['ttft_mean_ms']:.1f} | {v['ttft_p50_ms']:.1f} "
                           f"| {v['prompt_mean']:.0f} | {v['new_tokens_mean']:.0f} |")
        out.append("")
    return "\n".join(out) + "\n"


def _fail(msg: str) -> None:
    print(f"prefix_saving: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/gpu_prefix_saving"))
    ap.add_argument("--note", default="", help="a line over the figure (commit, date, copy bandwidth)")
    ap.add_argument("--commit", default=None, help="commit of the runs, for the report (default: the summaries')")
    ap.add_argument("--chunked", nargs="+", type=Path, default=[], metavar="SWEEP",
                    help="sweeps of runs without caching in small prefill chunks (gpu_refit_runs.sh PS=mt64): each "
                    "joins the fit of the run of the same name, model and trace; a sweep without runs without caching "
                    "takes the first such run as its own")
    args = ap.parse_args()
    chunked: dict = {}  # (model, trace, run name) -> runs (summary, timeline, requests)
    for sweep in args.chunked:
        if not sweep.is_dir():
            _fail(f"--chunked {sweep} is not a sweep folder")
        for d in sorted(sweep.iterdir()):
            if (d / "summary.json").exists() and d.name.endswith("nocache"):
                run = load(d)
                chunked.setdefault((run[0].get("model"), run[0].get("trace"), d.name), []).append(run)
    reports, data = [], []
    for sweep in args.runs:
        if not sweep.is_dir():
            _fail(f"{sweep} is not a sweep folder")
        runs = {d.name: load(d) for d in sorted(sweep.iterdir()) if (d / "summary.json").exists()}
        if not runs:
            _fail(f"{sweep} has no finished run")
        first = next(iter(runs.values()))[0]
        mine = {k[2]: list(v) for k, v in chunked.items() if k[:2] == (first.get("model"), first.get("trace"))}
        bases = frozenset()
        if not any(k.endswith("nocache") for k in runs):  # the runs in small chunks are the baselines
            runs.update({k: v.pop(0) for k, v in mine.items()})
            bases = frozenset(mine)
        if not any(k.endswith("nocache") for k in runs):
            _fail(f"{sweep} has no finished run without caching (*nocache), nor has --chunked one of its model and trace")
        reports.append(model_report(runs, args.commit, {k: [tl for _, tl, _ in v] for k, v in mine.items()
                                                        if v and k in runs}, bases))
        data.append(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(reports, data, args.out / "prefix_saving.png", args.note)
    write_text_atomic(args.out / "prefix_saving.json", json.dumps(reports, indent=1, default=float) + "\n")
    write_text_atomic(args.out / "prefix_saving.md", markdown(reports) + repeats_markdown(reports, data))
    for rep in reports:
        print(f"\n{rep['model']} / {rep['trace']} on {rep['device']}: prefill {rep['prefill_cost_per_token_us']:.2f} us/token")
        for name, r in rep["runs"].items():
            print(f"  {name:28s} hit {r['prefix_hit_rate']:.3f}  TTFT mean {r['ttft_mean_ms']:.1f} ms "
                  f"p50 {r['ttft_p50_ms']:.1f} p99 {r['ttft_p99_ms']:.1f}  TPOT {r['tpot_mean_ms']:.2f} ms  "
                  f"<=64-token prefill step / decode step {r['hit_step_vs_decode_step']:.2f}  "
                  f"saving/cached token {r.get('saving_per_cached_token_us', float('nan')):.2f} us "
                  f"(x{r.get('saving_vs_prefill_cost', float('nan')):.2f} of the median prefill cost, "
                  f"x{r.get('saving_vs_marginal_cost', float('nan')):.2f} of the marginal one)")


if __name__ == "__main__":
    main()
