"""paged's quiet-run page takes in one call (`PagedStrategy.quiet_pages`, called by
kvbench/quiet.py) leave the pool exactly as the per-taker grows it replaces: the same page ids
to the same requests, the same free stack, LRU order, hash table, lazy-registration owners and
per-page lists before every planned step, and the same timeline and requests table. Page order
shows in no metric, so the pool itself is compared. Pools small enough that takes evict cached
pages and requests wait behind a refused head; prompts that share prefixes (hits, lazily
registered chains taken over or hashed)."""
from __future__ import annotations

import numpy as np
import pytest

import kvbench.quiet
from kvbench.engines.sim import SimEngine
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler
from kvbench.strategies.paged import PagedStrategy


def _requests(n: int, seed: int) -> list[Request]:
    """n requests, arriving in bursts; half extend one of 4 shared prefixes (some the same prompt)."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(0, 30000, int(rng.integers(8, 90)), dtype=np.int32) for _ in range(4)]
    out, t = [], 0.0
    for i in range(n):
        t += float(rng.exponential(0.02)) if i % 7 else 0.5
        own = rng.integers(0, 30000, int(rng.integers(1, 60)), dtype=np.int32)
        prompt = np.concatenate([heads[i % 4], own]) if i % 2 else own
        if i % 10 == 3:
            prompt = heads[1].copy()
        out.append(Request(i, t, prompt, rng.integers(0, 30000, int(rng.integers(1, 120)), dtype=np.int32)))
    return out


def _state(s: PagedStrategy):
    memo = s._hit_memo
    marks = [h if h is None or isinstance(h, int) else ("owner", h.hashes[-1]) for h in s._marks()]
    owners = {h: (o.ndef, o.hash_at, list(o.pages)) for h, o in s._owners.items()}
    seqs = {rid: (list(q.pages), q.length, q.reserved, q.hash_at, q.lazy, q.ndef, list(q.hashes))
            for rid, q in s._seqs.items()}
    return (list(s._free), s._fresh, list(s._lru), dict(s._table), s._true_refs(), list(s._fill), marks,
            list(s._stored_ids), owners, dict(s._kids), dict(s._ghosts), seqs, s._token, s._reserved,
            None if memo is None else (memo.rid, list(memo.hits), memo.cached))


def _run(kw: dict, sched_kw: dict, requests: list[Request], bulk: bool):
    """The replay, its pool's state before every planned step and at the end, and how many
    steps `quiet_pages` ran."""
    engine = SimEngine(overhead_s=0.01, prefill_token_s=1e-4, decode_token_s=1e-4, kv_read_token_s=1e-6)
    st = PagedStrategy(**kw)
    sched = Scheduler(st, **sched_kw)
    calls = kvbench.quiet._calls(sched)
    ran = [0]
    if bulk:
        def counted(*a):
            got = st.quiet_pages(*a)
            ran[0] += got[0] if got is not None else 0
            return got
        sched.quiet_calls = calls[:5] + (counted,)
    else:
        sched.quiet_calls = calls[:5] + (None,)
    states = []
    step = engine.step
    engine.step = lambda batch: states.append(_state(st)) or step(batch)
    result = replay(requests, sched, engine, progress=False)
    st.check_invariants()
    states.append(_state(st))
    return result.recorder.timeline(), result.recorder.requests(), states, ran[0]


CASES = {  # strategy options, scheduler options
    "lru-evicts": (dict(capacity_tokens=1600, page_size=16), dict(max_num_seqs=12, max_num_batched_tokens=512)),
    "lru-ps4": (dict(capacity_tokens=600, page_size=4), dict(max_num_seqs=20, max_num_batched_tokens=256)),
    "lru-ps1": (dict(capacity_tokens=300, page_size=1), dict(max_num_seqs=6, max_num_batched_tokens=128)),
    "lru-seq-cap": (dict(capacity_tokens=4000, page_size=8), dict(max_num_seqs=5, max_num_batched_tokens=4096)),
    "nocache": (dict(capacity_tokens=1600, page_size=16, prefix_caching=False),
                dict(max_num_seqs=12, max_num_batched_tokens=512)),
    "nocache-ps2": (dict(capacity_tokens=500, page_size=2, prefix_caching=False),
                    dict(max_num_seqs=30, max_num_batched_tokens=256)),
    "admission": (dict(capacity_tokens=1600, page_size=16, cache_outputs=False, min_cache_len=20),
                  dict(max_num_seqs=12, max_num_batched_tokens=512)),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_quiet_pages_leave_the_pool_as_per_taker_grows(case, seed):
    kw, sched_kw = CASES[case]
    requests = _requests(70, seed)
    t0, r0, s0, _ = _run({**kw, "max_model_len": 512}, sched_kw, requests, bulk=False)
    t1, r1, s1, ran = _run({**kw, "max_model_len": 512}, sched_kw, requests, bulk=True)
    assert ran > 0  # (the bulk path ran)
    assert len(s1) == len(s0)
    for i, (a, b) in enumerate(zip(s0, s1)):
        assert a == b, f"pool differs before planned step {i}"
    assert t1.equals(t0) and r1.equals(r0)


def test_quiet_pages_leave_other_policies_and_scheduled_visibility_to_grow():
    for kw in (dict(eviction="fifo"), dict(prefix_visibility="scheduled")):
        st = PagedStrategy(320, 512, page_size=16, **kw)
        assert st.admit(0, np.arange(40, dtype=np.int32), 60, 40, 40).admitted
        pages_at = {8: [0]}  # (position 48 in step 8: a page start)
        assert st.quiet_pages([0], [40], [40], pages_at, 8, 9, False, 1, 0, [[] for _ in range(6)], []) is None
        assert pages_at == {8: [0]} and st._seqs[0].length == 40
