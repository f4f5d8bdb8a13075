"""One experiment: build trace, engine, strategy and scheduler from a config; replay; write results.

A run dir is written so that no reader ever trusts a half-written run:
- the config is validated (kvbench.schema) and the dir's writability checked before the replay;
- the dir is locked (`.lock`, fcntl) while a run reads or writes it: a second writer waits;
- every file is written to a temporary name and renamed into place (os.replace), summary.json
  last, once the others are on disk (fsync): it is the completion marker, and carries the hash of
  the config it was made from;
- a run is finished when its summary.json matches the config and its tables are readable;
  anything else is run again (its old marker is removed before a new file is written);
- a run that fails leaves error.txt (why) and no summary.json.
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvbench.batch import KVReadGroups
from kvbench.loggers import NullLogger
from kvbench.metrics import TIMELINE_DTYPES, Recorder, summarize
from kvbench.provenance import git_commit
from kvbench.replay import replay
from kvbench.scheduler import Scheduler
from kvbench.schema import ConfigError, check_pool, validate
from kvbench.sizes import PoolGeometry, kv_bytes_per_token, tokens_in_gib
from kvbench.strategies.hybrid.timeline import GroupLog, group_summary, group_table
from kvbench.timeline_file import TimelineFile

MARKER, ERROR, LOCK = "summary.json", "error.txt", ".lock"
TABLES = ("requests.parquet", "timeline.parquet")


class OutputError(OSError):
    """The run dir cannot be written (read-only, full, not a directory)."""


def capacity_tokens(cfg: DictConfig, bytes_per_token: int) -> int | None:
    """The pool size the config asks for, in tokens (None: the engine decides)."""
    if cfg.get("kv_capacity_gb") is not None:
        return tokens_in_gib(cfg.kv_capacity_gb, bytes_per_token)
    return None if cfg.kv_capacity_tokens is None else int(cfg.kv_capacity_tokens)


_NOT_IDENTITY = ("redo", "progress")  # keys that do not change a run's results


def config_hash(cfg: DictConfig, plain: dict | None = None) -> str:
    """sha256 of the resolved config, less the keys that do not change results. `plain`: the
    config's `OmegaConf.to_container(cfg, resolve=True)` when the caller has it already."""
    plain = OmegaConf.to_container(cfg, resolve=True) if plain is None else plain
    keys = {k: v for k, v in plain.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


_SCALARS = (type(None), bool, int, float, str)


def _has_enum(obj: object) -> bool:
    """Whether a to_container result holds an Enum (OmegaConf.to_yaml writes its name)."""
    from enum import Enum

    if isinstance(obj, dict):
        return any(_has_enum(k) or _has_enum(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_enum(v) for v in obj)
    return isinstance(obj, Enum)


def config_yaml(cfg: DictConfig, plain: dict) -> str:
    """OmegaConf.to_yaml(cfg, resolve=True), from `plain` (cfg resolved) when it holds no Enum
    (kvbench/yaml_dump.py: most of its lines kept from the previous run of this process)."""
    from kvbench.yaml_dump import to_yaml

    return OmegaConf.to_yaml(cfg, resolve=True) if _has_enum(plain) else to_yaml(plain)


def build(node: DictConfig, plain: object = None, **kwargs: object) -> object:
    """instantiate(node, **kwargs). When `plain` (the node resolved: to_container) is a plain call,
    every value and keyword a scalar and no key but `_target_` starting with '_', the target is
    called with them directly: what instantiate calls it with, without its copy and walk of the
    node (~3 ms). Anything else, or an error there, goes through instantiate (its own error)."""
    if (isinstance(plain, dict) and isinstance(plain.get("_target_"), str)
            and all(isinstance(k, str) and (k == "_target_" or not k.startswith("_")) and type(v) in _SCALARS
                    for k, v in plain.items())
            and all(type(v) in _SCALARS for v in kwargs.values())):
        from hydra._internal.utils import _locate

        try:
            target = _locate(plain["_target_"])
        except Exception:  # (instantiate says why)
            target = None
        if callable(target):
            try:
                return target(**{**{k: v for k, v in plain.items() if k != "_target_"}, **kwargs})
            except Exception:  # instantiate calls it again, and raises its own error
                pass
    return instantiate(node, **kwargs)


def finished_before(cfg: DictConfig, out_dir: Path, plain: dict | None = None) -> dict | None:
    """The summary of a finished run of this same config in `out_dir`, if any: its marker parses,
    names this config's hash, and its tables are readable parquet files. `plain`: cfg resolved,
    when the caller has it (as config_hash)."""
    import pyarrow.parquet as pq

    try:
        summary = json.loads((out_dir / MARKER).read_text())
        if not isinstance(summary, dict) or summary.get("config_hash") != config_hash(cfg, plain):
            return None
        for table in TABLES:
            pq.read_metadata(out_dir / table)
    except (OSError, ValueError):  # missing, empty, torn (pyarrow's errors are OSError/ValueError)
        return None
    return summary


# ---- the run dir ----------------------------------------------------------------------------------
def _output_error(path: Path, err: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {err.strerror or err}")


def write_atomic(path: Path, write: Callable[[Path], None], sync: bool = True) -> None:
    """write(tmp), fsync tmp (unless not `sync`), then rename tmp to `path`: `path` is the old file
    or the whole new one, never a part. On any error (or Ctrl-C) the temporary file is removed;
    OSError -> OutputError."""
    write_all_atomic([(path, write)], sync)


def write_all_atomic(files: list[tuple[Path, Callable[[Path], None]]], sync: bool = True) -> None:
    """write_atomic for several files: each written to its temporary name, then all fsynced at
    once, in threads, then renamed into place in order. One fsync after another waits for a
    journal commit each (~8 ms on this machine's disk); together they share one."""
    tmps = [path.with_name(f".{path.name}.tmp{os.getpid()}") for path, _ in files]
    where = files[0][0]
    try:
        for (where, write), tmp in zip(files, tmps):
            write(tmp)
        if sync:
            where = _fsync_all(dict(zip(tmps, (path for path, _ in files))))
        for (where, _), tmp in zip(files, tmps):
            os.replace(tmp, where)
    except OSError as err:
        raise _output_error(where, err) from err
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_all(paths: dict[Path, Path]) -> Path:
    """fsync every file (tmp -> the path it becomes), in a thread each when there are several;
    raises the first OSError (its .filename the path it becomes); returns the last path."""
    if len(paths) == 1:
        tmp, path = next(iter(paths.items()))
        _fsync(tmp)
        return path
    import threading

    errors: dict[Path, OSError] = {}

    def one(tmp: Path) -> None:
        try:
            _fsync(tmp)
        except OSError as err:
            errors[tmp] = err

    threads = [threading.Thread(target=one, args=(tmp,), daemon=True) for tmp in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tmp, err in errors.items():
        err.filename = str(paths[tmp])
        raise err
    return list(paths.values())[-1]


def _text(text: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(text)


@contextmanager
def locked(out_dir: Path, wait: bool = True) -> Iterator[bool]:
    """Hold `out_dir`/.lock (created with the dir) while the block runs; yields whether it is held
    (False only when wait=False and another process holds it). Proves the dir writable first."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _output_error(out_dir, err) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            print(f"kvbench: {out_dir} is being written by another kvbench process; waiting for it",
                  file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        probe = out_dir / f".probe{os.getpid()}"
        try:  # writable now, not after the replay
            probe.write_bytes(b"")
        except OSError as err:
            raise _output_error(out_dir, err) from err
        finally:
            probe.unlink(missing_ok=True)
        yield True
    finally:
        os.close(fd)


def _clear(out_dir: Path) -> None:
    """Before a run writes: drop its old marker (first), old error and stale temporary files."""
    for name in (MARKER, ERROR):
        (out_dir / name).unlink(missing_ok=True)
    for tmp in out_dir.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def record_failure(out_dir: Path, line: str, err: BaseException | None = None) -> None:
    """Write error.txt (`line`, then the traceback of `err` if given) into `out_dir`, unless the dir
    cannot be written or another process holds it. Never raises."""
    text = line + "\n" + ("".join(traceback.format_exception(err)) if err is not None else "")
    try:
        with locked(out_dir, wait=False) as held:
            if held:
                (out_dir / MARKER).unlink(missing_ok=True)
                write_atomic(out_dir / ERROR, _text(text))
    except OSError:
        pass


# ---- the run ------------------------------------------------------------------------------------
def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Replay cfg.trace through cfg.strategy on cfg.engine; write the run's files; return the summary.

    Raises ConfigError (a value out of range, an empty trace) before anything is written, and
    OutputError when out_dir cannot be written. Unless cfg.redo, a run dir that already holds the
    finished results of this same config is not run again (an interrupted sweep resumes)."""
    try:  # resolved once: validate, the resume check, the builds, the hash and config.yaml read it
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # (validate and the run raise their own errors, as before)
        plain = None
    validate(cfg, plain)
    out_dir = Path(out_dir)
    with locked(out_dir):
        if not cfg.get("redo", False) and (earlier := finished_before(cfg, out_dir, plain)) is not None:
            (out_dir / ERROR).unlink(missing_ok=True)
            print(f"kvbench: kept the earlier results of this config in {out_dir} (redo=true runs it again)")
            return earlier
        _clear(out_dir)
        try:
            return _replay_and_write(cfg, out_dir, plain)
        finally:  # a failed run leaves no temporary file of its own (the streamed timeline's)
            for tmp in out_dir.glob(f".*.tmp{os.getpid()}*"):
                tmp.unlink(missing_ok=True)


_TRACE_CACHE: dict[str, list] = {}  # the last trace this process loaded for an engine that forgets ids


_CLASSES: dict[str, tuple[type, object]] = {}  # `_target_` -> (its class, its signature's parameters)


def _class_params(target: object) -> tuple[type, object]:
    """(get_class(target), inspect.signature(it).parameters or None), kept per target string for the
    process (a sweep's jobs ask for the same few classes; each lookup walked the module path and
    built the signature again). Raises as get_class / inspect.signature do (nothing kept)."""
    key = str(target)
    if key not in _CLASSES:
        from hydra.utils import get_class

        cls = get_class(key)
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):  # (no signature: the callers treat it as they treat a bad target)
            params = None
        _CLASSES[key] = (cls, params)
    return _CLASSES[key]


def load_trace(cfg: DictConfig, plain: dict | None = None) -> list:
    """cfg.trace's requests. For an engine that never writes into a request's ids
    (`Engine.forgets_ids`: the sim), the last trace is kept for the next run of the same process
    with the same resolved trace config, trace folder and cwd (a sweep's worker replays one trace
    under many strategies and rates: the file is parsed once); such a run changes no request."""
    try:
        shareable = bool(getattr(_class_params(cfg.engine._target_)[0], "forgets_ids", False))
    except Exception:  # (instantiate below reports a bad engine)
        shareable = False
    if plain is None:  # (the resolved trace node, when the caller has it)
        plain = OmegaConf.to_container(cfg.trace, resolve=True)
    if not shareable:
        return build(cfg.trace, plain)
    key = json.dumps([plain, os.environ.get("KVBENCH_TRACES"), os.getcwd()], sort_keys=True, default=str)
    if key not in _TRACE_CACHE:
        _TRACE_CACHE.clear()
        _TRACE_CACHE[key] = build(cfg.trace, plain)
    return _TRACE_CACHE[key]


def engine_sizes(node: DictConfig, bytes_per_token: int) -> dict:
    """The model's K/V bytes per token for an engine that prices host moves by it (the sim's
    `kv_bytes_per_token`), unless the engine config sets it."""
    try:
        params = _class_params(node._target_)[1]
    except Exception:  # (instantiate reports a bad engine)
        return {}
    if params is None or "kv_bytes_per_token" not in params or node.get("kv_bytes_per_token") is not None:
        return {}
    return {"kv_bytes_per_token": int(bytes_per_token)}


def strategy_sizes(cfg: DictConfig, capacity: int) -> dict:
    """`geometry=` (the run's PoolGeometry) for a strategy whose constructor takes it: the hybrid
    pool designs of issue 16 (strategies/hybrid/); nothing for the others."""
    try:
        params = _class_params(cfg.strategy._target_)[1]
    except Exception:  # (instantiate reports a bad strategy)
        return {}
    if params is None or "geometry" not in params:
        return {}
    ps = int(cfg.strategy.get("page_size", params["page_size"].default if "page_size" in params else 1))
    return {"geometry": PoolGeometry.of(cfg.model, ps, capacity // ps)}


def _replay_and_write(cfg: DictConfig, out_dir: Path, plain: dict | None = None) -> dict:
    wall0 = time.perf_counter()
    if plain is None:  # read once: the builds, the hash, config.yaml
        plain = OmegaConf.to_container(cfg, resolve=True)
    bpt = kv_bytes_per_token(cfg.model)  # validate() checked model.dtype
    logger = build(cfg.logger, plain.get("logger")) if cfg.get("logger") is not None else None  # fails early
    requests = load_trace(cfg, plain.get("trace"))
    if not len(requests):
        raise ConfigError(f"trace '{cfg.trace.get('name', 'trace')}' has no requests: nothing to replay "
                          "(check trace.limit, trace.path and the trace's filters)")
    engine = build(cfg.engine, plain.get("engine"), **engine_sizes(cfg.engine, bpt))
    capacity = engine.kv_capacity_tokens(capacity_tokens(cfg, bpt))
    check_pool(capacity, int(cfg.strategy.get("page_size", 1)))
    sizes = strategy_sizes(cfg, capacity)  # (a dataclass through instantiate would become a config: partial)
    strategy = (instantiate(cfg.strategy, _partial_=True)(capacity_tokens=capacity, max_model_len=cfg.max_model_len,
                                                          **sizes) if sizes else
                build(cfg.strategy, plain.get("strategy"), capacity_tokens=capacity, max_model_len=cfg.max_model_len))
    pool = PoolGeometry.of(cfg.model, strategy.page_size, strategy.num_pages)  # the run's sizes, frozen
    hybrid = engine.needs_layout and getattr(strategy, "tables", None) is not None  # a hybrid pool design
    if hybrid and "strategy" in inspect.signature(engine.bind).parameters:  # the torch/gpu engines read its tables
        engine.bind(pool.page_size, pool.num_pages, strategy=strategy)
    elif hybrid and len(strategy.tables) > 1:
        raise ConfigError(f"strategy={strategy.name}: engine={engine.name} reads one page table per request, this "
                          f"design keeps {len(strategy.tables)} (per layer group); run it with engine=sim")
    elif getattr(engine, "binds_strategy", False):  # (the gpu engine warms up the strategy's layout)
        engine.bind(pool.page_size, pool.num_pages, strategy=strategy)
    else:
        engine.bind(pool.page_size, pool.num_pages)
    read_groups = KVReadGroups.of(pool.groups)  # None unless a layer group reads a window or chunk only
    if not getattr(strategy, "fast_forward", True) or read_groups is not None:  # a hybrid pool: a decode
        engine.fast_forward = False  # may leave a window; a windowed model: quiet steps' reads are not linear
    driven = GroupLog(strategy) if hasattr(strategy, "group_slot_states") else strategy  # per-group states
    scheduler = Scheduler(driven, **cfg.scheduler, kv_read_groups=read_groups)
    # the timeline streams to a temporary file in chunks, renamed into place below (issue 13: memory)
    sink = TimelineFile(out_dir / f".timeline.parquet.tmp{os.getpid()}.rows", TIMELINE_DTYPES)
    result = replay(requests, scheduler, engine, progress=cfg.progress,
                    recorder=Recorder(strategy.capacity, sink=sink), keep_finished=False)

    requests_df = result.recorder.requests()
    summary = {"strategy": strategy.name, "label": strategy.label, "engine": engine.name,
               "trace": cfg.trace.get("name", "trace"),
               **summarize(requests_df, result.recorder.timeline_columns(), pool.capacity_tokens,
                           result.recorder.itl_runs()),
               **result.recorder.moves(pool.bytes_per_token),
               "kv_bytes_per_token": pool.bytes_per_token, "kv_capacity_bytes": pool.capacity_bytes,
               "model": cfg.model.get("name"), **strategy.summary(), **engine.summary(),
               "wall_time_s": time.perf_counter() - wall0, "config_hash": config_hash(cfg, plain),
               "commit": git_commit()}
    files = [(out_dir / "requests.parquet", lambda p: requests_df.to_parquet(p, index=False)),
             (out_dir / "timeline.parquet", sink.move_to)]
    if driven is not strategy:  # groups_timeline.parquet and per-group summary keys (strategies/hybrid/timeline.py)
        groups_df = group_table(driven.rows, sink["t_s"], sink["dt_s"])  # (the timeline file's columns)
        files.append((out_dir / "groups_timeline.parquet", lambda p: groups_df.to_parquet(p, index=False)))
        summary.update(group_summary(groups_df, pool.capacity_bytes))
    files.append((out_dir / "config.yaml", _text(config_yaml(cfg, plain))))
    write_all_atomic(files)  # on disk (fsync) before the marker is renamed into place
    # last: the marker. Not fsynced: a marker that a crash of the machine loses or tears reads as
    # an unfinished run (finished_before: no JSON, or not this config's hash), which runs again.
    write_atomic(out_dir / MARKER, _text(json.dumps(summary, indent=2) + "\n"), sync=False)
    if logger is not None and not isinstance(logger, NullLogger):  # (reads the whole timeline back)
        import pandas as pd

        logger.log_run(cfg, summary, pd.read_parquet(out_dir / "timeline.parquet"), requests_df)
    return summary
