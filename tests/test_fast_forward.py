"""Exact fast-forward: every strategy yaml on every generator gives the same summary, timeline
and requests table, to the last bit, with and without `engine.fast_forward`; so do overloaded
pools with a steady queue, whose quiet runs take pages while requests wait (`head_need`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import kvbench.quiet
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
    return run_config([f"strategy={strategy}", f"trace={trace}", *OVERRIDES, *GENERATORS[trace]], fast)


def run_config(overrides: list[str], fast: bool, planned: list | None = None):
    """The replay of the config with `overrides`: (summary, timeline, requests, steps the engine
    ran); `planned` gets a 1 for each step the scheduler planned."""
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", *overrides])
    engine = instantiate(cfg.engine, fast_forward=fast)
    executed = []
    step = engine.step
    engine.step = lambda batch: executed.append(1) or step(batch)
    sizes = strategy_sizes(cfg, cfg.kv_capacity_tokens)  # (geometry= for a hybrid pool design)
    st = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=cfg.kv_capacity_tokens,
                                                   max_model_len=cfg.max_model_len, **sizes)
    scheduler = Scheduler(st, **cfg.scheduler)
    if planned is not None:
        schedule = scheduler.schedule
        scheduler.schedule = lambda: planned.append(1) or schedule()
    result = replay(instantiate(cfg.trace), scheduler, engine, progress=False)
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


# Overloaded: 144 requests in 12 groups sharing a 1024-token system prompt, arriving at 40/s, in a
# pool of 12,288 slots (a few requests' worth) with a 512-token step budget: the queue is never
# empty for long (70-85 % of steps have requests waiting), ~60-400 preemptions, pages of 16 (and
# radix's 1), the shared prompts evicted and hit again. `head_need`: the run's new path (steps that
# take pages while requests wait) runs for radix and paged_nocache, and for any strategy while
# max_num_seqs requests run; paged with prefix caching and slab keep the stop otherwise.
OVERLOADED_TRACE = ["trace=shared_prefix", "trace.num_groups=12", "trace.questions_per_group=12", "trace.rate=40",
                    "kv_capacity_tokens=12288", "max_model_len=4096", "scheduler.max_num_batched_tokens=512"]
OVERLOADED = {  # case → (overrides, most planned steps of the old stop's: None the same)
    "radix-lfu": (["strategy=radix", "strategy.eviction=lfu"], 0.85),
    "radix16-s3fifo": (["strategy=radix", "strategy.page_size=16", "strategy.eviction=s3fifo"], 0.85),
    "radix-slru-lpm": (["strategy=radix", "strategy.eviction=slru", "scheduler.policy=lpm",
                        "scheduler.max_wait_steps=2"], 0.85),
    "radix16-dedup": (["strategy=radix", "strategy.page_size=16", "scheduler.dedup_prefix=true",
                       "scheduler.max_wait_steps=4"], 0.85),
    "radix-dfs": (["strategy=radix", "scheduler.policy=dfs_weight", "scheduler.max_wait_steps=0"], 0.85),
    "radix-fifo-swap": (["strategy=radix", "strategy.eviction=fifo", "scheduler.preemption=swap",
                         "+engine.kv_bytes_per_token=1000"], 0.85),
    "paged_nocache": (["strategy=paged_nocache"], 0.85),
    "paged-lfu": (["strategy=paged", "strategy.eviction=lfu"], None),
    # max_num_seqs reached: nobody is tried, any take runs while free + cached pages suffice (a
    # run that took pages past them fails a grow: "grow(1) failed in a quiet step")
    "paged-lfu-max_num_seqs": (["strategy=paged", "strategy.eviction=lfu", "scheduler.max_num_seqs=12",
                                "kv_capacity_tokens=8192"], 1.0),
    "slab_pow2": (["strategy=slab_pow2"], None),
}


def _old_stop(monkeypatch):
    """The stop before this path: a quiet run with requests waiting takes no page."""
    monkeypatch.setattr(kvbench.quiet, "head_need", lambda scheduler, d: None)


@pytest.mark.parametrize("case", OVERLOADED)
def test_overloaded_pools_fast_forward_exactly(case, monkeypatch):
    overrides, takes = OVERLOADED[case]
    overrides = OVERLOADED_TRACE + overrides
    s0, t0, r0, steps0 = run_config(overrides, fast=False)
    planned: list = []
    s1, t1, r1, _ = run_config(overrides, fast=True, planned=planned)
    assert (t0.waiting > 0).mean() > 0.6  # (overloaded, a steady queue; a slab reserves, never preempts)
    assert s0["preemptions"] > 20 or case.startswith("slab")
    assert {k: v for k, v in s1.items() if not same(v, s0.get(k))} == {}
    assert t1.equals(t0), "the timeline differs"
    assert r1.equals(r0), "the requests table differs"
    old: list = []
    _old_stop(monkeypatch)
    run_config(overrides, fast=True, planned=old)
    if takes is not None:  # fewer steps planned than with the old stop
        assert len(planned) < takes * len(old), (len(planned), len(old))
    else:
        assert len(planned) == len(old)


def test_the_overloaded_case_catches_a_head_that_may_fit(monkeypatch):
    """Runs that take pages whatever the head (head_need 0: (a) still checked, not (b)) change the
    replay: a decode that evicts a page of the head's cached path can let the head in."""
    overrides = OVERLOADED_TRACE + OVERLOADED["radix-lfu"][0]
    _, t0, r0, _ = run_config(overrides, fast=False)
    monkeypatch.setattr(kvbench.quiet, "head_need", lambda scheduler, d: 0)
    _, t1, r1, _ = run_config(overrides, fast=True)
    assert not (t1.equals(t0) and r1.equals(r0))


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


@pytest.mark.parametrize("case", ["paged", "radix16-dedup"])
def test_counted_batches_equal_the_constructors(case, monkeypatch):
    """`StepBatch.counted` (the scheduler's counts, no pass over the seqs) gives the batch the
    constructor gives: every slot equal, on an overloaded replay (waiting requests, preemptions,
    mixed steps)."""
    from kvbench.batch import StepBatch
    made, counted = [], StepBatch.counted.__func__

    def check(cls, seqs, page_size, num_pages, contiguous, copies, h2d, d2h, *counts):
        b = counted(cls, seqs, page_size, num_pages, contiguous, copies, h2d, d2h, *counts)
        flags = [(s.is_decode, s.emits) for s in seqs]
        ref = StepBatch(list(seqs), page_size, num_pages, contiguous, list(copies), h2d, d2h)
        assert [(s.is_decode, s.emits) for s in seqs] == flags   # (the constructor keeps set flags)
        assert {k: getattr(b, k) for k in StepBatch.__slots__} == {k: getattr(ref, k) for k in StepBatch.__slots__}
        made.append(1)
        return b
    monkeypatch.setattr(StepBatch, "counted", classmethod(check))
    overrides = OVERLOADED[case][0] if case in OVERLOADED else [f"strategy={case}"]
    run_config(OVERLOADED_TRACE + overrides, fast=True)
    assert made, "no batch was made by StepBatch.counted"
