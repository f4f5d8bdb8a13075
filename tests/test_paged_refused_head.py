"""paged with prefix caching: a quiet run behind a refused waiting request goes on through
page-taking steps, evicting ones too, where `PagedStrategy.quiet_pages` shows that the refusal
lasts (its `head` guard: no victim is one of the head's cached hits, no taker registers the page
its match missed first; kvbench.quiet.head_need 2). Compared with stepping every step (no
fast-forward): the pool (page ids, free stack, LRU order, hash table, lazy owners, the waiting
match) and the scheduler's decisions (planned rows, admitted, preempted, queue) after every step
the fast path plans, at the same step of stepping, and the same tables. Overloaded, Mooncake-like
load: long prompts that share prefixes (and follow-up turns that extend an earlier prompt and
its output), a pool smaller than the working set, a queue that waits."""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.engines.sim import SimEngine
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler
from kvbench.strategies.eviction.base import POLICIES
from kvbench.strategies.paged import PagedStrategy
from tests.test_paged_quiet import _state


def _requests(n: int, seed: int, ps: int) -> list[Request]:
    """n requests in bursts: long prompts, most on one of 5 shared heads (tens of pages), some a
    follow-up turn (an earlier request's prompt and output, then a few new ids)."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(0, 30000, int(rng.integers(4, 40)) * ps, dtype=np.int32) for _ in range(5)]
    out, t = [], 0.0
    for i in range(n):
        t += float(rng.exponential(0.05)) if i % 5 else 0.4
        own = rng.integers(0, 30000, int(rng.integers(1, 30)) * ps + int(rng.integers(0, ps)), dtype=np.int32)
        if i >= 3 and i % 4 == 1:  # a follow-up turn
            prev = out[int(rng.integers(max(0, i - 8), i))]
            prompt = np.concatenate([prev.tokens, own[:int(rng.integers(1, 3 * ps))]])
        elif i % 6:
            prompt = np.concatenate([heads[int(rng.integers(0, 5))], own])
        else:
            prompt = own
        output = rng.integers(0, 30000, int(rng.integers(5, 160)), dtype=np.int32)
        out.append(Request(i, t, prompt, output))
    return out


def _run(kw: dict, sched_kw: dict, requests: list[Request], fast: bool, guard: bool = True):
    """The replay; after every `schedule`: (the requests' progress before it, the pool and the
    scheduler's decisions after it); the pool's steps run under the guard with evictions."""
    engine = SimEngine(overhead_s=0.01, prefill_token_s=1e-4, decode_token_s=1e-4, kv_read_token_s=1e-6,
                       fast_forward=fast, kv_bytes_per_token=1024)
    st = PagedStrategy(**kw)
    if not guard:
        st.__class__ = type("Unguarded", (PagedStrategy,), {"guards_refusal": False})
    sched = Scheduler(st, **sched_kw)
    plans = []
    plan = sched.schedule

    def schedule():
        key = tuple((s.id, s.computed, s.emitted) for s in (*sched.running, *sched.waiting))
        planned = plan()
        plans.append((key, (_state(st), [(s.id, n) for s, n in planned], [r.id for r, _ in sched._admitted],
                            list(sched._preempted), [s.id for s in sched.waiting], [s.id for s in sched.running])))
        return planned
    sched.schedule = schedule
    evicted = [0]
    quiet = st.quiet_pages

    def counted(*a, **k):
        n = st._lru.n if st._page_lru else len(st._lru)
        got = quiet(*a, **k)
        if got is not None and (a[11] if len(a) > 11 else k.get("head")) is not None:
            evicted[0] += n - (st._lru.n if st._page_lru else len(st._lru))
        return got
    st.quiet_pages = counted
    result = replay(requests, sched, engine, progress=False)
    st.check_invariants()
    return result.recorder.timeline(), result.recorder.requests(), plans, evicted[0]


def _compare(kw, sched_kw, requests, check_guard: bool):
    t0, r0, p0, _ = _run(kw, sched_kw, requests, fast=False)
    t1, r1, p1, evicted = _run(kw, sched_kw, requests, fast=True)
    assert t1.equals(t0) and r1.equals(r0)
    steps = {key: i for i, (key, _) in enumerate(p0)}
    assert len(steps) == len(p0)  # (each step's progress key is its own)
    last = -1
    for key, got in p1:  # every step the fast path plans is a step of stepping, in order, with equal results
        i = steps[key]
        assert i > last
        last = i
        assert got == p0[i][1], f"pool or decisions differ after planned step {i}"
    if check_guard:
        assert evicted > 0  # (the guard let runs evict)
        _, _, p2, _ = _run(kw, sched_kw, requests, fast=True, guard=False)
        assert len(p1) < len(p2)  # (fewer planned steps than stopping before every take)
    return len(p0), len(p1)


CASES = {  # strategy options, scheduler options
    "ps16": (dict(capacity_tokens=6400, page_size=16), dict(max_num_seqs=16, max_num_batched_tokens=1024)),
    "ps16-small-budget": (dict(capacity_tokens=4800, page_size=16), dict(max_num_seqs=16, max_num_batched_tokens=256)),
    "ps4": (dict(capacity_tokens=1600, page_size=4), dict(max_num_seqs=12, max_num_batched_tokens=512)),
    "ps1": (dict(capacity_tokens=500, page_size=1), dict(max_num_seqs=8, max_num_batched_tokens=128)),
    "admission": (dict(capacity_tokens=6400, page_size=16, cache_outputs=False, min_cache_len=64),
                  dict(max_num_seqs=16, max_num_batched_tokens=1024)),
    "lpm-urgent": (dict(capacity_tokens=6400, page_size=16),
                   dict(max_num_seqs=16, max_num_batched_tokens=1024, policy="lpm", max_wait_steps=4)),
    "dedup": (dict(capacity_tokens=6400, page_size=16),
              dict(max_num_seqs=16, max_num_batched_tokens=1024, dedup_prefix=True, max_wait_steps=8)),
    "recompute-swap": (dict(capacity_tokens=6400, page_size=16),
                       dict(max_num_seqs=16, max_num_batched_tokens=1024, preemption="swap")),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_guarded_runs_equal_stepping(case, seed):
    kw, sched_kw = CASES[case]
    ps = kw["page_size"]
    requests = _requests(60, seed, max(ps, 4))
    _compare({**kw, "max_model_len": 4096}, sched_kw, requests, check_guard=case != "lpm-urgent")


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"lru", "belady"}))
def test_other_policies_stop_before_takes_as_before(policy):
    # the guard is plain LRU's (its victims are the LRU's first live entries); the other policies
    # keep stopping before a page-taking step behind a refused head: still equal to stepping
    kw, sched_kw = CASES["ps16"]
    assert not PagedStrategy(6400, 4096, eviction=policy).guards_refusal
    _compare({**kw, "max_model_len": 4096, "eviction": policy}, sched_kw, _requests(60, 0, 16), check_guard=False)


def test_cut_refused_is_admissions_decision():
    # the guard's answers against admission itself: before each page a running request takes
    # (free pages first, then the LRU's victims), `_safe_victims` / `_cut_refused` say whether the
    # waiting head is still refused after the take; after it `still_refused` says so, and a copy
    # of the pool then admits it or not.
    # Prefixes computed twice in one step (X and Y admitted together: Y's copy of P0 stays
    # unhashed) leave the head's hits in the LRU out of their order, so that one eviction may cut
    # many cached hits and let it in (a flip), besides the tail-first cuts that keep it out.
    import copy
    rng = np.random.default_rng(7)
    flips = kept = cuts = 0
    for trial in range(300):
        ps = 4
        st = PagedStrategy(ps * int(rng.integers(40, 70)), 4096, page_size=ps)
        rnd = lambda n: rng.integers(0, 30000, n, dtype=np.int32)  # noqa: E731
        p0, p1 = rnd(ps * int(rng.integers(2, 6))), rnd(ps * int(rng.integers(3, 9)))
        x = np.concatenate([p0, rnd(ps * int(rng.integers(0, 3)) + 1)])
        y = np.concatenate([p0, p1, rnd(int(rng.integers(1, 2 * ps)))])
        for rid, tok in ((0, x), (1, y)):  # admitted in one step: both compute p0
            full = np.concatenate([tok, rnd(2)])
            assert st.admit(rid, full, len(full), len(tok), len(tok)).admitted
        for rid in rng.permutation(2):
            st.grow(int(rid), 1)  # (registers their full pages)
        for rid in rng.permutation(2):
            st.release(int(rid))
        if trial % 2:  # a request that hits x's cached pages and runs (its hits leave stale LRU entries)
            w = np.concatenate([x[:len(x) // ps * ps], rnd(3)])
            assert st.admit(3, w, len(w), len(w) - 1, len(w)).admitted
        z = rnd(4000)
        free = len(st._free) + st._fresh
        assert st.admit(9, z, 4000, free * ps, free * ps).admitted  # (takes every free page: the rest is cached)
        head = np.concatenate([p0, p1, rnd(ps * int(rng.integers(1, 20))), rnd(1)])  # (its last id: an output)
        budget = ps * int(rng.integers(1, 12))
        if st.admit(5, head, len(head), len(head) - 1, budget).admitted:
            continue
        while st._lru.n:
            memo = st._hit_memo
            e = 1 - len(st._free) - st._fresh
            safe, sure = st._safe_victims(memo, 1 << 20)
            order, hit = list(st._lru), set(memo.hits)  # (the victims in order; the match's hits)
            assert sure and not hit.intersection(order[:safe])
            assert (safe < len(order) and order[safe] in hit) or (safe == 1 << 62 and not hit.intersection(order))
            refused = True
            if e > 0 and e > safe:
                cuts += 1
                refused = st._cut_refused(memo, e, 1, len(head) - 1, budget) is not None
            n = -st._seqs[9].length % ps or ps
            assert st.grow(9, n)  # (its next page's first position: one take)
            assert copy.deepcopy(st).still_refused(5, head, len(head) - 1, budget) == refused
            probe = copy.deepcopy(st)
            assert probe.admit(5, head, len(head), len(head) - 1, budget).admitted != refused
            if not refused:
                flips += 1
                break
            kept += 1
            st.admit(5, head, len(head), len(head) - 1, budget)  # (the refused retry: the memo as stepping keeps it)
        st.check_invariants()
    assert flips and kept and cuts > flips
