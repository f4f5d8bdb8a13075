"""Continuous batching: admission order, chunked prefill, preemption by recompute, no loss."""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.engines.sim import SimEngine
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler, Seq
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy
from kvbench.strategies.slab import SlabStrategy
from content_model import Checked
from strategy_cases import STRATEGY_YAMLS, build

ENGINE = SimEngine(overhead_s=0.01, prefill_token_s=0.0, decode_token_s=0.0, kv_read_token_s=0.0)


def req(rid: int, prompt: int, output: int, arrival: float = 0.0, base: int = 0) -> Request:
    rng = np.random.default_rng(rid + 1000 * base)
    return Request(rid, arrival, rng.integers(0, 30000, prompt, dtype=np.int32),
                   rng.integers(0, 30000, output, dtype=np.int32))


def test_chunked_prefill_splits_a_prompt_over_steps_and_emits_on_the_last_chunk():
    sched = Scheduler(PagedStrategy(1024, 512, page_size=16), max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(Seq(req(0, 150, 3)))
    chunks = []
    while sched.has_work():
        planned = sched.schedule()
        batch = sched.batch(planned, with_layout=True)
        chunks.append([(s.start, s.num_new, s.emits_token, len(s.page_table)) for s in batch.seqs])
        sched.complete(planned)
    assert chunks == [[(0, 64, False, 4)], [(64, 64, False, 8)], [(128, 22, True, 10)],
                      [(150, 1, True, 10)], [(151, 1, True, 10)]]


def test_preemption_recomputes_the_newest_request_and_puts_it_first_in_line():
    # 4 pages of 16: two requests that each grow to 2 pages fit; a third forces a preemption
    strategy = PagedStrategy(64, 64, page_size=16, prefix_caching=False)
    sched = Scheduler(strategy, max_num_seqs=8, max_num_batched_tokens=256)
    a, b, c = Seq(req(0, 15, 10)), Seq(req(1, 15, 10)), Seq(req(2, 15, 10))
    for s in (a, b, c):
        sched.add(s)
    sched.complete(sched.schedule())  # a, b, c admitted: 3 pages
    assert [s.request.id for s in sched.running] == [0, 1, 2]
    sched.complete(sched.schedule())  # each decodes token 16 → page 1 full
    planned = sched.schedule()  # a takes page 4, b has none left → c (newest) is preempted
    assert [s.request.id for s, _ in planned] == [0, 1]
    assert [s.request.id for s in sched.waiting] == [2] and c.preemptions == 1
    assert c.computed == 0 and c.prefill_target == 15 + 2  # recompute prompt + 2 emitted tokens
    assert sched.num_preemptions == 1


def test_every_request_ends_finished_or_rejected_with_its_reason():
    reqs = [req(0, 30, 5, 0.0), req(1, 600, 10, 0.1), req(2, 20, 480, 0.2), req(3, 40, 8, 0.3)]
    strategy = RadixStrategy(capacity_tokens=400, max_model_len=512)
    result = replay(reqs, Scheduler(strategy, 4, 128), ENGINE, progress=False)
    table = result.recorder.requests()
    assert table.status.tolist() == ["finished", "rejected", "rejected", "finished"]
    assert table.reason[1].startswith("max_model_len: prompt + output = 610")
    assert table.reason[2].startswith("pool: needs 499 KV slots, the pool holds 400")
    strategy.check_invariants()
    assert strategy.slot_states(None).token == 0


@pytest.mark.parametrize("stem", STRATEGY_YAMLS)
def test_memory_pressure_replay_finishes_everything_with_invariants_intact(stem):
    """Every strategy yaml on a pool too small for the load (512 slots; a slab that reserves
    max_model_len gets 2048, or it would run one request at a time), every strategy call checked
    against the content model (tests/content_model.py)."""
    strategy = build(stem, 512, 512)
    if strategy.contiguous and getattr(strategy, "reservation", None) == "max":
        strategy = build(stem, 2048, 512)
    rng = np.random.default_rng(7)
    reqs = [req(i, int(rng.integers(10, 200)), int(rng.integers(1, 120)), i * 0.005, base=i % 3)
            for i in range(120)]
    checked = Checked(strategy, invariants=False)  # every call the scheduler makes: content checked
    sched = Scheduler(checked, max_num_seqs=16, max_num_batched_tokens=256)
    result = replay(reqs, sched, ENGINE, progress=False)
    assert checked.driver.refusals > 0 and (checked.driver.hits > 0) == strategy.caches_prefixes
    assert len(result.finished) == 120
    assert all(s.emitted == s.request.output_len for s in result.finished)
    tl = result.recorder.timeline()
    states = tl[["token", "reserved", "internal", "external", "cached", "free"]].sum(axis=1)
    assert (states == strategy.capacity).all()
    strategy.check_invariants()
    if not strategy.contiguous:
        assert sched.num_preemptions > 0  # the pool was small enough to force recomputes


def test_fcfs_head_of_line_blocks_later_requests():
    strategy = SlabStrategy(100, 100, reservation="oracle")
    sched = Scheduler(strategy, 8, 512)
    for s in (Seq(req(0, 60, 2)), Seq(req(1, 50, 2)), Seq(req(2, 10, 2))):
        sched.add(s)
    sched.schedule()
    # 1 (51 slots) does not fit beside 0 (61); 2 (11 slots) would, but must not overtake 1
    assert [s.request.id for s in sched.running] == [0]
    assert [s.request.id for s in sched.waiting] == [1, 2]


def test_without_chunked_prefill_prompts_run_whole_and_recomputes_never_deadlock():
    strategy = PagedStrategy(96, 512, page_size=16, prefix_caching=False)
    sched = Scheduler(strategy, max_num_seqs=8, max_num_batched_tokens=40, chunked_prefill=False)
    reqs = [req(0, 50, 4), req(1, 40, 30), req(2, 30, 40), req(3, 20, 50)]
    assert sched.rejection(reqs[0]).startswith("batch_tokens: prompt of 50 tokens")
    result = replay(reqs, sched, ENGINE, progress=False)
    assert sorted(s.request.id for s in result.finished) == [1, 2, 3]
    assert sched.num_preemptions > 0  # 96 slots cannot hold all three: recomputes happened
    tl = result.recorder.timeline()
    assert tl.prefill_tokens.max() <= 40


@pytest.mark.parametrize("lengths", [[(30, 5), (600, 10)], [(600, 10)], [(600, 10), (700, 3)]],
                         ids=["last-rejected", "only-rejected", "all-rejected"])
def test_a_rejected_last_arrival_while_nothing_runs_ends_the_replay(lengths):
    # the last arrival is rejected when nothing runs: the loop must end, not look for a next one
    reqs = [req(i, p, o, arrival=float(i)) for i, (p, o) in enumerate(lengths)]
    result = replay(reqs, Scheduler(PagedStrategy(1024, 512), 4, 128), ENGINE, progress=False)
    table = result.recorder.requests()
    assert table.status.tolist() == ["finished" if p + o <= 512 else "rejected" for p, o in lengths]
