"""Exact fast-forward: every strategy yaml on every generator gives the same summary, timeline
and requests table, to the last bit, with and without `engine.fast_forward`."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kvbench.engines.sim import SimEngine
from kvbench.metrics import summarize
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.run import strategy_sizes
from kvbench.scheduler import Scheduler
from kvbench.schema import register
from kvbench.strategies.paged import PagedStrategy

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = sorted(p.stem for p in (REPO / "configs" / "strategy").glob("*.yaml"))
# every generator, about 200 requests each, in a pool small enough that requests wait and are preempted
GENERATORS = {"synthetic": ["trace.num_requests=200"], "shared_prefix": ["trace.num_groups=6"],
              "multi_turn": ["trace.num_chats=40"]}
OVERRIDES = ["kv_capacity_tokens=32768", "max_model_len=8192"]


def run_case(strategy: str, trace: str, fast: bool):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", f"strategy={strategy}", f"trace={trace}", *OVERRIDES,
                                            *GENERATORS[trace]])
    engine = instantiate(cfg.engine, fast_forward=fast)
    executed = []
    step = engine.step
    engine.step = lambda batch: executed.append(1) or step(batch)
    sizes = strategy_sizes(cfg, cfg.kv_capacity_tokens)  # (geometry= for a hybrid pool design)
    st = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=cfg.kv_capacity_tokens,
                                                   max_model_len=cfg.max_model_len, **sizes)
    result = replay(instantiate(cfg.trace), Scheduler(st, **cfg.scheduler), engine, progress=False)
    st.check_invariants()
    requests, timeline = result.recorder.requests(), result.recorder.timeline()
    return summarize(requests, timeline, st.capacity, result.itl), timeline, requests, len(executed)


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("trace", GENERATORS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_forward_changes_no_metric_row_or_request(strategy, trace):
    s0, t0, r0, steps0 = run_case(strategy, trace, fast=False)
    s1, t1, r1, steps1 = run_case(strategy, trace, fast=True)
    assert steps0 == s0["num_steps"] and s0["preemptions"] + s0["rejected"] >= 0
    assert {k: v for k, v in s1.items() if not same(v, s0.get(k))} == {}
    assert set(s1) == set(s0)
    assert t1.equals(t0), "the timeline differs"
    assert r1.equals(r0), "the requests table differs"
    assert steps1 <= steps0
    if strategy.startswith("slab"):  # a reservation never takes a page: most steps are quiet
        assert steps1 < 0.6 * steps0, f"only {steps0 - steps1} of {steps0} steps fast-forwarded"


def test_the_run_is_checked_against_the_strategys_own_counts():
    class Overpromising(PagedStrategy):
        def room(self, rid, length):
            return 10**6  # claims pages it does not hold: grows inside the "room" take pages

    rng = np.random.default_rng(0)
    reqs = [Request(i, 0.0, rng.integers(0, 30000, 20, dtype=np.int32),
                    rng.integers(0, 30000, 60, dtype=np.int32)) for i in range(4)]
    engine = SimEngine(overhead_s=0.01, prefill_token_s=0.0, decode_token_s=0.0, kv_read_token_s=0.0)
    # at most 3 running: the 4th waits, so quiet steps must stay inside the promised room
    with pytest.raises(RuntimeError, match="fast-forward: strategy 'paged.*reserved to token"):
        replay(reqs, Scheduler(Overpromising(1024, 512, page_size=16), 3, 256), engine, progress=False)
    assert replay(reqs, Scheduler(PagedStrategy(1024, 512, page_size=16), 3, 256), engine,
                  progress=False).recorder.requests().finish_s.notna().all()
