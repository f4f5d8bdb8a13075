"""What `kvbench` prints: one run's results (the layout of `vllm bench serve` and SGLang's
`bench_serving`), a sweep's table (one row per run) and a sweep's progress line.

Reads summary.json dicts and run folders only; imports neither pandas nor matplotlib (the CLI
imports this module on every run). Nothing here writes files.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

WIDTH = 50  # of the single-run block
LATENCIES = [("TTFT", "ttft", "time to first token"), ("TPOT", "tpot", "time per output token, excl. the 1st"),
             ("ITL", "itl", "inter-token latency"), ("E2E", "e2e", "end-to-end latency")]
# (header, summary key, format): the sweep table's metrics, after the keys that vary
SWEEP_METRICS = [("done", "finished", "{:.0f}"), ("rej", "rejected", "{:.0f}"), ("preempt", "preemptions", "{:.0f}"),
                 ("req/s", "request_throughput", "{:.2f}"), ("out tok/s", "output_throughput", "{:.0f}"),
                 ("TTFT p50 ms", "ttft_p50_s", "ms"), ("TTFT p99 ms", "ttft_p99_s", "ms"),
                 ("TPOT p50 ms", "tpot_p50_s", "ms"), ("E2E p50 s", "e2e_p50_s", "{:.2f}"),
                 ("tok states", "mem_token_states_frac", "{:.3f}"), ("waste", "waste_frac", "{:.3f}"),
                 ("hit", "prefix_hit_rate", "{:.3f}"), ("peak run", "peak_running", "{:.0f}")]


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _fmt(v, fmt: str) -> str:
    x = _num(v)
    if x is None:
        return "-"
    if fmt == "ms":
        x *= 1e3
        return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 100 else f"{x:.2f}"
    return fmt.format(x)


def _line(name: str, value: str) -> str:
    return f"{name:<{WIDTH - 12}}{value:>12}"


def _rule(title: str) -> str:
    return f" {title} ".center(WIDTH, "-")


def run_block(s: dict) -> str:
    """One run's results as `vllm bench serve` prints them: counts, duration and throughput,
    then mean / median / p99 of TTFT, TPOT, ITL and E2E in milliseconds, then the KV cache."""
    head = f" {s.get('label', s.get('strategy', '?'))} · {s.get('trace', '?')} · {s.get('engine', '?')} "
    out = [head.center(WIDTH, "="),
           _line("Successful requests:", _fmt(s.get("finished"), "{:.0f}")),
           _line("Rejected requests:", _fmt(s.get("rejected"), "{:.0f}")),
           _line("Preemptions:", _fmt(s.get("preemptions"), "{:.0f}")),
           _line("Duration (s, served):", _fmt(s.get("duration_s"), "{:.2f}")),
           _line("Request throughput (req/s):", _fmt(s.get("request_throughput"), "{:.2f}")),
           _line("Output token throughput (tok/s):", _fmt(s.get("output_throughput"), "{:.2f}")),
           _line("Total token throughput (tok/s):", _fmt(s.get("total_token_throughput"), "{:.2f}"))]
    out.append(f"{'Latency (ms)':<14}{'mean':>12}{'median':>12}{'p99':>12}")
    for name, key, _ in LATENCIES:
        out.append(f"{name:<14}" + "".join(f"{_fmt(s.get(f'{key}_{q}_s'), 'ms'):>12}" for q in ("mean", "p50", "p99")))
    out += [_rule("KV cache"),
            _line("Token states (mean share of the pool):", _fmt(s.get("mem_token_states_frac"), "{:.3f}")),
            _line("Waste (share of the memory held):", _fmt(s.get("waste_frac"), "{:.3f}")),
            _line("Prefix hit rate:", _fmt(s.get("prefix_hit_rate"), "{:.3f}")),
            _line("Running requests (mean / peak):",
                  f"{_fmt(s.get('mean_running'), '{:.1f}')} / {_fmt(s.get('peak_running'), '{:.0f}')}"),
            _line("Wall time (s):", _fmt(s.get("wall_time_s"), "{:.2f}")),
            "=" * WIDTH]
    return "\n".join(out)


def strategy_label(strategy) -> str:
    """The label a strategy config will report (as its class's `label`: slab-oracle, paged-16,
    paged-16-nocache, radix-1), for run folder names (the resolver `${kvbench_label:${strategy}}`)
    and the rows of runs that failed before they had a summary."""
    if strategy is None or not hasattr(strategy, "get"):
        return str(strategy)
    name = str(strategy.get("name", "strategy"))
    if strategy.get("reservation") is not None:
        return f"{name}-{strategy.get('reservation')}"
    label = f"{name}-{strategy.get('page_size')}" if strategy.get("page_size") is not None else name
    if strategy.get("prefix_caching") is False:
        return f"{label}-nocache"
    eviction = strategy.get("eviction")
    eviction = eviction if isinstance(eviction, str) or eviction is None else getattr(eviction, "get", dict().get)("name")
    return (label + ("-touch" if strategy.get("dedup_touch") else "")
            + ("" if eviction in (None, "lru") else f"-{eviction}")
            + ("-noout" if strategy.get("cache_outputs") is False else "")
            + (f"-min{strategy.get('min_cache_len')}" if strategy.get("min_cache_len") else ""))


def _natural(text: str) -> list:
    return [(0, float(p), "") if _is_number(p) else (1, 0.0, p) for p in re.split(r"(-?\d+(?:\.\d+)?)", text) if p]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _job_num(run: Path) -> float:
    head = run.name.split("_", 1)[0]
    return int(head) if head.isdigit() else math.inf


def _overrides(run: Path) -> dict[str, str]:
    """key -> value of a run's Hydra overrides (its .hydra/overrides.yaml; plain `- k=v` lines)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    pairs = [ln[2:].strip().strip("'\"") for ln in path.read_text().splitlines() if ln.startswith("- ")]
    return {k.lstrip("+~"): v for k, _, v in (p.partition("=") for p in pairs)}


def _planned_label(run: Path) -> str | None:
    """The label of the strategy a run dir's saved Hydra config asked for (None without one)."""
    from omegaconf import OmegaConf

    try:
        return strategy_label(OmegaConf.load(run / ".hydra" / "config.yaml").get("strategy"))
    except (OSError, ValueError, AttributeError):
        return None


def sweep_table(rows: list[tuple[Path, dict | None, str | None]]) -> str:
    """One row per run (job order): the strategy label, the keys that vary across the sweep,
    then the headline metrics (latencies in ms). `rows`: (run dir, summary or None, why it failed)."""
    rows = sorted(rows, key=lambda r: (_job_num(r[0]), _natural(r[0].name)))
    over = [_overrides(run) for run, _, _ in rows]
    keys = sorted({k for o in over for k in o}, key=_natural)
    vary = [k for k in keys if len({o.get(k, "") for o in over}) > 1 and k != "strategy"]
    header = ["#", "strategy", *vary, *[h for h, _, _ in SWEEP_METRICS]]
    table = [header]
    for (run, s, why), o in zip(rows, over):
        num = str(int(_job_num(run))) if _job_num(run) != math.inf else run.name
        label = (s or {}).get("label") or _planned_label(run) or o.get("strategy", "?")
        cells = [num, str(label), *[o.get(k, "-") for k in vary]]
        if s is None:
            cells.append(f"FAILED: {why or 'no summary.json'}")
        else:
            cells += [_fmt(s.get(key), fmt) for _, key, fmt in SWEEP_METRICS]
        table.append(cells)
    widths = [max(len(r[i]) for r in table if i < len(r) and not (len(r) < len(header) and i == len(r) - 1))
              for i in range(len(header))]
    numeric = {i for i in range(2, 2 + len(vary)) if all(_is_number(r[i]) or r[i] == "-" for r in table[1:])}
    lines = []
    for r in table:
        cells = [c.rjust(w) if i == 0 or i >= 2 + len(vary) or i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        if len(r) < len(header):  # a failed run: its reason runs across the metric columns
            cells = cells[:-1] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def sweep_rows(root: Path, runs: list[Path] | None = None) -> list[tuple[Path, dict | None, str | None]]:
    """The runs of a sweep folder's grid, finished or failed (why), for sweep_table. Folders
    left by an earlier grid are left out; jobs that never ran have no folder and no row.
    `runs`: discover([root])'s finished runs, when the caller has them."""
    from kvbench.report.collect import discover, error_line, sweep_jobs

    if runs is None:
        runs, _, _ = discover([root])
    rows: list[tuple[Path, dict | None, str | None]] = [(r, json.loads((r / "summary.json").read_text()), None)
                                                        for r in runs]
    jobs = sweep_jobs(root) if (root / "multirun.yaml").exists() else None
    grid = {frozenset(j) for j in jobs} if jobs is not None else None
    for d in sorted(p.parent.parent for p in root.glob("*/.hydra/overrides.yaml")):
        if d in runs or (d / "summary.json").exists():
            continue
        mine = [ln[2:].strip() for ln in (d / ".hydra/overrides.yaml").read_text().splitlines() if ln.startswith("- ")]
        if grid is None or frozenset(m.strip("'\"") for m in mine) in grid:
            rows.append((d, None, (error_line(d) or "no summary.json and no error.txt").removeprefix("kvbench: ")))
    return rows


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_line(done: int, failed: int, total: int, elapsed_s: float) -> str:
    """'sweep: 3/40 runs done (1 failed), 12 s elapsed, ETA 2 min 28 s' (ETA from the mean so far)."""
    bad = f" ({failed} failed)" if failed else ""
    eta = "" if done == 0 or done >= total else f", ETA {duration(elapsed_s / done * (total - done))}"
    return f"kvbench: sweep {done}/{total} runs done{bad}, {duration(elapsed_s)} elapsed{eta}"
