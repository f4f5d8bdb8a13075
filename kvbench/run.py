"""One experiment: build trace, engine, strategy and scheduler from a config; replay; write results."""
from __future__ import annotations

import json
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvbench.metrics import summarize
from kvbench.replay import replay
from kvbench.scheduler import Scheduler

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "fp8": 1}


def kv_bytes_per_token(model: DictConfig) -> int:
    """2 (K, V) x layers x kv_heads x head_dim x dtype bytes."""
    if str(model.dtype) not in _DTYPE_BYTES:
        raise ValueError(f"model.dtype {model.dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    return 2 * int(model.num_layers) * int(model.num_kv_heads) * int(model.head_dim) * _DTYPE_BYTES[str(model.dtype)]


def capacity_tokens(cfg: DictConfig, bytes_per_token: int) -> int | None:
    if cfg.get("kv_capacity_gb") is not None:
        return int(float(cfg.kv_capacity_gb) * 2**30) // bytes_per_token
    return None if cfg.kv_capacity_tokens is None else int(cfg.kv_capacity_tokens)


_NOT_IDENTITY = ("redo", "progress")  # keys that do not change a run's results


def _identity(cfg: DictConfig) -> dict:
    keys = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in keys.items() if k not in _NOT_IDENTITY}


def finished_before(cfg: DictConfig, out_dir: Path) -> dict | None:
    """The summary of an earlier run in `out_dir` made from this same config, if any."""
    summary, saved = out_dir / "summary.json", out_dir / "config.yaml"
    if summary.exists() and saved.exists():
        if _identity(OmegaConf.load(saved)) == _identity(cfg):
            return json.loads(summary.read_text())
    return None


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Replay cfg.trace through cfg.strategy on cfg.engine; write the run's files; return the summary.

    Unless cfg.redo, a run dir that already holds the results of this same config is not run
    again (an interrupted sweep resumes where it stopped)."""
    if not cfg.get("redo", False) and (earlier := finished_before(cfg, out_dir)) is not None:
        print(f"kvbench: kept the earlier results of this config in {out_dir} (redo=true runs it again)")
        return earlier
    wall0 = time.perf_counter()
    bpt = kv_bytes_per_token(cfg.model)
    logger = instantiate(cfg.logger) if cfg.get("logger") is not None else None  # fails early, not after the replay
    requests = instantiate(cfg.trace)
    engine = instantiate(cfg.engine)
    capacity = engine.kv_capacity_tokens(capacity_tokens(cfg, bpt))
    strategy = instantiate(cfg.strategy, capacity_tokens=capacity, max_model_len=cfg.max_model_len)
    engine.bind(strategy.page_size, strategy.num_pages)
    scheduler = Scheduler(strategy, **cfg.scheduler)
    result = replay(requests, scheduler, engine, progress=cfg.progress)

    requests_df = result.recorder.requests(result.finished)
    timeline_df = result.recorder.timeline()
    summary = {"strategy": strategy.name, "label": strategy.label, "engine": engine.name,
               "trace": cfg.trace.get("name", "trace"),
               **summarize(requests_df, timeline_df, strategy.capacity, result.itl),
               "kv_bytes_per_token": bpt, "kv_capacity_bytes": strategy.capacity * bpt,
               "model": cfg.model.get("name"), **strategy.summary(), **engine.summary(),
               "wall_time_s": time.perf_counter() - wall0}
    out_dir.mkdir(parents=True, exist_ok=True)
    requests_df.to_parquet(out_dir / "requests.parquet", index=False)
    timeline_df.to_parquet(out_dir / "timeline.parquet", index=False)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if logger is not None:
        logger.log_run(cfg, summary, timeline_df, requests_df)
    return summary
