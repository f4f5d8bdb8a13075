"""Simulated replay of fixed trace slices (pytest-benchmark; `-m bench`): the whole loop of
scheduler, strategy, sim engine and recorder, without file output.

- every strategy yaml on the synthetic trace (500 requests, seeded, no files needed);
- paged with and without prefix caching on traces without sharing, in a pool large enough that
  nothing is preempted: both replays take the same steps (asserted), so the ratio of their
  times is the cost of prefix caching at 0 % hits (docs/benchmarks.md);
- every strategy yaml on the first 10,000 Azure conversation requests at the trace's own
  arrival times in the default pool (goal of issue 13: <= 1.0 s of CPU per strategy), and on
  the whole trace (<= 3 s);
- paged and radix on the Mooncake trace at its own times in the default pool, overloaded
  (goal of issue 13: 20x faster than commit 64008c7).
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kvbench.replay import replay
from kvbench.run import strategy_sizes
from kvbench.scheduler import Scheduler
from kvbench.schema import register
from kvbench.traces import traces_dir

# CPU time of this process: on a shared 2-core machine, time spent waiting for a core is not
# the replay's cost (wall times of the same replay varied 3x under other users' load)
pytestmark = [pytest.mark.bench, pytest.mark.benchmark(timer=time.process_time)]
REPO = Path(__file__).resolve().parents[2]
STRATEGIES = sorted(p.stem for p in (REPO / "configs" / "strategy").glob("*.yaml"))
AZURE_CONV = "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv"

# trace slices: name → overrides; no_sharing ones run in a pool that never preempts
SLICES = {
    "synthetic": ["trace=synthetic"],
    "azure_conv_nosharing": ["trace=azure_conv", "trace.limit=1500", "trace.rate=20", "kv_capacity_tokens=1048576"],
    "synthetic_nosharing": ["trace=synthetic", "kv_capacity_tokens=1048576"],
    "azure_conv_10k": ["trace=azure_conv", "trace.limit=10000"],
    "azure_conv_all": ["trace=azure_conv"],
    # Mooncake at its own arrival times in the default pool: overloaded (requests wait and are
    # preempted); slab(max) cannot hold a 200k-token reservation, so it is left out
    "mooncake_overloaded": ["trace=mooncake", "max_model_len=200000"],
}
AZURE_10K_GOAL_S = 1.0  # CPU seconds per strategy (issue 13)
AZURE_ALL_GOAL_S = 3.0  # the whole Azure conversation trace (19,366 requests), per strategy (issue 13)
# issue 13: at least 20x faster than "today", the code the issue was filed against: 64008c7 (the commit
# issue 12's figures name, parent of the first commit made for these issues). Medians of 3 interleaved
# runs in bare processes on this box, 2026-12-03 (`replay_vs_tree.py`; the same requests finished, the
# same hit tokens). Until then the ratio was taken to e449c43 (paged 10.70, radix 8.36 s recorded),
# which already kept waiting requests' matches incrementally (90ec62e) and so understated it
MOONCAKE_BEFORE_S = {"paged": 21.53, "radix": 7.89}
MOONCAKE = "mooncake-fast25/synthetic_trace.jsonl"


def compose_cfg(strategy: str, overrides: list[str]):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["progress=false", f"strategy={strategy}", *overrides])


_TRACES: dict[str, list] = {}


def trace(slice_name: str) -> list:
    if slice_name.startswith("azure") and not (traces_dir() / AZURE_CONV).is_file():
        pytest.skip(f"shared trace {traces_dir() / AZURE_CONV} not found (set KVBENCH_TRACES)")
    if slice_name.startswith("mooncake") and not (traces_dir() / MOONCAKE).is_file():
        pytest.skip(f"shared trace {traces_dir() / MOONCAKE} not found (set KVBENCH_TRACES)")
    if slice_name not in _TRACES:
        # made once, outside the timed replay (a lazy trace would build its requests in every round)
        _TRACES[slice_name] = list(instantiate(compose_cfg("paged", SLICES[slice_name]).trace))
    return _TRACES[slice_name]


def bench_replay(benchmark, strategy: str, slice_name: str, rounds: int):
    requests, cfg = trace(slice_name), compose_cfg(strategy, SLICES[slice_name])

    def setup():
        engine = instantiate(cfg.engine)
        sizes = strategy_sizes(cfg, cfg.kv_capacity_tokens)  # (geometry= for a hybrid pool design, as kvbench.run)
        st = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=cfg.kv_capacity_tokens,
                                                       max_model_len=cfg.max_model_len, **sizes)
        gc.collect()
        return (requests, Scheduler(st, **cfg.scheduler), engine), {"progress": False}

    result = benchmark.pedantic(replay, setup=setup, rounds=rounds, warmup_rounds=1)
    assert len(result.finished) + len(result.recorder.rejected) == len(requests)
    steps = len(result.recorder.timeline())
    benchmark.extra_info.update(steps=steps, requests=len(requests),
                                hit_tokens=int(sum(s.cached_tokens for s in result.finished)))
    return steps


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replay_synthetic(benchmark, strategy):
    bench_replay(benchmark, strategy, "synthetic", rounds=5)


_STEPS: dict[tuple[str, str], int] = {}


@pytest.mark.parametrize("slice_name", ["synthetic_nosharing", "azure_conv_nosharing"])
@pytest.mark.parametrize("strategy", ["paged_nocache", "paged"])
def test_replay_prefix_caching_at_zero_hits(benchmark, strategy, slice_name):
    steps = _STEPS[strategy, slice_name] = bench_replay(benchmark, strategy, slice_name, rounds=9)
    assert benchmark.extra_info["hit_tokens"] == 0, "this slice must have no prefix hits"
    other = _STEPS.get(("paged_nocache" if strategy == "paged" else "paged", slice_name))
    assert other is None or other == steps, "with and without caching must replay the same steps"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replay_azure_conv_10k(benchmark, strategy):
    bench_replay(benchmark, strategy, "azure_conv_10k", rounds=3)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(goal_s=AZURE_10K_GOAL_S, goal_met=median <= AZURE_10K_GOAL_S)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replay_azure_conv_all(benchmark, strategy):
    bench_replay(benchmark, strategy, "azure_conv_all", rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(goal_s=AZURE_ALL_GOAL_S, goal_met=median <= AZURE_ALL_GOAL_S)


@pytest.mark.parametrize("strategy", sorted(MOONCAKE_BEFORE_S))
def test_replay_mooncake_overloaded(benchmark, strategy):
    bench_replay(benchmark, strategy, "mooncake_overloaded", rounds=1)
    speedup = MOONCAKE_BEFORE_S[strategy] / benchmark.stats.stats.median
    benchmark.extra_info.update(before_s=MOONCAKE_BEFORE_S[strategy], speedup_vs_recorded=speedup,
                                goal_met=speedup >= 20)
