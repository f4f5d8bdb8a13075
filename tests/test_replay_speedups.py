"""The exact shortcuts of the sim replay (issue 13): each gives what the long way gives.

- a strategy that declares `reads_tokens` false is admitted with no ids, so a lazy request's ids
  are never built (slab; paged without prefix caching); a checker wrapper still gets them;
- `SimEngine.decode_cost_list` gives `decode_costs`' floats, and `SimEngine.step` `cost`'s, bit
  for bit;
- the replay's batches make their ScheduledSeqs only where read (`PlannedSeqs`);
- `grows_merge`: grow(a) then grow(b) leaves the pool as grow(a + b) (slab; paged without
  prefix caching), and paged's one-pass release frees the pages the page-by-page path frees,
  onto the free stack in the same order.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.engines.sim import SimEngine
from kvbench.replay import replay
from kvbench.scheduler import Scheduler, Seq
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.slab import SlabStrategy
from kvbench.traces.synthetic import synthetic
from tests.content_model import Checked


def _engine():
    return SimEngine(overhead_s=0.006, prefill_token_s=3e-5, decode_token_s=5e-5, kv_read_token_s=4.4e-8)


@pytest.mark.parametrize("make, builds", [
    (lambda: SlabStrategy(20000, 2048, reservation="oracle"), False),
    (lambda: PagedStrategy(20000, 2048, prefix_caching=False), False),
    (lambda: PagedStrategy(20000, 2048, prefix_caching=True), True),
    (lambda: Checked(SlabStrategy(20000, 2048, reservation="oracle")), True),  # the checker reads them
])
def test_ids_are_built_only_for_a_strategy_that_reads_them(make, builds):
    reqs = list(synthetic(num_requests=30, seed=4, max_model_len=2048))  # (made once: a LazyTrace makes them on reading)
    assert all(r._tokens is None for r in reqs)
    built = []
    for r in reqs:  # record each build (a replay on the sim forgets the ids when a request leaves)
        build = r._build
        r._build = r._rebuild = (lambda b=build: built.append(1) or b())
    out = replay(reqs, Scheduler(make(), max_num_seqs=8, max_num_batched_tokens=512), _engine(), progress=False)
    assert len(out.finished) + len(out.recorder.rejected) == 30 and len(out.finished) > 20
    assert (len(built) == len(out.finished)) if builds else not built  # (a rejected request's: never)


def test_decode_cost_list_gives_decode_costs_floats():
    rng = np.random.default_rng(0)
    for coef in (dict(overhead_s=0.006, prefill_token_s=3e-5, decode_token_s=5e-5, kv_read_token_s=4.4e-8),
                 dict(overhead_s=0.00123456789, prefill_token_s=1e-5, decode_token_s=7.77e-5, kv_read_token_s=1.2345678e-8)):
        e = SimEngine(**coef)
        for _ in range(300):
            d, kv, k = int(rng.integers(1, 600)), int(rng.integers(0, 10**9)), int(rng.integers(1, 100))
            got = e.decode_cost_list(d, kv, k)
            assert got == e.decode_costs(d, np.arange(kv, kv + d * k, d, dtype=np.int64)).tolist()
            assert got[0] == e.cost(0, d, kv) and got[-1] == e.cost(0, d, kv + d * (k - 1))


def test_sim_step_gives_step_time_floats():
    """`SimEngine.step` (its coefficients read once) gives `cost`'s float (step_time) bit for bit:
    decode-only steps, graph-replayed steps with prefill (with and without a pair term) and eager
    ones (floor, eager coefficients, pairs)."""
    from kvbench.batch import StepBatch
    rng = np.random.default_rng(1)
    for coef in (dict(overhead_s=0.006, prefill_token_s=3e-5, decode_token_s=5e-5, kv_read_token_s=4.4e-8),
                 dict(overhead_s=0.0011, prefill_token_s=1.3e-5, decode_token_s=7.7e-5, kv_read_token_s=1.23e-8,
                      prefill_step_s=3.3e-4, eager_floor_s=0.009, eager_decode_token_s=9.1e-5,
                      eager_kv_read_token_s=2.9e-8, graph_prefill_tokens=256, graph_prefill_step_s=2.1e-4,
                      graph_prefill_token_s=4.4e-6, prefill_pair_s=3.7e-11, graph_prefill_pair_s=1.9e-11)):
        e = SimEngine(**coef)
        for _ in range(2000):
            p = int(rng.choice([0, rng.integers(1, 300), rng.integers(1, 9000)]))
            d, kv, pairs = int(rng.integers(0, 600)), int(rng.integers(0, 10**8)), int(rng.integers(0, 10**10))
            b = StepBatch.counted([], 16, 64, False, [], 0, 0, p + d, d, kv, pairs if p else 0)
            assert e.step(b) == e.cost(p, d, kv, pairs if p else 0)


def test_planned_seqs_are_the_scheduler_seqs_made_where_read():
    """The replay's batches make their seqs only where read (`PlannedSeqs`): they equal the
    scheduler's ScheduledSeqs, a replay whose engine reads every batch's seqs gives the same
    timeline and requests as one that reads none (the recorder reads the plan then), and a read
    after the step ran (the progress moved on) raises instead of answering wrong."""
    from kvbench.batch import PlannedSeqs

    def run(read: bool):
        st = PagedStrategy(3000, 2048, page_size=16, prefix_caching=True)
        sched = Scheduler(st, max_num_seqs=16, max_num_batched_tokens=512)
        engine = _engine()
        step, seen = engine.step, []
        if read:
            def check(batch):
                seqs = batch.seqs
                assert isinstance(seqs, PlannedSeqs) and len(seqs) == len(list(seqs))
                seen.append([(s.request.id, s.start, s.num_new, s.emits, s.is_decode) for s in seqs])
                return step(batch)
            engine.step = check
        reqs = list(synthetic(num_requests=40, seed=7, max_model_len=2048))
        rec = replay(reqs, sched, engine, progress=False).recorder
        return rec.timeline(), rec.requests(), seen

    t0, r0, _ = run(False)
    t1, r1, seen = run(True)
    assert seen and t0.equals(t1) and r0.equals(r1)
    assert any(len(rows) > 1 and not all(x[4] for x in rows) for rows in seen)  # mixed steps were read

    st = PagedStrategy(3000, 2048, page_size=16, prefix_caching=False)
    sched = Scheduler(st, max_num_seqs=8, max_num_batched_tokens=64)
    for r in list(synthetic(num_requests=6, seed=3, max_model_len=2048)):
        sched.add(Seq(r))
    planned = sched.schedule()
    ref = sched.batch(planned, False).seqs  # (the scheduler's list)
    lazy = sched.batch(planned, False, lazy=True).seqs
    sealed = sched.batch(planned, False, lazy=True).seqs
    assert lazy == ref and len(sealed) == len(ref)
    sealed.seal()
    sched.complete(planned)
    assert len(sealed) == len(ref) and list(lazy) == ref  # (made before the step ran: kept)
    with pytest.raises(RuntimeError, match="after the step ran"):
        list(sealed)


def _state(st):
    if isinstance(st, SlabStrategy):
        return (st.slot_states(None), list(st._starts), list(st._sizes),
                {r: (e.start, e.pages, e.kv_len, e.length) for r, e in st._ext.items()})
    # (reference counts as `_true_refs`: a free page's `_ref` is not read, the solo release leaves it unwritten)
    return (st.slot_states(None), st._free.tolist(), st._fresh, st._true_refs(), st._fill[:],
            {r: (list(s.pages), s.length, s.reserved) for r, s in st._seqs.items()})


@pytest.mark.parametrize("make", [lambda: SlabStrategy(4096, 1024, reservation="max"),
                                  lambda: SlabStrategy(4096, 1024, reservation="oracle"),
                                  lambda: PagedStrategy(4096, 1024, page_size=16, prefix_caching=False)])
def test_merged_grows_and_one_pass_release_leave_the_same_pool(make):
    rng = np.random.default_rng(1)
    a, b = make(), make()
    assert a.grows_merge
    live: dict[int, list[int]] = {}  # rid -> [length, kv_len]
    ids = np.zeros(1200, np.int32)
    for rid in range(400):
        if live and (rng.random() < 0.4 or len(live) > 4):  # a request leaves
            gone = int(rng.choice(list(live)))
            a.release(gone)
            b.release(gone)
            del live[gone]
        kv_len = int(rng.integers(2, 300))
        prompt = int(rng.integers(1, kv_len))
        if a.admit(rid, ids, kv_len, prompt, prompt).admitted:
            assert b.admit(rid, ids, kv_len, prompt, prompt).admitted
            live[rid] = [prompt, kv_len]
        for r, (length, kv) in live.items():  # grows of x then y on a, of x + y at once on b
            x = int(rng.integers(0, kv - length + 1))
            y = int(rng.integers(0, kv - length - x + 1))
            assert a.grow(r, x) and a.grow(r, y) and b.grow(r, x + y)  # (the pool holds 5 requests' growth)
            live[r][0] += x + y
        assert _state(a) == _state(b)
    a.check_invariants()
    assert rid == 399 and len(a._seqs if hasattr(a, "_seqs") else a._ext) > 0


def test_paged_one_pass_release_frees_pages_in_the_page_by_page_order():
    fast, slow = (PagedStrategy(2048, 1024, page_size=16, prefix_caching=False) for _ in range(2))
    slow._solo = False  # the page-by-page path (as after a fork)
    ids = np.zeros(600, np.int32)
    for st in (fast, slow):
        for rid, (kv, n) in enumerate([(300, 100), (200, 37), (500, 250), (110, 90)]):
            assert st.admit(rid, ids, kv, n, n).admitted
            assert st.grow(rid, 17)
        st.release(2)
        st.release(0)
        assert st.admit(9, ids, 400, 300, 300).admitted
        st.release(1)
        st.check_invariants()
    assert _state(fast) == _state(slow)
    assert fast._free.tolist() == slow._free.tolist() and len(fast._free) >= 10
