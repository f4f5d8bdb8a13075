"""In-batch prefix deduplication (issue 14, `scheduler.dedup_prefix`): the exact admissions of
scripted requests that share an uncached prefix (with the request admitted before them in the
step, or with a running prefill), the starvation guard, more hits on the shared-prefix
generator, and a property test: every request ends finished and none is passed over more than
max_wait_steps times."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as hs

from kvbench.engines.sim import SimEngine
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler, Seq
from kvbench.schema import ConfigError, register, validate
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy
from kvbench.traces import Fixed, shared_prefix

REPO = Path(__file__).resolve().parents[1]
ENGINE = SimEngine(overhead_s=0.005, prefill_token_s=2e-5, decode_token_s=1e-4, kv_read_token_s=1e-7)
P = np.random.default_rng(1).integers(100, 30000, 64, dtype=np.int32)  # a 64-token prefix no cache holds
STRATEGIES = {"paged": lambda cap=4096: PagedStrategy(cap, 1024, page_size=16),
              "radix": lambda cap=4096: RadixStrategy(cap, 1024, page_size=1)}


def own(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 30000, n, dtype=np.int32)


def request(rid: int, prefix: np.ndarray, own_len: int = 16, output: int = 4) -> Request:
    return Request(rid, 0.0, np.concatenate([prefix, own(own_len, rid)]), own(output, 500 + rid))


def steps(sched: Scheduler, reqs: list[Request], k: int) -> list[list[tuple[int, int]]]:
    """Add `reqs`, run k steps; each step's first admissions as (request id, cached positions)."""
    for r in reqs:
        sched.add(Seq(r))
    out = []
    for _ in range(k):
        planned = sched.schedule()
        out.append([(r.id, cached) for r, cached in sched.event(planned, False).admitted])
        sched.complete(planned)
        sched.strategy.check_invariants()
    return out


@pytest.mark.parametrize("stem", sorted(STRATEGIES))
def test_of_two_requests_sharing_an_uncached_prefix_one_waits_and_hits_the_other(stem):
    pair = [request(0, P), request(1, P)]
    on = steps(Scheduler(STRATEGIES[stem](), 8, 1024, dedup_prefix=True), pair, 2)
    assert on == [[(0, 0)], [(1, 64)]]  # the second computes 16 positions, not 80
    off = steps(Scheduler(STRATEGIES[stem](), 8, 1024), [request(0, P), request(1, P)], 2)
    assert off == [[(0, 0), (1, 0)], []]  # FCFS: both at once, both compute the prefix


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "dfs_weight"])
def test_a_deferred_request_is_overtaken_and_counted_passed_over(policy):
    """A and B share P, C does not: B waits, C (behind it) goes in; B is passed over once."""
    sched = Scheduler(STRATEGIES["radix"](), 8, 1024, policy=policy, dedup_prefix=True)
    reqs = [request(0, P), request(1, P), request(2, own(64, 7))]
    assert steps(sched, reqs, 2) == [[(0, 0), (2, 0)], [(1, 64)]]
    assert sched.deferred == 1


def test_the_threshold_counts_positions_beyond_what_the_cache_serves():
    """Shared 64, of which the cache holds 48 (3 pages of 16): 16 new positions to gain. With
    dedup_min_prefix 16 the second waits; with 17 it goes at once (and hits 48)."""
    def run(m: int):
        st = STRATEGIES["paged"]()
        warm = np.concatenate([P[:48], own(20, 99)])  # caches P's first 3 pages
        assert st.admit(-1, warm, len(warm), len(warm) - 1, 10 ** 6).admitted
        st.release(-1)
        return steps(Scheduler(st, 8, 1024, dedup_prefix=True, dedup_min_prefix=m), [request(0, P), request(1, P)], 2)

    assert run(16) == [[(0, 48)], [(1, 64)]]
    assert run(17) == [[(0, 48), (1, 48)], []]


def test_a_running_prefill_defers_a_request_that_shares_its_uncomputed_prefix():
    """A's 80-token prompt in chunks of 48: in step 2 B could go in with 48 cached (A's first
    chunk), but 16 more of its prefix are computed in that step: B waits one step and hits 64."""
    def run(dedup: bool):
        return steps(Scheduler(STRATEGIES["paged"](), 8, 48, dedup_prefix=dedup, dedup_min_prefix=16),
                     [request(0, P), request(1, P)], 3)

    assert run(True) == [[(0, 0)], [], [(1, 64)]]
    assert run(False) == [[(0, 0)], [(1, 48)], []]


def test_the_starvation_guard_bounds_deferral():
    """max_wait_steps=1: once passed over, a request is urgent and never deferred again;
    max_wait_steps=0 turns deferral off."""
    reqs = lambda: [request(0, P), request(1, P), request(2, own(64, 7)), request(3, P)]  # noqa: E731
    # step 1: 0 in; 1 deferred; 2 in (1 passed over: urgent now); 3 deferred (nobody behind it went in)
    sched = Scheduler(STRATEGIES["radix"](), 8, 1024, dedup_prefix=True, max_wait_steps=1)
    assert steps(sched, reqs(), 2) == [[(0, 0), (2, 0)], [(1, 64), (3, 64)]]
    assert [s.passed for s in sched.running] == [0, 0, 1, 0]  # running: 0, 2, 1, 3
    zero = Scheduler(STRATEGIES["radix"](), 8, 1024, dedup_prefix=True, max_wait_steps=0)
    assert steps(zero, reqs(), 1) == [[(0, 0), (1, 0), (2, 0), (3, 0)]]


def test_dedup_is_inert_for_a_strategy_that_caches_nothing():
    st = PagedStrategy(4096, 1024, page_size=16, prefix_caching=False)
    assert steps(Scheduler(st, 8, 1024, dedup_prefix=True), [request(0, P), request(1, P)], 1) == [[(0, 0), (1, 0)]]


def run_generator(stem: str, dedup: bool) -> tuple[int, int]:
    reqs = shared_prefix(num_groups=4, questions_per_group=8, system_len=Fixed(256), question_len=Fixed(32),
                         output_len=Fixed(16), rate=float("inf"), seed=2)
    sched = Scheduler(STRATEGIES[stem](20000), 32, 4096, dedup_prefix=dedup)
    result = replay(reqs, sched, ENGINE, progress=False)
    assert len(result.finished) == len(reqs)
    return sum(s.cached_tokens for s in result.finished), sched.deferred


@pytest.mark.parametrize("stem", sorted(STRATEGIES))
def test_dedup_raises_hits_on_the_shared_prefix_generator(stem):
    """32 requests at once, 4 system prompts of 256: without dedup the first step admits 15 of
    them, each computing its group's prompt (17 of 32 hit it later); with dedup one per group
    computes it and the other 28 hit all of it, the most there is."""
    off, none = run_generator(stem, False)
    on, deferred = run_generator(stem, True)
    assert (off, none) == (17 * 256, 0)
    assert on == 28 * 256 and deferred > 0


@settings(max_examples=30, deadline=None)
@given(policy=hs.sampled_from(["fcfs", "lpm", "dfs_weight"]), stem=hs.sampled_from(sorted(STRATEGIES)),
       bound=hs.integers(0, 4), m=hs.integers(1, 40), budget=hs.integers(16, 200),
       reqs=hs.lists(hs.tuples(hs.integers(0, 3), hs.integers(1, 60), hs.integers(1, 12), hs.integers(0, 3)),
                     min_size=1, max_size=12))
def test_every_request_finishes_and_none_is_passed_over_more_than_max_wait_steps(policy, stem, bound, m, budget, reqs):
    """Requests from 4 prefix groups (a 0-60 token shared prefix, then their own ids) arriving in
    bursts, in a pool small enough to preempt; dedup on."""
    trace = []
    for rid, (group, own_len, out, t) in enumerate(reqs):
        prefix = own(40, 1000 + group)[:(group * 20)]
        trace.append(Request(rid, float(t) * 0.01, np.concatenate([prefix, own(own_len, rid)]), own(out, 500 + rid)))
    trace.sort(key=lambda r: r.arrival_s)
    st = STRATEGIES[stem](256)
    sched = Scheduler(st, 6, budget, policy=policy, max_wait_steps=bound, dedup_prefix=True, dedup_min_prefix=m)
    result = replay(trace, sched, ENGINE, progress=False)
    rejected = len(result.recorder.rejected)
    assert len(result.finished) + rejected == len(trace)
    assert all(s.emitted == s.request.output_len for s in result.finished)
    assert max(s.passed for s in result.finished) <= bound
    st.check_invariants()


def test_bad_values_are_config_errors():
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for override, message in (("scheduler.dedup_min_prefix=0", "scheduler.dedup_min_prefix=0: must be an integer >= 1"),
                                  ("scheduler.dedup_prefix=maybe", "scheduler.dedup_prefix")):
            try:
                cfg = compose("config", overrides=["progress=false", override])
            except Exception as err:  # a bool key is typed by the schema: Hydra refuses it at compose time
                assert message in str(err)
                continue
            with pytest.raises(ConfigError, match=message):
                validate(cfg)
    with pytest.raises(ValueError, match="dedup_min_prefix must be >= 1"):
        Scheduler(STRATEGIES["radix"](), 1, 1, dedup_prefix=True, dedup_min_prefix=0)


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_without_shared_prefixes_dedup_changes_nothing(policy):
    """Random prompts (no two share 32 ids) past saturation: the same timeline with dedup on."""
    from kvbench.traces import synthetic

    def timeline(dedup: bool):
        reqs = synthetic(num_requests=60, rate=40.0, seed=4)
        sched = Scheduler(STRATEGIES["paged"](2048), 16, 512, policy=policy, dedup_prefix=dedup)
        result = replay(reqs, sched, ENGINE, progress=False)
        assert len(result.finished) + len(result.recorder.rejected) == 60 and sched.num_preemptions > 0
        return result.recorder.timeline(), sched.deferred

    (off, _), (on, deferred) = timeline(False), timeline(True)
    assert deferred == 0 and on.equals(off)
