"""`hydra/launcher=parallel`: a sweep's jobs in n_jobs warm worker processes (issue 13 §5).

Hydra's joblib launcher pickles the whole Hydra state (config store, plugins, the sweep's config
and loader) for every job, and each loky worker imports kvbench, numpy, pandas and pyarrow
before its first job: on a 100-run sweep of small runs that was ~2.5x the CPU of the runs
themselves. Here the sweep's process imports what the jobs need once (`preload`), then forks
n_jobs workers: each starts with every module, the config store and the compose memo of the
parent (kvbench/compose_cache.py), and is handed one job at a time over a pipe (its number and
overrides; it replies with the job's status), the next job as soon as it is free. A job runs
exactly as under Hydra's own launchers (`load_sweep_config`, then `run_job`: the run dir, its
.hydra/ files, run.log, the callbacks), so its files are the same.

A worker that dies mid-job (a crash, a kill, out of memory) fails that job only: its run dir
gets error.txt (kvbench.run.record_failure; the report lists it, the sweep exits 1), a fresh
worker is forked and the sweep goes on. Ctrl-C stops the workers and the sweep.

The joblib keys of `parallel.yaml` are accepted: `backend: loky` (or `fork_workers: false`)
runs Hydra's joblib launcher as before (needs hydra-joblib-launcher); with the fork workers only
`n_jobs` is used (joblib's meaning: -1 one per CPU, -2 all but one). Linux/macOS only (fork).
Not found by Hydra's plugin scan (it lives in the repository, not site-packages):
kvbench.cli registers it (`register()`).
"""
from __future__ import annotations

import copy
import gc
import importlib
import logging
import multiprocessing
import os
import pickle
import sys
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (JobReturn, JobRuntime, JobStatus, _flush_loggers, configure_log,
                              env_override, filter_overrides, setup_globals)
from hydra import version
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kvbench.yaml_dump import list_yaml, memo_scalar_analysis, to_yaml

log = logging.getLogger(__name__)
GC_THRESHOLD = 20000  # a worker's first-generation collection threshold (Python's default: 700)


def _point_hydra_config(cfg: DictConfig) -> None:
    """HydraConfig.set_config without its copy: the hydra node made read-only, HydraConfig.get()
    the job config's own hydra node (the copy's parent is that config: same interpolations)."""
    OmegaConf.set_readonly(cfg.hydra, True)
    HydraConfig.instance().cfg = cfg


def _without_hydra(cfg: DictConfig) -> DictConfig:
    """deepcopy(cfg) less its hydra node (what run_job hands the task), without copying that
    node: it is left out of cfg's children for the copy's span (cfg is the same afterwards). The
    copy is pickled and unpickled (~1 ms; the deep copy takes ~3), a deep copy if it cannot be."""
    content = cfg.__dict__["_content"]
    whole = dict(content)
    content.clear()
    content.update((k, v) for k, v in whole.items() if k != "hydra")
    try:
        try:
            return pickle.loads(pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:  # (a value pickle cannot take)
            return copy.deepcopy(cfg)
    finally:
        content.clear()
        content.update(whole)


def hydra_yaml(node: dict) -> str:
    """What Hydra writes to .hydra/hydra.yaml (OmegaConf.to_yaml of {"hydra": node}), from one
    dump per key of the hydra node kept across jobs (kvbench/yaml_dump.py): a sweep's jobs differ
    in a few keys (job, runtime, overrides), so most of the ~180 lines are dumped once per worker."""
    return to_yaml(node, under="hydra")


def task_yaml(task_cfg: DictConfig) -> str:
    """What Hydra writes to .hydra/config.yaml (OmegaConf.to_yaml(task_cfg): unresolved), from
    kept per-key dumps as hydra_yaml."""
    return to_yaml(OmegaConf.to_container(task_cfg, resolve=False, enum_to_str=True))


_JOB_LOG: dict = {}  # in a worker: the last job's logging conf, its file handlers' filenames blanked


def _file_handlers_blank(conf: dict) -> tuple[dict, dict[str, str]] | None:
    """(conf with each plain FileHandler's filename blanked, {handler name: filename}); None when
    a handler's filename is not a string or its class is not exactly logging.FileHandler, or when
    dictConfig would do more than set up the root logger (named loggers, disable_existing_loggers
    not false, incremental)."""
    handlers = conf.get("handlers") if isinstance(conf, dict) else None
    if (not isinstance(handlers, dict) or conf.get("disable_existing_loggers", True) is not False
            or conf.get("loggers") or conf.get("incremental")):
        return None
    names: dict[str, str] = {}
    blank = dict(conf, handlers=dict(handlers))
    for name, h in handlers.items():
        if isinstance(h, dict) and "filename" in h:
            if h.get("class") != "logging.FileHandler" or not isinstance(h["filename"], str):
                return None
            names[name] = h["filename"]
            blank["handlers"][name] = dict(h, filename=None)
    return blank, names


def configure_job_log(log_config: Optional[DictConfig], verbose: Any) -> None:
    """Hydra's configure_log(hydra.job_logging, hydra.verbose) for a worker's job. When the job's
    resolved logging conf differs from the previous job's only in its FileHandlers' filenames
    (run.log in the new run dir), and the root logger holds exactly the handlers that conf made,
    each handler's stream is reopened on the new file (append, as a new FileHandler opens it)
    instead of logging.config.dictConfig building every formatter and handler again (~1.5 ms a
    job). Anything else (the first job, another conf, `verbose`, a handler added or removed
    since): configure_log itself. Mutates the logging module's handlers."""
    conf = OmegaConf.to_container(log_config, resolve=True) if log_config is not None else None
    split = _file_handlers_blank(conf) if conf is not None and verbose is False else None
    last = _JOB_LOG.get("last")
    root = logging.getLogger()
    if (split is not None and last is not None and last[0] == split[0] and root.handlers == last[2]
            and root.level == last[3] and set(split[1]) == set(last[1])):
        by_name = {h.get_name(): h for h in root.handlers}
        for name, filename in split[1].items():
            handler = by_name.get(name)
            if not isinstance(handler, logging.FileHandler):
                break
            handler.acquire()
            try:
                handler.flush()
                if handler.stream is not None:
                    handler.stream.close()
                handler.baseFilename = os.path.abspath(filename)
                handler.stream = None if handler.delay else handler._open()
            finally:
                handler.release()
        else:
            _JOB_LOG["last"] = (split[0], split[1], list(root.handlers), root.level)
            return
    _JOB_LOG.pop("last", None)
    configure_log(log_config, verbose)
    if split is not None and {h.get_name() for h in logging.getLogger().handlers} >= set(split[1]):
        root = logging.getLogger()
        _JOB_LOG["last"] = (split[0], split[1], list(root.handlers), root.level)


def worker_count(n_jobs: Any, cpus: int | None = None) -> int:
    """joblib's n_jobs (an int: k > 0 workers, -1 one per CPU, -2 all but one...) as a count;
    ValueError (one line) for 0, a non-integer or too negative a value."""
    cpus = cpus or os.cpu_count() or 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise ValueError(f"hydra.launcher.n_jobs={n_jobs}: use a whole number of workers > 0 "
                         f"(or -1 for one per CPU, -2 for all but one)")
    count = n_jobs if n_jobs > 0 else cpus + 1 + n_jobs
    if count < 1:
        raise ValueError(f"hydra.launcher.n_jobs={n_jobs}: this machine has {cpus} CPUs, so at least "
                         f"{-cpus} (or a positive count)")
    return count


class WarmJoblibLauncher(Launcher):
    """Hydra's JoblibLauncher's config (`n_jobs` and joblib's other keys), run in forked warm
    workers. `fork_workers` false or a `backend` other than null/loky: Hydra's joblib launcher."""

    def __init__(self, fork_workers: bool = True, preload: Sequence[str] = (), parent_imports: Sequence[str] = (),
                 **joblib: Any) -> None:
        self.fork_workers, self.preload = bool(fork_workers), list(preload or ())
        self.parent_imports = list(parent_imports or ())
        self.joblib = joblib
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not self.fork_workers or self.joblib.get("backend") not in (None, "loky") or not hasattr(os, "fork"):
            from hydra_plugins.hydra_joblib_launcher import _core  # Hydra's joblib launcher, as before

            return _core.launch(launcher=self, job_overrides=job_overrides, initial_job_idx=initial_job_idx)
        workers = min(worker_count(self.joblib.get("n_jobs", -1)), len(job_overrides))
        for name in self.preload:  # once here, inherited by every worker
            importlib.import_module(name)
        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs in {workers} warm worker processes, "
                 f"sweep output dir : {sweep_dir}")
        for idx, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # what the workers inherit stays out of the parent's collections too
        return _Pool(self, workers).run([(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)],
                                        then=lambda: [importlib.import_module(name) for name in self.parent_imports])

    # ---- one job (in a worker) ------------------------------------------------------------------
    def job_config(self, idx: int, overrides: list[str]) -> DictConfig:
        """The job's config as Hydra's launchers make it (job id and number set); HydraConfig is
        pointed at it."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
            cfg.hydra.job.num = idx
        _point_hydra_config(cfg)
        return cfg

    def execute(self, idx: int, overrides: list[str]) -> JobReturn:
        """Run one job: Hydra 1.3's run_job (hydra/core/utils.py), step for step, with one copy
        of the job's config where it makes four (HydraConfig.set_config's masked copy, twice, a
        deep copy of the whole config for the task, another of the hydra node for hydra.yaml):
        ~15 ms of a job's ~120 ms. Same run dir, same .hydra/ files, same callbacks."""
        assert self.hydra_context is not None and self.task_function is not None
        callbacks = self.hydra_context.callbacks
        old_cwd, before = os.getcwd(), HydraConfig.instance().cfg
        config = self.job_config(idx, overrides)
        output_dir = os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")),
                                  str(OmegaConf.select(config, "hydra.sweep.subdir")))
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        chdir = None
        try:
            task_cfg = _without_hydra(config)
            ret = JobReturn(overrides=OmegaConf.to_container(config.hydra.overrides.task))
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            chdir = config.hydra.job.chdir
            if chdir is None:
                chdir = not version.base_at_least("1.2")
            ret.working_dir = output_dir if chdir else os.getcwd()
            if chdir:
                os.chdir(output_dir)
            configure_job_log(config.hydra.job_logging, config.hydra.verbose)
            if config.hydra.output_subdir is not None:
                hydra_output = Path(config.hydra.runtime.output_dir) / Path(config.hydra.output_subdir)
                hydra_output.mkdir(parents=True, exist_ok=True)  # (as Hydra's _save_config writes them)
                (hydra_output / "config.yaml").write_text(task_yaml(task_cfg), encoding="utf-8")
                (hydra_output / "hydra.yaml").write_text(hydra_yaml(OmegaConf.to_container(  # (as Hydra's copy dumps)
                    config.hydra, resolve=False, enum_to_str=True)), encoding="utf-8")
                (hydra_output / "overrides.yaml").write_text(list_yaml(ret.overrides), encoding="utf-8")  # (_save_config's)
            with env_override(config.hydra.job.env_set):
                callbacks.on_job_start(config=config, task_function=self.task_function)
                try:
                    ret.return_value = self.task_function(task_cfg)
                    ret.status = JobStatus.COMPLETED
                except Exception as err:
                    ret.return_value = err
                    ret.status = JobStatus.FAILED
            ret.task_name = JobRuntime.instance().get("name")
            _flush_loggers()
            callbacks.on_job_end(config=config, job_return=ret)
            return ret  # (its configs stay here: only the status and return value go back)
        finally:
            HydraConfig.instance().cfg = before
            if chdir:
                os.chdir(old_cwd)

    def job_dir(self, idx: int, overrides: list[str]) -> Path:
        """The job's run dir, composed here (the sweep's process: HydraConfig is put back)."""
        before = HydraConfig.instance().cfg
        try:
            cfg = self.job_config(idx, overrides)
            return Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
        finally:
            HydraConfig.instance().cfg = before


def _serve(conn: Any, launcher: WarmJoblibLauncher) -> None:
    """A worker's loop: run each (idx, overrides) it is sent, reply (idx, JobReturn); None ends it.
    The objects it starts with (the parent's modules, config store, compose memo: ~10^5) are
    frozen out of the cyclic garbage collector, which then scans only what the jobs make, and
    less often (a job makes ~10^5 short-lived objects): ~7 % of a worker's time was collections."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    memo_scalar_analysis()
    profile_to = os.environ.get("KVBENCH_PROFILE_WORKERS")  # a folder: each worker's cProfile stats
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        _jobs(conn, launcher)
    except (KeyboardInterrupt, EOFError):  # Ctrl-C (the job recorded it) or the sweep's process is gone
        pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_to, f"worker{os.getpid()}.prof"))


def _jobs(conn: Any, launcher: WarmJoblibLauncher) -> None:
    while (job := conn.recv()) is not None:
        idx, overrides = job
        try:
            done = launcher.execute(idx, overrides)
            ret = JobReturn(overrides=done.overrides, working_dir=done.working_dir, task_name=done.task_name,
                            status=done.status, _return_value=done._return_value)
        except Exception as err:  # (a compose error, an error outside the task: the sweep stops, as before)
            ret = JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=err)
        try:
            reply = pickle.dumps((idx, ret))
        except Exception:  # an unpicklable return value or exception
            ret._return_value = RuntimeError(repr(ret._return_value))
            reply = pickle.dumps((idx, ret))
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send_bytes(reply)


class _Pool:
    """n forked workers, one job each at a time; a dead worker's job is recorded failed and the
    worker replaced. Mutates the sweep's run dirs only through the jobs (and error.txt)."""

    def __init__(self, launcher: WarmJoblibLauncher, workers: int) -> None:
        self.launcher, self.size = launcher, workers
        self.ctx = multiprocessing.get_context("fork")
        self.busy: dict[Any, tuple[Any, tuple[int, list[str]] | None]] = {}  # conn -> (process, job)
        self.started: list[Any] = []

    def _start(self) -> Any:
        sys.stdout.flush()  # (a forked child flushes what it inherits: nothing is printed twice)
        sys.stderr.flush()
        here, there = self.ctx.Pipe()
        proc = self.ctx.Process(target=_serve, args=(there, self.launcher), daemon=True)
        proc.start()
        self.started.append(proc)
        there.close()
        self.busy[here] = (proc, None)
        return here

    def run(self, jobs: list[tuple[int, list[str]]], then: Callable[[], Any] = lambda: None) -> list[JobReturn]:
        """Run `jobs` (idx, overrides) in the workers; `then()` runs here once each has its first."""
        todo, results = list(reversed(jobs)), {}
        try:
            for _ in range(self.size):
                self._start()
            while len(results) < len(jobs):
                for conn, (proc, job) in list(self.busy.items()):
                    if job is None and todo:  # an idle worker: the next job
                        self.busy[conn] = (proc, todo.pop())
                        conn.send(self.busy[conn][1])
                    elif job is None:  # nothing left for it
                        conn.send(None)
                        del self.busy[conn]
                if then is not None:  # (here, not in a thread: a worker forked later must not inherit a held lock)
                    then, _ = None, then()
                ready = wait([*self.busy, *(p.sentinel for p, _ in self.busy.values())])
                for conn, (proc, job) in list(self.busy.items()):
                    if conn in ready or proc.sentinel in ready:
                        self._collect(conn, proc, job, results, bool(todo))
        except KeyboardInterrupt:  # a Ctrl-C reaches the workers too: each records it in its run dir
            for proc, job in self.busy.values():
                if job is not None:
                    proc.join(timeout=5)
            raise
        finally:
            for conn, (proc, job) in self.busy.items():
                try:
                    if job is not None:  # (an error here or Ctrl-C: its job is abandoned)
                        raise OSError
                    conn.send(None)  # idle: it ends by itself
                except OSError:
                    if proc.is_alive():
                        proc.terminate()
                conn.close()
            for proc in self.started:
                proc.join()
        return [results[idx] for idx, _ in jobs]

    def _collect(self, conn: Any, proc: Any, job: Any, results: dict, more: bool) -> None:
        try:
            idx, ret = pickle.loads(conn.recv_bytes())
            results[idx] = ret
            self.busy[conn] = (proc, None)
            return
        except (EOFError, OSError):  # the worker died: mid-job, or between jobs
            pass
        proc.join()
        del self.busy[conn]
        conn.close()
        if job is not None:
            results[job[0]] = self._died(job, proc.exitcode)
        if more or job is not None:
            self._start()

    def _died(self, job: tuple[int, list[str]], exitcode: int | None) -> JobReturn:
        idx, overrides = job
        how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
        line = f"kvbench: unexpected error: the worker process running this job died ({how})"
        try:
            out_dir = self.launcher.job_dir(idx, overrides)
            from kvbench.run import record_failure

            record_failure(out_dir, line)
        except Exception as err:  # (the line on stderr still says which job)
            out_dir = f"? ({err})"
        print(f"{line}: job {idx} ({' '.join(overrides)}), run dir {out_dir}; the sweep goes on",
              file=sys.stderr, flush=True)
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)
