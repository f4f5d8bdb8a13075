"""The config's types and ranges, checked once, before a run touches anything.

Two layers:
- `RunSchema` types the top-level keys for Hydra, so `kv_capacity_tokens=abc` fails at compose
  time with the key named.
- `validate(cfg)` checks every value of a composed config against its allowed range and raises
  one `ConfigError` naming the key, the value and what is allowed: the top-level keys and the
  model shape from the tables below; every node with a `_target_` (strategy, engine, trace and
  its length distributions, logger) and `scheduler` from the signature of what it builds (an
  `int` parameter takes integers only, a `float` finite numbers, a `bool` true/false, and a key
  the signature lacks is an error), with the ranges of `RANGES` by key name.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig

from kvbench.sizes import DTYPE_NAMES, dtypes_text, layer_groups

MAX_PAGES = 2**31 - 1  # page tables are int32: a pool has fewer than 2**31 pages


class ConfigError(ValueError):
    """A config value outside its allowed range: '<key>=<value>: <what is allowed>'."""


@dataclass
class SchedulerSchema:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True
    policy: str = "fcfs"
    max_wait_steps: int = 256
    preemption: str = "recompute"
    dedup_prefix: bool = False
    dedup_min_prefix: int = 32


@dataclass
class RunSchema:
    strategy: Any = None
    trace: Any = None
    engine: Any = None
    model: Any = None
    logger: Any = None
    kv_capacity_tokens: Optional[int] = None
    kv_capacity_gb: Optional[float] = None
    max_model_len: int = 16384
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    progress: bool = True
    redo: bool = False


def register() -> None:
    """Make the schema known to Hydra as `kvbench_schema` (configs/config.yaml extends it)."""
    ConfigStore.instance().store(name="kvbench_schema", node=RunSchema)


# ---- ranges -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """kind: int | float | bool | str; lo/hi bounds (lo_open: lo excluded); inf: +inf allowed."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    inf: bool = False
    null: bool = False

    def text(self) -> str:
        what = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}[self.kind]
        if self.inf:
            what = "a number"
        if self.lo is not None:
            what += f" {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            what += f"{' and' if self.lo is not None else ''} <= {self.hi:g}"
        if self.inf:
            what += " (inf allowed)"
        return what + (" or null" if self.null else "")


POS_INT, NONNEG_INT = Range("int", 1), Range("int", 0)
POS_FLOAT, NONNEG_FLOAT = Range("float", 0, lo_open=True), Range("float", 0)

TOP = {"kv_capacity_tokens": Range("int", 1, null=True),  # and fewer than 2**31 pages: check_pool
       "kv_capacity_gb": Range("float", 0, lo_open=True, null=True),
       "max_model_len": POS_INT, "progress": Range("bool"), "redo": Range("bool")}
MODEL = {"num_layers": POS_INT, "hidden_size": POS_INT, "intermediate_size": POS_INT, "num_heads": POS_INT,
         "num_kv_heads": POS_INT, "head_dim": POS_INT, "vocab_size": POS_INT, "rope_theta": POS_FLOAT,
         "rms_norm_eps": POS_FLOAT, "tie_embeddings": Range("bool"), "attention_bias": Range("bool"),
         "attention_out_bias": Range("bool"), "name": Range("str", null=True), "checkpoint": Range("str", null=True)}
# the model runner's architecture keys (kvbench.model.ModelConfig; ARCHS there)
MODEL |= {k: Range("float", 0, lo_open=True, null=True) for k in ("query_pre_attn_scalar", "rope_local_theta",
                                                                  "final_logit_softcapping")}
MODEL |= {"num_experts": NONNEG_INT, "experts_per_token": NONNEG_INT, "swiglu_alpha": POS_FLOAT, "swiglu_limit": POS_FLOAT}
MODEL_ARCHS = ("llama", "gemma3", "gpt_oss")
# ranges of `_target_` parameters by key name (types come from the signature); unnamed ints are
# >= 0, unnamed floats finite and >= 0
RANGES = {name: POS_INT for name in (
    "page_size", "num_requests", "num_groups", "questions_per_group", "num_chats", "vocab_size", "max_prompt_len",
    "max_num_seqs", "max_num_batched_tokens", "timeline_points", "max_model_len", "profile_tokens", "value")}
RANGES |= {"rate": Range("float", 0, lo_open=True, inf=True), "burstiness": POS_FLOAT, "mean": POS_FLOAT,
           "gpu_memory_utilization": Range("float", 0, 1, lo_open=True), "kv_cache_gb": POS_FLOAT}
RANGES |= {"h2d_bytes_per_s": POS_FLOAT, "d2h_bytes_per_s": POS_FLOAT,  # engine: host copy rates [B/s]
           "kv_bytes_per_token": POS_INT,  # engine=sim: set by kvbench.run from the model
           "dedup_min_prefix": POS_INT}  # scheduler: tokens of a shared uncached prefix
CHOICES = {("strategy", "reservation"): ("max", "pow2", "oracle"),
           ("strategy", "placement"): ("first_fit", "best_fit"),
           ("model", "dtype"): DTYPE_NAMES,
           ("scheduler", "policy"): ("fcfs", "lpm", "dfs_weight"),  # kvbench.scheduler.POLICIES
           ("scheduler", "preemption"): ("recompute", "swap"),  # kvbench.scheduler.PREEMPTIONS
           ("engine", "graph_warmup"): ("all", "decode", "none"),  # kvbench.engines.gpu_engine.GRAPH_WARMUP
           ("engine", "blas"): ("cublaslt", "cublas", "default"),  # kvbench.engines.gpu_engine.BLAS_LIBRARIES
           ("engine", "decode_buckets"): ("pow2", "fine")}  # kvbench.engines.gpu_engine.DECODE_BUCKETS
# host tier (paged, radix): kvbench.strategies.host_tier.HOST_POLICIES; host_tier_tokens is an int >= 0
CHOICES[("strategy", "host_tier_eviction")] = ("lru", "fifo", "lfu", "slru", "arc", "s3fifo")


def _bad(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: must be {allowed}")


def check_value(key: str, value: object, rng: Range) -> None:
    """Raise ConfigError unless `value` is of `rng`'s kind and inside its bounds."""
    if value is None:
        if rng.null:
            return
        raise _bad(key, value, rng.text())
    if rng.kind == "bool":
        ok = isinstance(value, bool)
    elif rng.kind == "str":
        ok = isinstance(value, str)
    elif rng.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        ok = ok and (math.isfinite(value) or (rng.inf and value > 0))
    if ok and rng.kind in ("int", "float"):
        ok = rng.lo is None or (value > rng.lo if rng.lo_open else value >= rng.lo)
        ok = ok and (rng.hi is None or value <= rng.hi)
    if not ok:
        raise _bad(key, value, rng.text())


# ---- `_target_` nodes: the signature says the type ------------------------------------------------
def _target(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # instantiate says so, with its own message


def _kinds(annotation: object) -> set[str]:
    """{'int', 'float', 'bool', 'str', 'None', ...} from an annotation string like 'float | str | None'."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return {part.strip().strip("'\"") for part in text.replace("Optional[", "").replace("]", "").split("|")}


def _check_param(key: str, name: str, value: object, param: inspect.Parameter) -> None:
    kinds = _kinds(param.annotation) if param.annotation is not inspect.Parameter.empty else set()
    if isinstance(value, DictConfig):
        return validate_node(key, value) if "_target_" in value else None
    if isinstance(value, (ListConfig, str)) and not ({"bool", "int"} >= kinds and kinds):
        return  # strings (paths, names, 'inf') and lists: the target checks them
    null = "None" in kinds or param.default is None
    if "bool" in kinds:
        return check_value(key, value, Range("bool", null=null))
    rng = RANGES.get(name)
    if "float" in kinds:
        base = rng if rng is not None and rng.kind == "float" else NONNEG_FLOAT
        return check_value(key, value, Range("float", base.lo, base.hi, base.lo_open, base.inf, null))
    if "int" in kinds:
        base = rng if rng is not None and rng.kind == "int" else NONNEG_INT
        return check_value(key, value, Range("int", base.lo, base.hi, null=null))


def validate_node(key: str, node: DictConfig, target: object = None) -> None:
    """Check the keys of one node against the parameters of what it builds (`_target_` or `target`)."""
    target = target if target is not None else _target(str(node["_target_"]))
    if target is None:
        return
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keys = set(node.keys())  # (get() of an absent key in a struct config raises and catches: ~0.2 ms)
    for name in node:
        name = str(name)
        if name.startswith("_"):
            continue
        if name not in params:
            if open_ended:
                continue
            known = ", ".join(p for p in params if params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                              and p != "self")
            raise ConfigError(f"{key}.{name}: not a parameter of {getattr(target, '__name__', target)} "
                              f"(parameters: {known})")
        choices = CHOICES.get((key, name))
        if choices is not None and node[name] not in choices:
            raise _bad(f"{key}.{name}", node[name], f"one of {', '.join(choices)}")
        _check_param(f"{key}.{name}", name, node[name], params[name])
    lo, hi = (node.get(k) if k in keys else None for k in ("min", "max"))  # length distributions
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        raise ConfigError(f"{key}: min={lo} > max={hi}: min must be <= max")


_PASSED: dict[str, None] = {}  # the resolved nodes (as JSON, with where they are) that passed their checks
_MAX_PASSED = 1024


def _once(what: str, plain: object, check) -> None:
    """check(), unless the same node, resolved to `plain` (to_container(resolve=True)), passed it
    before in this process: a node's checks read only its resolved values (and the signature of
    its `_target_`, fixed in a process), so they pass again. A sweep's jobs repeat every node
    but the ones their overrides change (~3 ms a job). Only passes are kept: a bad value raises
    every time. Without `plain`, or a node JSON cannot write: check() every time."""
    import json

    if plain is None:
        return check()
    try:
        key = json.dumps([what, plain], sort_keys=True, allow_nan=True)
    except (TypeError, ValueError):
        return check()
    if key in _PASSED:
        return None
    check()
    if len(_PASSED) >= _MAX_PASSED:
        _PASSED.clear()
    _PASSED[key] = None


def validate(cfg: DictConfig, plain: dict | None = None) -> None:
    """Raise one ConfigError for the first value of `cfg` outside its allowed range (see the
    module docstring). Reads cfg only; resolves interpolations. `plain`: cfg resolved
    (`OmegaConf.to_container(cfg, resolve=True)`), when the caller has it: each node whose
    resolved values passed before in this process is not checked again (`_once`)."""
    from kvbench.scheduler import Scheduler

    if not isinstance(plain, dict):
        plain = None

    known = {f.name for f in RunSchema.__dataclass_fields__.values()}
    for key in (plain if plain is not None else cfg):
        if key not in known:
            raise ConfigError(f"{key}: not a key of the config (keys: {', '.join(sorted(known))})")
    for key, rng in TOP.items():  # (a resolved value as cfg.get gives it; a missing one '???' from cfg itself)
        value = plain.get(key) if plain is not None else None
        check_value(key, value if value is not None and value != "???" else cfg.get(key), rng)
    model = cfg.get("model")
    if not isinstance(model, DictConfig):
        raise ConfigError(f"model={model!r}: must be a model config (model=llama3_1_8b, ...)")
    _once("model", plain and plain.get("model"), lambda: _validate_model(model))
    _once("scheduler", plain and plain.get("scheduler"), lambda: validate_node("scheduler", cfg.scheduler, Scheduler))
    for group in ("strategy", "engine", "trace", "logger"):
        node = cfg.get(group)
        if node is None and group == "logger":
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{group}={node!r}: must be a config with a _target_ ({group}=NAME)")
        _once(group, plain and plain.get(group), lambda: validate_node(group, node))


def _validate_model(model: DictConfig) -> None:
    """The model node's shape, dtype, arch and layer groups (validate's part for cfg.model)."""
    present = set(model.keys())  # (`in` a struct config raises and catches a KeyError for an absent key: ~0.2 ms)
    for name, rng in MODEL.items():
        if name in present and name in model:
            check_value(f"model.{name}", model[name], rng)
    if not isinstance(model.get("dtype"), str) or model.get("dtype") not in DTYPE_NAMES:
        raise _bad("model.dtype", model.get("dtype"), dtypes_text())
    if model.get("arch", "llama") not in MODEL_ARCHS:
        raise _bad("model.arch", model.get("arch"), f"one of {', '.join(MODEL_ARCHS)}")
    try:  # model.layers (layer groups, issue 16): kinds, windows, chunks, state bytes, pattern
        layer_groups(model)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_pool(capacity_tokens: int, page_size: int) -> None:
    """The pool must hold at least one page and fewer than 2**31 pages (int32 page tables)."""
    pages = capacity_tokens // page_size
    if pages < 1 or pages > MAX_PAGES:
        raise ConfigError(f"a KV pool of {capacity_tokens} token slots in pages of {page_size} has {pages} pages: "
                          f"must be 1 to {MAX_PAGES} (int32 page tables); change kv_capacity_tokens/kv_capacity_gb")
