"""Find the runs under some folders and gather them into one tidy table (one row per run).

A run is a folder with `summary.json` (written by `kvbench.run.run` with `config.yaml`,
`requests.parquet` and `timeline.parquet` beside it). A sweep is a folder with Hydra's
`multirun.yaml`: from it the basic sweeper's grid is expanded again, so a job that failed (its
folder has `.hydra/` but no `summary.json`; its `error.txt` says why) or never ran (no folder) is
listed as missing.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from kvbench.report.style import HELD, STATES, TIMELINE_STATE

TIMELINE_BINS = 1500  # a timeline is averaged into at most this many time bins (time-weighted)
REPORT_DIR = "report"


@dataclass
class Missing:
    where: str  # the sweep or run folder
    job: str  # its overrides, or the folder name
    why: str
    error: str | None = None  # the first line of the run dir's error.txt, when it failed and said why


class RunFiles(Mapping):
    """run -> a frame read from the run's folder the first time it is asked for, then kept. The
    figures draw the requests and timelines of a few runs (one per strategy and trace), so a
    sweep's report reads those files for them only, not for all its runs (issue 13 §5: 100 runs'
    parquet files were ~40 % of a sweep's report). Keys: the runs that have such a file."""

    def __init__(self, read: Callable[[Path], pd.DataFrame], paths: dict[str, Path]) -> None:
        self._read, self._paths, self._got = read, dict(paths), {}

    def __getitem__(self, run: str) -> pd.DataFrame:
        if run not in self._got:
            self._got[run] = self._read(self._paths[run])
        return self._got[run]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, run: object) -> bool:
        return run in self._paths


@dataclass
class Collection:
    table: pd.DataFrame  # one row per run; column "run" is the run folder
    timelines: Mapping[str, pd.DataFrame]  # run -> binned timeline (t_s, running, waiting, state fractions); read when asked
    requests: Mapping[str, pd.DataFrame]  # run -> finished requests (ttft_s, tpot_s, e2e_s, ...); read when asked
    missing: list[Missing]
    root: Path  # the folder that run names are relative to
    ignored: list[Missing]  # runs of an earlier grid found in a sweep folder: not reported


def _show(path: Path) -> str:
    """`path` relative to the current directory when it lies below it (for reports)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _skip(path: Path) -> bool:
    return REPORT_DIR in path.parts


def sweep_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The override lists of every job of a basic-sweeper sweep, in job order (None: not a
    basic sweep). The same expansion as Hydra's BasicSweeper: sweeper params, then the
    command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import yaml

    if not _LOADER:
        _LOADER.append(_yaml_loader())
    cfg = yaml.load((sweep_dir / "multirun.yaml").read_text(encoding="utf-8"), Loader=_LOADER[0])  # (OmegaConf.load's)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("hydra"), dict):
        cfg = OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml"), resolve=False)
    sweeper = cfg["hydra"].get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in cfg["hydra"]["overrides"]["task"]]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    return [job for batch in batches for job in batch]


def error_line(run: Path) -> str | None:
    """The first line of a run dir's error.txt (why it failed), if it has one."""
    try:
        return (run / "error.txt").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def failure(run: Path) -> str:
    """Why a run dir has no summary.json: its error.txt's first line, or that it has none."""
    first = error_line(run)
    if first is None:
        return f"{run.name} has no summary.json and no error.txt (killed, or still running)"
    return f"{run.name}: {first.removeprefix('kvbench: ')}"


def discover(dirs: list[Path]) -> tuple[list[Path], list[Missing], list[Missing]]:
    """Run folders with a summary.json under `dirs`; the jobs of a sweep that should be there
    but aren't; and runs left in a sweep folder by an earlier, different grid (ignored)."""
    runs: set[Path] = set()
    missing: list[Missing] = []
    ignored: list[Missing] = []
    for d in dirs:
        if not d.is_dir():
            missing.append(Missing(_show(d), "-", "no such folder"))
            continue
        runs |= {p.parent for p in d.rglob("summary.json") if not _skip(p)}
        tried = {p.parent.parent for p in d.rglob(".hydra/overrides.yaml") if not _skip(p)}
        explained: set[Path] = set()
        for sweep in sorted({p.parent for p in d.rglob("multirun.yaml") if not _skip(p)}):
            jobs = sweep_jobs(sweep)
            if jobs is None:
                continue
            by_overrides = {frozenset(_overrides(t)): t for t in tried if t.parent == sweep}
            for num, job in enumerate(jobs):
                t = by_overrides.pop(frozenset(job), None)
                if t is None:
                    missing.append(Missing(_show(sweep), " ".join(job), f"job {num} never ran (no run folder)"))
                elif t not in runs:
                    missing.append(Missing(_show(sweep), " ".join(job), f"job {num} failed: {failure(t)}",
                                           error_line(t)))
                explained |= {t} if t is not None else set()
            for job, t in sorted(by_overrides.items(), key=lambda kv: kv[1]):  # not in the grid
                ignored.append(Missing(_show(sweep), " ".join(sorted(job)), f"{t.name}: not in the sweep's grid "
                                       "(left by an earlier sweep into this folder)"))
                runs.discard(t)
                explained.add(t)
        for t in sorted(tried - runs - explained):
            missing.append(Missing(_show(t.parent), t.name, f"failed: {failure(t)}", error_line(t)))
    return sorted(runs), missing, ignored


def _yaml_loader() -> type:
    """OmegaConf's yaml loader (its float, timestamp and duplicate-key rules) on libyaml's C
    parser when there is one: the same dicts as OmegaConf.load + to_container, faster."""
    import yaml
    from omegaconf._utils import get_yaml_loader

    loader = get_yaml_loader()
    if not getattr(yaml, "__with_libyaml__", False):
        return loader

    class CLoader(yaml.cyaml.CParser, loader):
        def __init__(self, stream) -> None:
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    return CLoader


_LOADER: list[type] = []  # built once per process


def _overrides(run: Path) -> list[str]:
    """A run's .hydra/overrides.yaml: its job's overrides (OmegaConf.load's strings, on libyaml)."""
    import yaml

    if not _LOADER:
        _LOADER.append(_yaml_loader())
    got = yaml.load((run / ".hydra/overrides.yaml").read_text(encoding="utf-8"), Loader=_LOADER[0])
    return [str(o) for o in got] if isinstance(got, list) else list(OmegaConf.load(run / ".hydra/overrides.yaml"))


def _config(run: Path) -> dict:
    """The run's config.yaml (written resolved) as a dict; {} when there is none."""
    import yaml

    path = run / "config.yaml"
    if not path.exists():
        return {}
    if not _LOADER:
        _LOADER.append(_yaml_loader())
    obj = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER[0])
    return obj if isinstance(obj, dict) else OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def bin_timeline(timeline: pd.DataFrame, capacity: int, bins: int = TIMELINE_BINS) -> pd.DataFrame:
    """Time-weighted means of running, waiting and the state fractions over equal time bins.

    timeline: one row per step [t_s, t_s + dt_s). Returns t_s (bin start), running, waiting and
    one column per state (a fraction of capacity). A bin without steps (the server idles) has
    running = waiting = 0 and NaN states (drawn as a gap)."""
    t, dt = timeline.t_s.to_numpy(), timeline.dt_s.to_numpy()
    cols = {"running": timeline.running.to_numpy(), "waiting": timeline.waiting.to_numpy()}
    cols |= {s: timeline[TIMELINE_STATE[s]].to_numpy() / capacity for s in STATES}
    if len(t) == 0:
        return pd.DataFrame(columns=["t_s", *cols])
    edges = np.linspace(t[0], t[-1] + dt[-1], min(bins, len(t)) + 1)
    # a step may span several bins: each bin gets the part of each step that falls in it
    k = np.searchsorted(t, edges, side="right") - 1  # [bins + 1] the step that starts last before each edge
    inside = np.clip(edges - t[np.maximum(k, 0)], 0.0, dt[np.maximum(k, 0)]) * (k >= 0)

    def integral(v: np.ndarray) -> np.ndarray:  # [bins + 1] ∫ v over [t[0], edge)
        before = np.concatenate([[0.0], np.cumsum(v * dt)])[np.maximum(k, 0)]
        return before + v[np.maximum(k, 0)] * inside

    weight = np.diff(integral(np.ones_like(dt)))
    idle = weight <= 1e-12 * max(float(dt.sum()), 1e-30)  # no step in the bin: the server idles
    out = {"t_s": edges[:-1]}
    for name, v in cols.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(idle, np.nan, np.diff(integral(v.astype(float))) / weight)
    df = pd.DataFrame(out)
    df.loc[idle, ["running", "waiting"]] = 0.0  # the states stay NaN there: nothing was measured
    return df


def _row(run: Path, rel: str, summary: dict, cfg: dict, arrivals: np.ndarray) -> dict:
    trace_cfg = cfg.get("trace", {}) if isinstance(cfg.get("trace"), dict) else {}
    strat_cfg = cfg.get("strategy", {}) if isinstance(cfg.get("strategy"), dict) else {}
    span = float(arrivals.max() - arrivals.min()) if len(arrivals) > 1 else 0.0
    rate = trace_cfg.get("rate")
    row = {"run": rel, "label": summary.get("label", summary.get("strategy")),
           "trace_rate": float(rate) if isinstance(rate, (int, float)) else np.nan,
           "offered_rate": (len(arrivals) - 1) / span if span > 0 else np.nan,
           "prefix_caching": strat_cfg.get("prefix_caching"),
           "max_model_len": cfg.get("max_model_len"), "trace_limit": trace_cfg.get("limit")}
    for k, v in summary.items():
        if isinstance(v, (dict, list)):
            row[k] = json.dumps(v, sort_keys=True)
        elif k not in row or row[k] is None:
            row[k] = v
    held = sum(summary.get(f"mem_{s}_frac", 0.0) for s in HELD)
    for s in HELD:  # the vLLM paper's Figure 2 view: shares of the memory requests hold
        row[f"held_{s}_frac"] = summary.get(f"mem_{s}_frac", 0.0) / held if held > 0 else np.nan
    return row


def _read_run(run: Path, rel: str) -> tuple:
    """One run's ("ok", row, whether it has a timeline), or ("unreadable", why). Of its requests
    only the arrival times are read (the row's offered rate); figures read the rest when drawn."""
    import pyarrow.parquet as pq

    try:
        summary = json.loads((run / "summary.json").read_text())
        cfg = _config(run)
        arrivals = (pq.read_table(run / "requests.parquet", columns=["arrival_s"]).column(0).to_numpy()
                    if (run / "requests.parquet").exists() else np.array([]))
    except (OSError, ValueError, KeyError) as err:
        return ("unreadable", " ".join(str(err).split()))
    return ("ok", _row(run, rel, summary, cfg, arrivals), (run / "timeline.parquet").exists())


def finished_requests(run: Path) -> pd.DataFrame:
    """A run's finished requests (requests.parquet's rows with status 'finished'), renumbered."""
    req = pd.read_parquet(run / "requests.parquet") if (run / "requests.parquet").exists() else pd.DataFrame(
        columns=["arrival_s", "status", "ttft_s", "tpot_s", "e2e_s"])
    return req[req.status == "finished"].reset_index(drop=True)


def binned_timeline(run: Path, bins: int = TIMELINE_BINS) -> pd.DataFrame:
    """A run's timeline.parquet binned (bin_timeline) by its summary's capacity."""
    capacity = int(json.loads((run / "summary.json").read_text())["kv_capacity_tokens"])
    return bin_timeline(_binned_columns(run / "timeline.parquet"), capacity, bins)


def _binned_columns(path: Path) -> pd.DataFrame:
    """The timeline columns bin_timeline reads (a third of the file's: ~3x faster to read); the
    whole file if one of them is missing (bin_timeline then says which)."""
    try:
        return pd.read_parquet(path, columns=["t_s", "dt_s", "running", "waiting", *(TIMELINE_STATE[s] for s in STATES)])
    except (KeyError, ValueError):
        return pd.read_parquet(path)


def collect(dirs: list[Path], bins: int = TIMELINE_BINS) -> Collection:
    """Everything a report needs from the runs under `dirs` (see the module docstring). The runs'
    summaries and configs are read in forked processes (kvbench/report/forked.py), one per CPU;
    their requests and binned timelines when a figure first asks for them (RunFiles)."""
    from functools import partial

    from kvbench.report.forked import fork_map, processes

    dirs = [Path(d).resolve() for d in dirs]
    run_dirs, missing, ignored = discover(dirs)
    root = dirs[0] if len(dirs) == 1 else Path(os.path.commonpath([str(d) for d in dirs]))
    rows, timelines, requests = [], {}, {}
    rels = []
    for run in run_dirs:
        rel = str(run.relative_to(root)) if run.is_relative_to(root) else str(run)
        rels.append(rel if rel != "." else run.name)
    pieces = [partial(_read_run, run, rel) for run, rel in zip(run_dirs, rels)]
    for run, rel, got in zip(run_dirs, rels, fork_map(pieces, chunk=-(-len(pieces) // (4 * processes())))):
        if got[0] == "unreadable":
            missing.append(Missing(_show(run.parent), run.name, f"unreadable: {got[1]}"))
            continue
        _, row, has_timeline = got
        rows.append(row)
        requests[rel] = run
        if has_timeline:
            timelines[rel] = run
    table = pd.DataFrame(rows)
    if len(table):
        natural = lambda runs: runs.map(lambda r: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", r)])  # noqa: E731
        table = table.sort_values("run", key=natural, kind="stable").sort_values("trace", kind="stable",
                                                                                   ignore_index=True)
    return Collection(table, RunFiles(partial(binned_timeline, bins=bins), timelines),
                      RunFiles(finished_requests, requests), missing, root, ignored)
