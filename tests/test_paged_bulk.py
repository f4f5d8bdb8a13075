"""paged's bulk page takes (issue 13) give exactly what one take per page gives.

`PagedStrategy._take_pages(k)` takes k pages in one go (a slice of the free stack, a range of
fresh ids, and, for LRU without a host tier or a waiting match, one loop that pops, unhashes and
takes the LRU's first pages). `_take_page()` is the one-page reference (free stack, then fresh,
then `_evict_one`, the policy's victim). On two copies of the same pool both must give the same
page ids in the same order and leave the same free stack, LRU order, hash table, per-page lists
and waiting match (its hits cut at the first evicted one). Also: the strategy stays within CPython
3.11's 29 shared-key instance attributes (its hot paths' `self.x` reads stay specialized).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from kvbench.strategies.paged import PagedStrategy

PS = 16
PAGES = 34  # 30 handed out by the 6 requests: 4 fresh, 6 free, 24 cached


def _pool(policy: str, seed: int, waiting: bool) -> PagedStrategy:
    """A pool with returned (free) pages, fresh ids and cached pages (in a scrambled LRU order),
    and, if `waiting`, a refused request whose match holds cached pages."""
    rng = np.random.default_rng(seed)
    s = PagedStrategy(PAGES * PS, 1 << 20, page_size=PS, eviction=policy)
    prompts = [rng.integers(0, 1000, 4 * PS + 1, dtype=np.int32) for _ in range(6)]
    for rid, p in enumerate(prompts):  # 6 requests of 5 pages, each 4 full pages hashed at release
        assert s.admit(rid, p, len(p), len(p), len(p)).admitted
    for rid in rng.permutation(6):  # cached in a scrambled order; 6 partial last pages go to the free stack
        s.release(int(rid))
    s.admit(10, prompts[2], len(prompts[2]), len(prompts[2]), len(prompts[2]))  # a hit: revived
    s.release(10)
    if waiting:  # a request that hits prompt 4's pages but needs more than the pool holds
        big = np.concatenate([prompts[4][:4 * PS], rng.integers(0, 1000, PAGES * PS, dtype=np.int32)])
        assert not s.admit(20, big, len(big), len(big), len(big)).admitted
        assert len(s._hit_memo.hits) == 4
    s.check_invariants()
    return s


def _state(s: PagedStrategy):
    memo = s._hit_memo
    # a page registered lazily holds its chain's owner (a request: compared by its chain and count)
    hashes = [h if h is None or isinstance(h, int) else ("owner", h.hashes[-1]) for h in s._marks()]
    owners = {h: (o.ndef, o.hash_at, list(o.pages)) for h, o in s._owners.items()}
    return (list(s._free), s._fresh, list(s._lru), dict(s._table), list(s._ref), list(s._fill), hashes,
            list(s._stored_ids), owners, dict(s._kids), dict(s._ghosts),
            None if memo is None else (list(memo.hits), memo.cached, set(memo.index)))


@pytest.mark.parametrize("policy", ["lru", "fifo", "slru", "arc", "s3fifo"])
@pytest.mark.parametrize("waiting", [False, True])
@pytest.mark.parametrize("k", [1, 2, 7, 10, 11, 12, 20, 34])
def test_bulk_take_equals_single_takes(policy, waiting, k):
    base = _pool(policy, seed=k, waiting=waiting)
    free, fresh, cached = len(base._free), base._fresh, len(base._lru)
    assert free and fresh and cached  # every source of pages is in play
    bulk, single = copy.deepcopy(base), copy.deepcopy(base)
    got = bulk._take_pages(k, PS)
    want = [single._take_page() for _ in range(k)]
    for pid in want:
        single._fill[pid] = PS
    assert got == want
    assert _state(bulk) == _state(single)
    evicted = max(0, k - free - fresh)
    assert len(bulk._lru) == cached - evicted and bulk._fresh == max(0, fresh - max(0, k - free))
    if waiting and evicted:  # the LRU's victims reached prompt 4's pages or not: the match agrees either way
        assert bulk._hit_memo.hits == [p for p in base._hit_memo.hits if p not in got][:len(bulk._hit_memo.hits)]


def test_bulk_eviction_takes_the_lru_front_in_order():
    s = _pool("lru", seed=3, waiting=False)
    order = list(s._lru)
    n = len(s._free) + s._fresh
    got = s._take_pages(n + 5)
    assert got[n:] == order[:5]  # least recently used first
    assert list(s._lru) == order[5:]
    marks = s._marks()  # (a victim registered lazily keeps its owner's mark, a leftover that reads None)
    assert all(marks[p] is None and s._stored_ids[p] is None and s._ref[p] == 1 for p in got)


@pytest.mark.parametrize("seed", range(6))
def test_page_lru_keeps_the_ordered_dict_order(seed):
    """PageLRU (a list with lazy deletion) gives the victims, order and size the OrderedDict LRU
    gives, under inserts, bulk extends, removes, touches, single and bulk takes (paged's use:
    only evictable keys are removed or touched, only others inserted)."""
    from kvbench.strategies.eviction.lru import LRU, PageLRU

    rng = np.random.default_rng(seed)
    ref, fast, out = LRU(), PageLRU(), set(range(40))  # out: keys not evictable
    fast.cut_at = 8  # (cut the list's dead front often)
    for _ in range(3000):
        op = rng.integers(6)
        if op <= 1 and out:  # insert one, or extend by several (paged's release)
            keys = [int(k) for k in rng.permutation(sorted(out))[:1 if op == 0 else rng.integers(1, 6)]]
            for k in keys:
                ref[k] = None
            fast.extend(keys) if op == 1 else fast.insert(keys[0])
            out -= set(keys)
        elif op == 2 and len(ref):  # a hit revives one
            k = int(rng.choice(list(ref)))
            del ref[k], fast[k]
            out.add(k)
        elif op == 3 and len(ref):
            k = int(rng.choice(list(ref)))
            ref.move_to_end(k), fast.touch(k)
        elif op >= 4 and len(ref):  # evict one, or several at once
            n = 1 if op == 4 else int(rng.integers(1, len(ref) + 1))
            want = [ref.popitem(last=False)[0] for _ in range(n)]
            assert (fast.take(n) if n > 1 else [fast.victim()]) == want
            out |= set(want)
        assert len(fast) == len(ref)
    assert list(fast) == list(ref)
    fast.check()


def test_page_lru_stays_small_when_hits_revive_pages_and_nothing_is_evicted():
    """Revived and released again, over and over with no eviction, a key leaves a stale entry
    each time: the list is rebuilt from its live keys, in order, before it grows past about
    twice the evictable keys plus `cut_at`."""
    from kvbench.strategies.eviction.lru import LRU, PageLRU

    rng = np.random.default_rng(7)
    ref, fast = LRU(), PageLRU()
    fast.cut_at = 8
    fast.extend(range(10))
    ref.update((k, None) for k in range(10))
    longest = 0
    for _ in range(500):
        k = int(rng.choice(list(ref)))
        del ref[k], fast[k]  # a hit revives it
        ref[k] = None  # its request lets go of it
        fast.insert(k)
        longest = max(longest, len(fast.q) - fast.head)
        assert len(fast) == len(ref) == 10
    assert longest <= 2 * 10 + 8 + 1
    assert list(fast) == list(ref) and fast.take(10) == list(ref)
    fast.check()



@pytest.mark.parametrize("case,evicted", [("front", 0), ("front", 2), ("front", 5), ("behind", 0), ("split", 0)])
def test_a_returning_requests_hits_leave_the_page_lru_as_one_run(case, evicted):
    """A released request's pages join the LRU in one extend, tail first. When it comes back with
    them all cached, they are one run of the LRU's entries, last hit first, and leave it at once:
    by moving the front where they are its first entries (`front`: nothing before them, or
    evictions stopped inside them), else cut out of the list (`behind` another request's pages);
    where they are not one run (`split`: a shorter request took its first pages out and put them
    back after another request's), each leaves a stale entry. Same page tables, LRU order and
    slot states as the OrderedDict LRU in every case."""
    from kvbench.strategies.eviction.lru import LRU

    rng = np.random.default_rng(evicted)
    a = rng.integers(0, 1000, 8 * PS + 1, dtype=np.int32)  # 8 full pages and one token
    b = rng.integers(0, 1000, 12 * PS, dtype=np.int32)
    pools = [PagedStrategy(15 * PS, 1 << 20, page_size=PS), PagedStrategy(15 * PS, 1 << 20, page_size=PS, eviction=LRU())]
    for s in pools:
        assert s.admit(0, a, len(a), len(a), len(a)).admitted  # pages 0-8
        assert s.admit(1, b, len(b), 4 * PS, 4 * PS).admitted  # pages 9-12; 13, 14 fresh
        if case == "behind":
            s.release(1)  # b's 4 pages cached before a's
        s.release(0)  # a's pages cached tail first (7, 6, .., 0); page 8 free
        if case == "front":
            assert s.grow(1, (3 + evicted) * PS)  # pages 8, 13, 14, then a's last `evicted` pages
            s.release(1)  # b's pages cached after a's
        if case == "split":
            short = a[:4 * PS + 1]
            assert s.admit(3, short, len(short), len(short), len(short)).cached_tokens == 4 * PS  # pages 0-3 out
            s.release(1)  # b's pages after a's 7, 6, 5, 4
            s.release(3)  # then 3, 2, 1, 0
    page_lru, ordered = pools
    assert list(page_lru._lru) == list(ordered._lru)
    for s in pools:
        got = s.admit(2, a, len(a), len(a), len(a))
        assert got.admitted and got.cached_tokens == (8 - evicted) * PS
        s.check_invariants()
    assert page_lru.page_table(2).tolist() == ordered.page_table(2).tolist()
    assert page_lru.page_table(2).tolist()[:8 - evicted] == list(range(8 - evicted))
    assert list(page_lru._lru) == list(ordered._lru)
    assert page_lru.slot_states(None) == ordered.slot_states(None)
    lru = page_lru._lru
    if case == "split":
        assert sorted(lru.dead) == list(range(8))  # a stale entry each
    else:
        assert not lru.dead and lru.q[lru.head:] == list(ordered._lru)  # their entries gone, none stale


@pytest.mark.parametrize("kw", [{}, {"prefix_caching": False},
                                {"host_tier_tokens": 256, "host_tier_eviction": "fifo", "eviction": "lfu",
                                 "cache_outputs": False, "min_cache_len": 4, "prefix_visibility": "scheduled",
                                 "dedup_touch": True, "page_size": 4}])
def test_attributes_stay_in_cpythons_shared_keys(kw):
    """At most 29 instance attributes (CPython 3.11's shared-keys limit: past it the instance dict
    is a plain dict, every `self.x` of grow / _take_pages a lookup and no `self.m()` specialized);
    the options read back as given (they live in `_rare`)."""
    s = PagedStrategy(capacity_tokens=1024, max_model_len=1024, **kw)
    n = len(vars(s))
    assert n <= 29, (f"PagedStrategy has {n} instance attributes: past 29 CPython 3.11 keeps them in a "
                     f"plain dict; keep rarely read ones in _Rare (strategies/_paged_state.py)")
    for key, value in kw.items():
        assert getattr(s, key) == value
    caching = kw.get("prefix_caching", True)
    assert s.caches_prefixes is s.reads_tokens is s.prefix_caching is caching
    assert s.summary()["eviction"] == kw.get("eviction", "lru") and s.label.startswith("paged-")
