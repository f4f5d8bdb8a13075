"""paged's lazy registration (issue 13) answers exactly as registering every page hashed.

A request that registers a page below which nothing is registered owns its chain from there:
its later pages are registered without their hash (`_hash[pid]` is the owner) until another
request hits them or registers below the owner's node (then they are hashed, as they would have
been), or a preempted request comes back and takes them over. Here two copies of a pool see the
same random calls, one with lazy registration (the default) and one that hashes every page at
once (`_lazy = False`, the reference): every answer, page table and slot state must agree, and
after every call the lazy pool's table with its lazily registered pages hashed must equal the
reference's table page for page (same page, same hash, same stored ids). Requests share prefixes
of a few families (hits, duplicates of evicted pages, owners from a first page and from deeper
pages, owners that turn shared while they run or after they left), released requests come back
(take-overs), the pool is small (evictions of pages registered lazily, ghosts), and some
requests are refused (the waiting match)."""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.strategies.paged import _NEVER, _ROOT_HASH, PagedStrategy, _Seq

PS = 4


def virtual(s: PagedStrategy) -> tuple[dict, list, list]:
    """The pool's table, page hashes and stored ids with every page registered lazily hashed
    (what registering it hashed gives). Pure."""
    table, hashes, stored = dict(s._table), s._marks(), list(s._stored_ids)  # (leftover marks read as None)
    for key, o in s._owners.items():
        done = o.cache_pages if o.hash_at == _NEVER else o.hash_at // PS - 1
        data, nb, h = o.tokens.tobytes(), PS * o.tokens.itemsize, _ROOT_HASH
        for i in range(len(o.hashes)):  # its hashed pages' hashes: the chain of its ids
            h = hash((h, data[i * nb:(i + 1) * nb]))
        assert h == key == o.hashes[-1]
        for i in range(len(o.hashes), done):
            ids = data[i * nb:(i + 1) * nb]
            h = hash((h, ids))
            pid = o.pages[i]
            if hashes[pid] is o:
                assert h not in table
                table[h], hashes[pid], stored[pid] = pid, h, ids
    assert not any(isinstance(h, _Seq) for h in hashes)
    return table, hashes, stored


def observe(s: PagedStrategy, live) -> tuple:
    return (virtual(s), s.slot_states(None), list(s._free), s._fresh, list(s._lru), s._true_refs(), list(s._fill),
            {rid: s.page_table(rid).tolist() for rid in live})


def run(seed: int, steps: int, fork: bool = False, ref_opts: dict | None = None, **opts) -> tuple[int, int, int]:
    """Random calls on a lazy and a hashed pool (`ref_opts`: the hashed pool's own options on top);
    returns (hit tokens, most owners at once, most owners at once whose node is not a first page)."""
    rng = np.random.default_rng(seed)
    lazy = PagedStrategy(40 * PS, 1 << 12, page_size=PS, **opts)
    ref = PagedStrategy(40 * PS, 1 << 12, page_size=PS, **{**opts, **(ref_opts or {})})
    ref._lazy = False
    families = [rng.integers(0, 50, 12 * PS, dtype=np.int32) for _ in range(3)]
    live: dict[int, list] = {}  # rid → [tokens, kv_len, length]
    gone: list = []  # released requests' ids (one comes back as a preempted request would)
    waiting = None  # a refused request, retried until admitted (its match kept)
    hits = owned = deep = 0
    for step in range(steps):
        op = rng.random()
        if waiting is not None and op < 0.3 or waiting is None and op < 0.35:
            if waiting is None and gone and rng.random() < 0.2:  # a released request comes back
                tokens, kv_len, length = gone.pop(int(rng.integers(len(gone))))
                waiting = (step, tokens, kv_len, min(length + 1, kv_len), int(rng.integers(1, 40)))
            elif waiting is None:
                rid = step
                if rng.random() < 0.7:  # a family's prefix (whole pages or not), then its own ids
                    fam = families[rng.integers(len(families))]
                    head = fam[:rng.integers(1, len(fam))]
                else:
                    head = np.zeros(0, np.int32)
                tail = rng.integers(0, 50 if rng.random() < 0.2 else 1 << 20, rng.integers(2, 10 * PS), dtype=np.int32)
                tokens = np.concatenate([head, tail]).astype(np.int32)
                prompt = int(rng.integers(1, len(tokens)))
                waiting = (rid, tokens, len(tokens) - 1, prompt, int(rng.integers(1, 40)))
            rid, tokens, kv_len, prompt, budget = waiting
            assert lazy.cached_prefix_len(tokens, prompt) == ref.cached_prefix_len(tokens, prompt)
            a, b = lazy.admit(rid, tokens, kv_len, prompt, budget), ref.admit(rid, tokens, kv_len, prompt, budget)
            assert a == b, (seed, step)
            if a.admitted:
                hits += a.cached_tokens
                live[rid] = [tokens, kv_len, a.cached_tokens + min(budget, prompt - a.cached_tokens)]
                waiting = None
        elif op < 0.75 and live:
            rid = list(live)[rng.integers(len(live))]
            tokens, kv_len, length = live[rid]
            if length < kv_len:
                n = int(rng.integers(1, min(kv_len - length, 2 * PS) + 1))
                ok = lazy.grow(rid, n)
                assert ok == ref.grow(rid, n), (seed, step)
                if ok:
                    live[rid][2] += n
        elif op < 0.95 and live:
            rid = list(live)[rng.integers(len(live))]
            lazy.release(rid)
            ref.release(rid)
            gone.append(live.pop(rid))
        elif fork and live and op < 0.97:
            parent = list(live)[rng.integers(len(live))]
            tokens, kv_len, length = live[parent]
            assert lazy.fork(parent, 10_000 + step, tokens.copy(), kv_len) == ref.fork(parent, 10_000 + step,
                                                                                       tokens.copy(), kv_len)
            live[10_000 + step] = [tokens, kv_len, length]
        else:
            k = int(rng.integers(1, 4)) * PS
            assert lazy.evict(k) == ref.evict(k)
        owned = max(owned, len(lazy._owners))
        deep = max(deep, sum(len(o.hashes) > 1 for o in lazy._owners.values()))
        assert observe(lazy, live) == observe(ref, live), (seed, step)
        if step % 7 == 0:
            lazy.check_invariants()
            ref.check_invariants()
    lazy.check_invariants()
    return hits, owned, deep


@pytest.mark.parametrize("seed", range(16))
def test_lazy_registration_equals_hashing_every_page(seed):
    hits, owned, deep = run(seed, 400)
    assert hits and owned and deep  # hits, and owners of chains from a first page and from deeper pages


@pytest.mark.parametrize("seed", range(4))
def test_lazy_registration_on_the_page_lru_equals_the_ordered_dict_lru(seed):
    """The reference pool on the OrderedDict LRU (an instance: kept as given): the PageLRU's
    bulk paths (victims taken a slice at a time, a returning request's hits taken off its front
    or left as stale entries) give the same victims and order, call by call."""
    from kvbench.strategies.eviction.lru import LRU

    hits, owned, _ = run(300 + seed, 400, ref_opts={"eviction": LRU()})
    assert hits and owned


@pytest.mark.parametrize("opts", [{"prefix_visibility": "scheduled"}, {"cache_outputs": False},
                                  {"min_cache_len": 3 * PS}])
def test_lazy_registration_under_admission_options(opts):
    for seed in range(3):
        run(100 + seed, 300, **opts)


def test_a_fork_hashes_every_owned_chain():
    for seed in range(3):
        run(200 + seed, 300, fork=True)


def test_an_owner_left_with_no_page_registered_lazily_is_forgotten():
    s = PagedStrategy(8 * PS, 64, page_size=PS)
    a = np.arange(3 * PS + 1, dtype=np.int32)
    assert s.admit(0, a, len(a), len(a), 64).admitted
    s.release(0)  # pages 0..2 registered: 0 hashed, 1 and 2 by their owner
    (h0, owner), = s._owners.items()
    assert owner.ndef == 2 and s._hash[s._table[h0]] == h0 and s._hash[1] is owner and s._hash[2] is owner
    b = np.arange(1000, 1000 + 8 * PS, dtype=np.int32)
    assert s.admit(1, b, len(b), len(b) - 1, 64).admitted  # all 8 pages: the 3 cached ones evicted
    assert not s._owners and not s._table
    s.check_invariants()


def test_a_request_that_hits_a_gone_owners_pages_takes_them_over():
    s = PagedStrategy(16 * PS, 64, page_size=PS)
    a = np.arange(3 * PS + 1, dtype=np.int32)
    assert s.admit(0, a, len(a), len(a), 64).admitted
    s.release(0)  # page 0 hashed, 1 and 2 registered by their owner
    assert s.cached_prefix_len(a, len(a)) == 3 * PS  # found through their owner
    owners = dict(s._owners)
    assert owners and s._hash[1] is owners[s._hash[0]]  # (a query changes nothing)
    assert s.admit(1, a, len(a), len(a), 64) == (True, 3 * PS)  # a preempted request back: its pages
    (key, owner), = s._owners.items()
    assert owner is s._seqs[1] and s._hash[1] is owner and s._hash[2] is owner and len(s._table) == 1
    s.check_invariants()


def test_a_hit_on_a_running_owners_pages_hashes_them():
    s = PagedStrategy(16 * PS, 64, page_size=PS)
    a = np.arange(5 * PS, dtype=np.int32)
    assert s.admit(0, a, len(a), 3 * PS + 1, 64).admitted
    assert s.grow(0, 1)  # pages 0..2 registered: 0 hashed, 1 and 2 by their owner, which runs on
    assert s._hash[1] is s._seqs[0]
    assert s.admit(1, a[:3 * PS + 1], 3 * PS + 1, 3 * PS + 1, 64) == (True, 3 * PS)
    assert not s._owners and s._kids == {_ROOT_HASH: 1, s._hash[0]: 1, s._hash[1]: 1}  # the chain 0 → 1 → 2
    assert all(isinstance(s._hash[p], int) for p in (0, 1, 2)) and len(s._table) == 3
    s.check_invariants()
