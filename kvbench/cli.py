"""`kvbench`: the Hydra app. A thin shell around kvbench.run.run that turns errors into one line.

Exit codes: 0 done; 2 bad input (one line on stderr: a config value, a trace, an unwritable run
dir, a Hydra override or plugin); 130 interrupted (Ctrl-C); 1 a bug (a traceback). In a sweep
(-m) a job that fails is recorded (its run dir's error.txt, the report's missing runs) and the
sweep goes on; it exits 2 at the end if any job failed on bad input, 1 if any failed otherwise.
Each run dir keeps run.log: what ran, what came out, or why it failed.
"""
from __future__ import annotations

import _thread
import logging
import os
import re
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvbench import compose_cache
from kvbench.report.console import strategy_label  # no pandas, no plotting: `kvbench --help` stays fast

log = logging.getLogger("kvbench")
OmegaConf.register_new_resolver("kvbench_label", strategy_label, replace=True)  # also in launcher workers
compose_cache.install()  # a sweep's jobs share one compose memo per process (here and in launcher workers)


def _one_line(err: BaseException) -> str:
    cause = err
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    msg = str(cause) if cause is err else f"{type(cause).__name__}: {cause}"
    if isinstance(err, InstantiationException) and "full_key:" in str(err):
        msg += f" (in config '{str(err).rsplit('full_key:', 1)[1].strip()}')"
    return " ".join(msg.split())


def hydra_one_line(err: BaseException) -> str:
    """One line from Hydra's and OmegaConf's multi-line messages: the first line, the cause's
    first line and key, the other lines; the options a missing config had; no search path."""
    plugin = re.search(r"Unknown plugin class : 'hydra_plugins\.(\w+)", str(err))
    if isinstance(err, RuntimeError) and plugin:
        return f"the Hydra plugin {plugin.group(1)} is not installed (pip install {plugin.group(1).replace('_', '-')})"
    if isinstance(err, OSError) and err.filename is not None and not isinstance(err, HydraException):
        return f"cannot write {err.filename}: {err.strerror}"
    if getattr(err, "override", None) is not None and getattr(err, "message", None):  # OverrideParseException
        return f"cannot parse the override '{err.override}': {err.message}"
    text = str(err).split("Config search path:")[0]
    text, _, options = text.partition("Available options")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    omegaconf_trailer = ("full_key:", "reference_type", "object_type")
    lines = [ln for ln in lines if not ln.startswith(omegaconf_trailer)] or [type(err).__name__]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        key = re.search(r"full_key: (\S+)", str(cause))
        lines.insert(1, f"{first}" + (f" (key {key.group(1)})" if key else ""))
    msg = lines[0].rstrip(".:") + (": " + " ".join(lines[1:2]) if len(lines) > 1 else "")
    msg += "".join(f". {ln}" for ln in lines[2:])
    names = re.findall(r"^\t(\S+)$", options, re.M)
    return msg + (f" (choose from: {', '.join(names)})" if names else "")


CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _input_errors() -> tuple[type[BaseException], ...]:
    from kvbench.run import OutputError
    from kvbench.traces import TraceError

    return (TraceError, ValueError, FileNotFoundError, KeyError, InstantiationException,
            OmegaConfBaseException, OutputError)


def warmup_gap(cfg: DictConfig) -> str | None:
    """A line when the gpu engine's graph warm-up is bounded below the scheduler's batch
    (engine.max_num_seqs < scheduler.max_num_seqs, as gpu_refit_runs.sh sets it to keep the
    warm-up short): a step of more requests then captures its graph inside the replay (the 8B
    multi-turn runs of session 46, peak 34 running, captured 39-84 graphs there). Else None."""
    eng, sched = cfg.get("engine") or {}, cfg.get("scheduler") or {}
    warm, mine, seqs = eng.get("graph_warmup"), eng.get("max_num_seqs"), sched.get("max_num_seqs")
    if not eng.get("cuda_graphs") or warm in (None, "none") or not mine or not seqs or mine >= seqs:
        return None
    return (f"engine.max_num_seqs={mine} < scheduler.max_num_seqs={seqs}: graph_warmup={warm} captures the graphs of "
            f"steps of at most {mine} requests; a step of more captures its graph in the replay "
            "(the summary's cuda_graph_captures_in_replay)")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    """One job. A single run exits 2 on bad input; in a sweep a failed job is recorded in its
    run dir (error.txt, run.log) and on stderr, and the sweep goes on."""
    from kvbench.run import record_failure, run  # imported late: keeps `kvbench --help` fast

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode is not None and hc.mode.name == "MULTIRUN"
    job = f"job {hc.job.num} ({' '.join(hc.overrides.task)}): " if sweep else ""
    log.info("kvbench %s", " ".join(hc.overrides.task))
    if gap := warmup_gap(cfg):
        log.warning(gap)
    try:
        summary = run(cfg, out_dir)
    except KeyboardInterrupt:
        log.error("interrupted")
        record_failure(out_dir, "kvbench: interrupted (Ctrl-C) before the run finished")
        raise
    except _input_errors() as err:
        line = f"kvbench: error: {_one_line(err)}"
        log.error(line)
        record_failure(out_dir, line)
        print(f"kvbench: error: {job}{_one_line(err)}", file=sys.stderr)
        if not sweep:
            sys.exit(2)
        return
    except Exception as err:  # a bug: the traceback goes to error.txt and run.log
        what = f"{type(err).__name__}: {' '.join(str(err).split())}"
        log.exception("kvbench: unexpected error: %s", what)
        record_failure(out_dir, f"kvbench: unexpected error: {what}", err)
        if not sweep:
            raise
        print(f"kvbench: unexpected error: {job}{what} (traceback in {out_dir / 'error.txt'})", file=sys.stderr)
        return
    from kvbench.report.console import run_block

    table = run_block(summary)
    log.info("results in %s\n%s", out_dir, table)
    if not sweep:  # a sweep prints one table of all its runs at the end (CompareRuns)
        print(table)
        print(f"results: {out_dir}")


_SWEEP_SIZE: dict[tuple[str, float], int | None] = {}  # (sweep dir, multirun.yaml mtime) -> jobs; None: not basic


class CompareRuns(Callback):
    """A sweep's console: a progress line after each job (runs done / total, failed, ETA) and,
    at the end, one table with a row per run (the keys that vary across the sweep, then the
    headline metrics); names the jobs that failed (main() then exits non-zero)."""

    exit_code = 0  # set at the end of a sweep with failed jobs; read by main()

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        """Runs where the job ran (a launcher's worker too): counts the jobs of this sweep that
        ended from marker files in the sweep folder's .progress/, so it works across processes."""
        import time

        from kvbench.report.collect import sweep_jobs
        from kvbench.report.console import progress_line

        if config.hydra.mode is None or config.hydra.mode.name != "MULTIRUN":
            return
        try:
            root, run = Path(config.hydra.sweep.dir), Path(config.hydra.runtime.output_dir)
            started = (root / "multirun.yaml").stat().st_mtime
            marks = root / ".progress"
            marks.mkdir(exist_ok=True)
            (marks / str(config.hydra.job.num)).write_text("failed" if (run / "error.txt").exists() else "done")
            with os.scandir(marks) as entries:  # (no Path per marker: ~0.5 ms a job on a 100-job sweep)
                ended = [(e.path, st.st_size) for e in entries if (st := e.stat()).st_mtime >= started]
            failed = sum(size == len("failed") and Path(m).read_text() == "failed" for m, size in ended)  # (not every "done")
            key = (str(root), started)
            if key not in _SWEEP_SIZE:  # parsed once per process, not once per job
                jobs = sweep_jobs(root)
                _SWEEP_SIZE[key] = len(jobs) if jobs is not None else None
            total = _SWEEP_SIZE[key] if _SWEEP_SIZE[key] is not None else len(ended)
            print(progress_line(len(ended), failed, total, time.time() - started), file=sys.stderr, flush=True)
        except (OSError, ValueError) as err:  # a progress line is not worth failing a run for
            log.warning("no progress line: %s", err)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from kvbench.report.collect import discover
        from kvbench.report.console import sweep_rows, sweep_table

        root = Path(config.hydra.sweep.dir)
        runs, missing, _ = discover([root])
        rows = sweep_rows(root, runs)
        if rows:
            print(f"\n{len(runs)} runs under {root}:\n{sweep_table(rows)}")
        if missing:
            bad_input = all((m.error or "").startswith("kvbench: error:") for m in missing)
            CompareRuns.exit_code = 2 if bad_input else 1
            print(f"kvbench: error: {len(missing)} of {len(missing) + len(runs)} runs failed "
                  f"(why: error.txt in each run dir): {'; '.join(f'{m.job}: {m.why}' for m in missing)}",
                  file=sys.stderr)


GROUPS = ("strategy", "trace", "engine", "model", "logger", "experiment")
_NO_RUN = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc")


def unknown_choice(args: list[str]) -> str | None:
    """A one-line error for `group=name` overrides that name no yaml (Hydra's own is a page)."""
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value.startswith(("choice(", "range(", "glob(")):
            continue
        folder = Path(CONFIG_DIR) / key
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        for name in filter(None, value.split(",")):
            if name not in known and name != "null":
                return f"unknown {key} '{name}' in '{arg}' (choose from: {', '.join(known)})"
    return None


def experiment_without_sweep(args: list[str]) -> str | None:
    """An experiment is a sweep: without -m it would silently be one default run."""
    if any(a in ("-m", "--multirun") or a.startswith(_NO_RUN) for a in args):
        return None
    for arg in args:
        if arg.lstrip("+").startswith("experiment=") and arg.split("=", 1)[1] not in ("null", ""):
            return f"'{arg}' is a sweep: run it with -m (kvbench -m {' '.join(args)})"
    return None


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        mine = installed("kvbench")
    except PackageNotFoundError:
        mine = "unknown (not installed)"
    return f"kvbench {mine} (Hydra {hydra.__version__}, Python {sys.version.split()[0]})"


def plain_args(args: list[str]) -> list[str]:
    """-m first (Hydra's parser takes no option after an override); `+experiment=X` as
    `experiment=X` (experiment is an optional default now; the `+` form of older docs still
    works); `publish=true` as the report callback's switch (kept out of the run's config, so a
    published run is the same run)."""
    args = [a for a in args if a in ("-m", "--multirun")][:1] + [a for a in args if a not in ("-m", "--multirun")]
    args = [a[1:] if a.startswith("+experiment=") else a for a in args]
    return [f"hydra.callbacks.report.{a}" if a.split("=")[0] == "publish" else a for a in args]


def publish_without_experiment(args: list[str]) -> str | None:
    """publish=true is the switch of an experiment's report: alone it would name no report."""
    if any(a.startswith("hydra.callbacks.report.publish=") for a in args) and \
            not any(a.lstrip("+").startswith("experiment=") for a in args):
        return "publish=true writes an experiment's report to results/<name>/: use it with experiment=NAME"
    return None


def check_each_value_once() -> None:
    """Hydra composes every job of a sweep in the parent before launching any (to fail early),
    then again where the job runs: a grid of 100 runs is 100 serial composes (~0.1 s each)
    before the first run starts. Here the parent composes only the jobs that bring an override
    not composed yet (every `key=value` of the sweep at least once: 4 strategies x 25 rates is
    28 composes, not 100), so a bad value still stops the sweep before any run; every job is
    still composed in full where it runs. Mutates BasicSweeper.validate_batch_is_legal (once)."""
    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra's plugin scan executes its plugin modules anew: patch the class it keeps
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    whole = BasicSweeper.validate_batch_is_legal
    if getattr(whole, "_kvbench", False):
        return

    def validate_batch_is_legal(self, batch) -> None:
        seen: set[str] = set()
        chosen = []
        for job in batch:
            if not seen.issuperset(job):
                seen.update(job)
                chosen.append(job)
        whole(self, chosen)

    validate_batch_is_legal._kvbench = True
    BasicSweeper.validate_batch_is_legal = validate_batch_is_legal


def register_launcher() -> None:
    """Register the repository's launcher plugin (hydra_plugins/kvbench_launcher: `hydra/launcher=
    parallel`) with Hydra. Hydra finds plugins by scanning the installed `hydra_plugins` package,
    which this one is not part of (it sits next to configs/, like them read from the checkout);
    it is imported under its plugin name, as Hydra requires. Idempotent; mutates Hydra's Plugins."""
    import importlib.util

    from hydra.core.plugins import Plugins

    name = "hydra_plugins.kvbench_launcher"
    if name not in sys.modules:
        try:
            import hydra_plugins  # noqa: F401  (the namespace package, for the submodule below)
        except ModuleNotFoundError:  # no Hydra plugin installed (`pip install -e .` alone): ours only
            import types

            sys.modules["hydra_plugins"] = types.ModuleType("hydra_plugins")
            sys.modules["hydra_plugins"].__path__ = [str(Path(CONFIG_DIR).parent / "hydra_plugins")]
        folder = Path(CONFIG_DIR).parent / "hydra_plugins" / "kvbench_launcher"
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    Plugins.instance().register(sys.modules[name].WarmJoblibLauncher)


SWEEP_GC_THRESHOLD = 20000  # first-generation collections every this many allocations (Python's: 700)


def sweep_gc() -> None:
    """A sweep's process collects cyclic garbage less often: Hydra's composes and the report make
    ~10^5 short-lived objects each, and 12 % of its CPU went to collections that scanned the
    imported modules' objects again and again. Mutates the gc module's threshold."""
    import gc

    gc.set_threshold(SWEEP_GC_THRESHOLD, *gc.get_threshold()[1:])


def _ctrl_c_in_a_callback(unraisable) -> None:
    """`sys.unraisablehook`: a Ctrl-C that lands in a callback CPython cannot raise from (a
    weakref's, a finalizer's) would be printed as "Exception ignored ... Traceback" and dropped,
    and the process would run on. Instead nothing is printed and the main thread is interrupted
    again a moment later, from another thread, once the callback has returned (interrupting it from
    here would land in this hook and be dropped too; should it land in another callback, this
    hook runs again). Anything else is reported as CPython does. (Set in `main`, so a sweep's
    forked workers have it too.)"""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        _thread.start_new_thread(_interrupt_main_soon, ())
    else:
        sys.__unraisablehook__(unraisable)


def _interrupt_main_soon() -> None:
    time.sleep(0.001)
    _thread.interrupt_main()


def main() -> None:
    from kvbench.schema import register

    if any(a in ("--version", "-V") for a in sys.argv[1:]):
        print(version())
        return
    args = plain_args(sys.argv[1:])
    if (err := unknown_choice(args) or experiment_without_sweep(args) or publish_without_experiment(args)) is not None:
        print(f"kvbench: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = args  # -m first: Hydra's parser takes no option after an override
    if args[:1] in (["-m"], ["--multirun"]):  # a sweep's process: composes, the report (issue 13 §5)
        sweep_gc()
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing pages
    register()
    check_each_value_once()
    register_launcher()
    sys.unraisablehook = _ctrl_c_in_a_callback
    try:
        _app()
    except KeyboardInterrupt:
        print("kvbench: interrupted", file=sys.stderr)
        sys.exit(130)
    except (HydraException, OmegaConfBaseException, RuntimeError, ValueError, OSError) as err:
        if full_error or (isinstance(err, RuntimeError) and "Unknown plugin class" not in str(err)):
            raise
        print(f"kvbench: error: {' '.join(hydra_one_line(err).split())}", file=sys.stderr)
        sys.exit(2)
    from kvbench import cli  # the module Hydra's callback lives in (this file may run as __main__)

    if cli.CompareRuns.exit_code:
        sys.exit(cli.CompareRuns.exit_code)


if __name__ == "__main__":
    main()
