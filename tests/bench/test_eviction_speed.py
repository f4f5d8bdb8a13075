"""Speed of the eviction policies and of LRU's one-pass curve (issue 14; pytest-benchmark, `-m bench`).

- LRU's hit-rate curve at 8 capacities (1 % to 100 % of the distinct pages, log-spaced) over the
  whole Azure conversation trace (19,366 requests, 1.64 M pages of 16) and the whole Mooncake
  trace (3,993 requests, 3.86 M page references): one pass (kvbench/traces/stack_distance.py,
  the page stream included) against the 8 sequential replays of paged with LRU it replaces
  (experiments/eviction_curves.py's `replay`); the hits are asserted equal. Goal: one pass in
  less CPU time than the 8 replays (the replays' `extra_info` holds the ratio).
- The whole Azure conversation trace through the full simulation (scheduler, strategy, sim
  engine, recorder; default pool, the trace's own arrival times) for paged and radix with each
  eviction policy. Goal: <= 30 s of CPU each on one core of the 2-core VM.

Every name holds `azure_conv` or `mooncake`: the CI speed gate (tests/bench/gate.py) leaves these
out (tens of seconds a round). Run: `python -m pytest tests/bench/test_eviction_speed.py -m bench`
(`KVBENCH_EVICTION_ROUNDS=3`: three rounds of each simulation, for medians).
"""
from __future__ import annotations

import gc
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kvbench.replay import replay
from kvbench.scheduler import Scheduler
from kvbench.schema import register
from kvbench.traces import traces_dir
from kvbench.traces.stack_distance import lru_curve

pytestmark = [pytest.mark.bench, pytest.mark.benchmark(timer=time.process_time)]
REPO = Path(__file__).resolve().parents[2]
FILES = {"azure_conv": "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv",
         "mooncake": "mooncake-fast25/synthetic_trace.jsonl"}
PS, POINTS = 16, 8
SIM_GOAL_S = 30.0  # CPU seconds per strategy and policy, whole Azure conversation trace (issue 14)
POLICIES = ["lru", "fifo", "lfu", "slru", "arc", "s3fifo", "priority"]
SIM_ROUNDS = int(os.environ.get("KVBENCH_EVICTION_ROUNDS", "1"))  # 3 for the README table's medians

_spec = importlib.util.spec_from_file_location("eviction_curves", REPO / "experiments" / "eviction_curves.py")
curves_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curves_mod)


def compose_cfg(overrides: list[str]):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


_TRACES: dict[str, list] = {}


def requests_of(name: str) -> list:
    if not (traces_dir() / FILES[name]).is_file():
        pytest.skip(f"shared trace {traces_dir() / FILES[name]} not found (set KVBENCH_TRACES)")
    if name not in _TRACES:
        reqs = instantiate(compose_cfg([f"trace={name}"]).trace)
        _TRACES[name] = sorted(reqs, key=lambda r: (r.arrival_s, r.id))
    return _TRACES[name]


def capacities(distinct: int) -> list[int]:
    return sorted({max(1, int(round(c))) for c in np.geomspace(0.01 * distinct, distinct, POINTS)})


_ONE_PASS: dict[str, tuple[float, list[int], list[int]]] = {}  # trace → (CPU s, capacities, hit tokens)


@pytest.mark.parametrize("name", ["azure_conv", "mooncake"])
def test_lru_curve_one_pass(benchmark, name):
    reqs = requests_of(name)

    def one_pass():
        curve = lru_curve(reqs, PS)
        caps = capacities(curve.refs.num_blocks)
        return caps, curve.hit_tokens(caps).tolist(), curve

    caps, hits, curve = benchmark.pedantic(one_pass, rounds=1, warmup_rounds=0)
    assert all(curve.exact_for_default_paged(c) for c in caps) or name == "mooncake"
    _ONE_PASS[name] = (benchmark.stats.stats.median, caps, hits)
    benchmark.extra_info.update(capacities=caps, hit_tokens=hits, first_duplicate_depth=curve.first_duplicate_depth)


@pytest.mark.parametrize("name", ["azure_conv", "mooncake"])
def test_lru_curve_eight_replays(benchmark, name):
    """The replays use dedup_touch=True, the setting the curve is exact for at every capacity."""
    reqs = requests_of(name)
    if name not in _ONE_PASS:
        pytest.skip("run with test_lru_curve_one_pass (it gives the capacities)")
    one_s, caps, hits = _ONE_PASS[name]

    def eight_replays():
        items = [(np.asarray(r.tokens, dtype=np.int32), r.prompt_len, r.prompt_len + r.output_len - 1) for r in reqs]
        room = max(-(-kv // PS) for _, _, kv in items) + 1
        return [curves_mod.replay(items, "lru", c, PS, room, dedup_touch=True) for c in caps]

    got = benchmark.pedantic(eight_replays, rounds=1, warmup_rounds=0)
    assert got == hits
    eight_s = benchmark.stats.stats.median
    benchmark.extra_info.update(one_pass_s=one_s, speedup=eight_s / one_s, goal_met=one_s < eight_s)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("strategy", ["paged", "radix"])
def test_replay_azure_conv_all_policy(benchmark, strategy, policy):
    reqs = requests_of("azure_conv")
    cfg = compose_cfg([f"strategy={strategy}", "trace=azure_conv", f"strategy.eviction={policy}"])

    def setup():
        engine = instantiate(cfg.engine)
        st = instantiate(cfg.strategy, capacity_tokens=cfg.kv_capacity_tokens, max_model_len=cfg.max_model_len)
        gc.collect()
        return (reqs, Scheduler(st, **cfg.scheduler), engine), {"progress": False}

    result = benchmark.pedantic(replay, setup=setup, rounds=SIM_ROUNDS, warmup_rounds=0)
    assert len(result.finished) + len(result.recorder.rejected) == len(reqs)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(goal_s=SIM_GOAL_S, goal_met=median <= SIM_GOAL_S, steps=len(result.recorder.timeline()))
