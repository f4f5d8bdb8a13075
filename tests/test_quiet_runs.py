"""Which steps a quiet run goes through (kvbench/quiet.py, kvbench/replay.py): finishes with
nobody waiting, arrivals behind a refused head of an fcfs queue, and page takes from free pages
behind a head they cannot let in, are fast-forwarded, not stepped; the tables stay those of
stepping."""
from __future__ import annotations

import numpy as np
import pytest

import kvbench.metrics
import kvbench.quiet
import kvbench.replay

from kvbench.engines.sim import SimEngine
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy
from kvbench.strategies.slab import SlabStrategy


def _requests(specs):
    """(arrival_s, prompt_len, output_len) → requests with distinct ids (no shared prefix)."""
    rng = np.random.default_rng(0)
    return [Request(i, t, rng.integers(0, 30000, p, dtype=np.int32), rng.integers(0, 30000, o, dtype=np.int32))
            for i, (t, p, o) in enumerate(specs)]


def _replay(make_strategy, specs, fast: bool, **scheduler):
    engine = SimEngine(overhead_s=0.01, prefill_token_s=1e-4, decode_token_s=1e-4, kv_read_token_s=1e-6,
                       fast_forward=fast)
    stepped = []
    step = engine.step
    engine.step = lambda batch: stepped.append(len(batch.seqs)) or step(batch)
    st = make_strategy()
    sched = Scheduler(st, **scheduler)
    plan = sched.schedule
    sched.schedule = lambda: stepped.append("planned") or plan()  # (a planned steady step starts a run)
    result = replay(_requests(specs), sched, engine, progress=False)
    st.check_invariants()
    return (result.recorder.timeline(), result.recorder.requests(), result.itl, [n for n in stepped if n != "planned"],
            stepped.count("planned"))


def test_finishes_with_nobody_waiting_are_fast_forwarded():
    # three requests admitted together; they finish at different steps and nobody waits
    specs = [(0.0, 20, 5), (0.0, 20, 9), (0.0, 20, 30)]

    def paged():
        return PagedStrategy(1024, 512, page_size=16)

    t0, r0, itl0, stepped0, _ = _replay(paged, specs, fast=False, max_num_seqs=8, max_num_batched_tokens=256)
    t1, r1, itl1, stepped1, _ = _replay(paged, specs, fast=True, max_num_seqs=8, max_num_batched_tokens=256)
    assert len(stepped0) == 30 and stepped0[:6] == [3, 3, 3, 3, 3, 2]  # request 0 left after step 5
    assert stepped1 == [3]  # only the step that admits all three: the finishes are inside the run
    assert t1.equals(t0) and r1.equals(r0) and np.array_equal(itl1, itl0)
    assert list(r1.finish_s) == list(t0.t_s[[4, 8, 29]] + t0.dt_s[[4, 8, 29]])


def test_arrivals_behind_a_refused_head_are_fast_forwarded():
    # the pool holds one max_model_len slab (and 36 slots more): request 0 runs, 1 waits (refused),
    # 2 and 3 join the queue
    specs = [(0.0, 10, 40), (0.0, 10, 5), (0.05, 10, 5), (0.1, 10, 5)]

    def slab():
        return SlabStrategy(100, 64, reservation="max")

    t0, r0, itl0, stepped0, _ = _replay(slab, specs, fast=False, max_num_seqs=8, max_num_batched_tokens=256)
    t1, r1, itl1, stepped1, _ = _replay(slab, specs, fast=True, max_num_seqs=8, max_num_batched_tokens=256)
    assert t1.equals(t0) and r1.equals(r0) and np.array_equal(itl1, itl0)
    assert list(t0.waiting[:15]) == [1] * 5 + [2] * 5 + [3] * 5  # (steps of ~10 ms: 2 joins at 0.05 s, 3 at 0.1 s)
    # request 0: its admission, then one run through both arrivals to its last step (the steady
    # step after the admission, planned, is the run's step 0); then each of 1, 2, 3 likewise
    assert stepped1 == [1, 1, 1, 1]
    assert len(stepped0) == 40 + 3 * 5


def test_page_takes_behind_a_head_that_free_pages_cannot_hold_are_fast_forwarded(monkeypatch):
    # paged without prefix caching, 20 pages: request 0 (20 + 100 positions) runs and takes a
    # page every 16 steps; request 1 (300 prompt positions: 19 pages) waits while 18 or fewer
    # are free, and taking free pages keeps it waiting: one run to request 0's last step
    specs = [(0.0, 20, 100), (0.001, 300, 5)]

    def paged():
        return PagedStrategy(320, 512, page_size=16, prefix_caching=False)

    t0, r0, itl0, stepped0, planned0 = _replay(paged, specs, fast=False, max_num_seqs=8, max_num_batched_tokens=512)
    t1, r1, itl1, _, planned1 = _replay(paged, specs, fast=True, max_num_seqs=8, max_num_batched_tokens=512)
    assert t1.equals(t0) and r1.equals(r0) and np.array_equal(itl1, itl0)
    assert list(t0.waiting[:100]) == [0] + [1] * 99 and len(stepped0) == planned0 == 105
    # request 0's admission, the planned step 0 of the run (it lasts to request 0's last step),
    # request 1's admission (then nobody waits: its decodes are a run at once)
    assert planned1 == 3
    monkeypatch.setattr(kvbench.quiet, "head_need", lambda scheduler, d: None)  # the stop before a take
    t2, r2, _, _, planned2 = _replay(paged, specs, fast=True, max_num_seqs=8, max_num_batched_tokens=512)
    assert t2.equals(t0) and r2.equals(r0) and planned2 == 3 + 6  # (a run stopped before each take: 6)


def test_a_run_behind_a_refused_head_goes_on_through_arrivals_and_rejections(monkeypatch):
    # as above, plus a request too long for max_model_len (rejected) and one that arrives exactly
    # when a step starts (it counts as waiting in that step, as stepping counts it)
    specs = [(0.0, 10, 40), (0.0, 10, 5), (0.05, 10, 5), (0.06, 70, 5), (0.1, 10, 5)]

    def slab():
        return SlabStrategy(100, 64, reservation="max")

    t0, _, _, _, _ = _replay(slab, specs, fast=False, max_num_seqs=8, max_num_batched_tokens=256)
    at = float(t0.t_s[12])  # a step's start, inside request 0's run
    specs = [*specs, (at, 10, 5)]  # (the last to arrive)
    t0, r0, itl0, _, _ = _replay(slab, specs, fast=False, max_num_seqs=8, max_num_batched_tokens=256)
    assert list(t0.waiting[11:14]) == [3, 4, 4] and float(t0.t_s[12]) == at  # (the arrival changed no step)
    runs = []
    forward = kvbench.replay.fast_forward
    monkeypatch.setattr(kvbench.replay, "fast_forward", lambda run, *a: runs.append(run) or forward(run, *a))
    t1, r1, itl1, stepped1, _ = _replay(slab, specs, fast=True, max_num_seqs=8, max_num_batched_tokens=256)
    assert t1.equals(t0) and r1.equals(r0) and np.array_equal(itl1, itl0)
    assert list(r1.status).count("rejected") == 1 and stepped1 == [1] * 5
    assert len(runs) == len(set(map(id, runs))) == 5  # no run was paused at an arrival: one call each


@pytest.mark.parametrize("capacity", [1024, 96])
def test_radix_page_size_1_runs_are_its_bulk_steps_through_finishes_waits_and_preemptions(capacity):
    # radix at page_size 1: every decode takes a page, so every request takes one in every step of
    # a run (radix's bulk steps, `decode_steps`). 1024 slots: nobody waits; requests finish inside
    # runs (the others go on) and arrivals end runs. 96 slots: requests wait and are preempted, and
    # runs start at a planned step 0 (then one whose last token is in step 0 takes no page after it)
    specs = [(0.0, 20, 5), (0.0, 20, 9), (0.0, 33, 30), (0.01, 30, 20), (0.05, 12, 20), (0.07, 7, 3),
             (0.3, 40, 12)]

    def radix():
        return RadixStrategy(capacity, 512)

    t0, r0, itl0, stepped0, _ = _replay(radix, specs, fast=False, max_num_seqs=8, max_num_batched_tokens=256)
    t1, r1, itl1, stepped1, _ = _replay(radix, specs, fast=True, max_num_seqs=8, max_num_batched_tokens=256)
    assert t1.equals(t0) and r1.equals(r0) and np.array_equal(itl1, itl0)
    assert (t0.waiting.max(), t0.preemptions.max()) == ((0, 0) if capacity == 1024 else (4, 4))
    assert len(stepped0) == len(t0) and len(stepped1) < len(t0) / 4  # the others are quiet


@pytest.mark.parametrize("strategy", ["paged", "radix", "slab"])
def test_finishes_inside_a_chunk_are_segments_of_one_recorded_run(strategy, monkeypatch):
    # nobody waits: requests leave at steps 4, 8 (two at once) and 14 of one run, inside one
    # priced chunk; an arrival at 0.3 s pauses and ends it (its later steps are after 0.3 s).
    # The chunk goes on past each finish, priced again for the others, and is recorded once, its
    # segments before the last given as `before`: the tables are stepping's
    specs = [(0.0, 20, 5), (0.0, 20, 9), (0.0, 20, 9), (0.0, 20, 15), (0.0, 20, 60), (0.3, 10, 5)]
    makers = {"paged": lambda: PagedStrategy(1024, 512, page_size=16), "radix": lambda: RadixStrategy(1024, 512),
              "slab": lambda: SlabStrategy(4096, 512, reservation="max")}
    calls = []
    quiet_steps = kvbench.metrics.Recorder.quiet_steps

    def counted(self, *args):  # (seqs, t, dt, k, ..., follows, before: as `_record` passes them)
        calls.append((args[3], [m for m, *_ in args[13]]))
        return quiet_steps(self, *args)

    t0, r0, itl0, stepped0, _ = _replay(makers[strategy], specs, fast=False, max_num_seqs=8,
                                        max_num_batched_tokens=256)
    monkeypatch.setattr(kvbench.metrics.Recorder, "quiet_steps", counted)
    t1, r1, itl1, stepped1, _ = _replay(makers[strategy], specs, fast=True, max_num_seqs=8,
                                        max_num_batched_tokens=256)
    assert t1.equals(t0) and r1.equals(r0) and np.array_equal(itl1, itl0)
    assert list(t0.running[:16]) == [5] * 5 + [4] * 4 + [2] * 6 + [1]  # (the last request alone after step 14)
    assert stepped1[0] == 5  # the admission; then one run (its finishes inside), recorded in one call
    assert calls[0][1] == [4, 4, 6]  # steps 0-3 (4 of them after the admission), 4-7, 8-13: then the last one's
