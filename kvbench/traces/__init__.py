"""Request traces: generators (synthetic, shared prefix, multi-turn) and file loaders (Azure
2023 CSV, Mooncake JSONL, BurstGPT CSV). Each returns ``list[Request]`` sorted by arrival with
ids 0..N-1; Hydra configs in ``configs/trace/`` name them by ``_target_``."""
from kvbench.traces.analysis import PrefixReuse, prefix_hit_rate, prefix_reuse
from kvbench.traces.azure import azure
from kvbench.traces.burstgpt import burstgpt
from kvbench.traces.errors import TraceError
from kvbench.traces.lengths import Fixed, LogNormal, Uniform
from kvbench.traces.mooncake import mooncake
from kvbench.traces.multi_turn import multi_turn
from kvbench.traces.paths import resolve_trace_path, traces_dir
from kvbench.traces.shared_prefix import shared_prefix
from kvbench.traces.synthetic import synthetic

__all__ = [
    "TraceError", "traces_dir", "resolve_trace_path",
    "synthetic", "shared_prefix", "multi_turn", "azure", "mooncake", "burstgpt",
    "Fixed", "Uniform", "LogNormal",
    "PrefixReuse", "prefix_reuse", "prefix_hit_rate",
]
