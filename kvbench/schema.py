"""Types of the top-level config, so that `kv_capacity_tokens=abc` fails at compose time with the key named."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SchedulerSchema:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True


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
