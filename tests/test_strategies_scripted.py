"""Scripted scenarios with exact expectations: which pages, which eviction order, which bytes."""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.strategies import paged as paged_mod
from kvbench.strategies.base import SlotStates
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy
from kvbench.strategies.slab import SlabStrategy


def ids(*ranges: tuple[int, int]) -> np.ndarray:
    return np.concatenate([np.arange(a, b, dtype=np.int32) for a, b in ranges])


# ---- paged ----------------------------------------------------------------------------------
def test_paged_pages_come_from_the_free_list_in_order_and_states_are_exact():
    s = PagedStrategy(capacity_tokens=8 * 4, max_model_len=64, page_size=4)
    a = ids((0, 10), (900, 905))  # prompt 10, output 5 → kv_len 14
    assert s.admit(0, a, kv_len=14, num_prompt=10, max_new=64) == (True, 0)
    assert s.page_table(0).tolist() == [0, 1, 2]
    # 10 tokens in 3 pages (12 slots): 2 tail slots will be written (kv_len 14 > 12) → reserved
    assert s.slot_states(None) == SlotStates(token=10, reserved=2, internal=0, external=0, cached=0, free=20)
    assert s.grow(0, 1) and s.grow(0, 1) and s.grow(0, 1)
    assert s.page_table(0).tolist() == [0, 1, 2, 3]
    # 13 tokens, 16 slots, final length 14: 1 reserved, 2 never written (internal)
    assert s.slot_states(None) == SlotStates(token=13, reserved=1, internal=2, external=0, cached=0, free=16)
    s.check_invariants()


def test_paged_prefix_hit_shares_full_pages_and_lru_evicts_tail_pages_first():
    s = PagedStrategy(capacity_tokens=6 * 4, max_model_len=64, page_size=4)
    a = ids((0, 10), (900, 902))
    s.admit(0, a, 11, 10, 64)  # pages 0, 1, 2
    s.grow(0, 1)  # pages 0 and 1 are full and computed → hashed
    s.release(0)  # 0, 1 cached (tail first into the LRU: 1 is older than 0); 2 freed
    assert s.slot_states(None) == SlotStates(0, 0, 0, 0, cached=8, free=16)
    b = ids((0, 8), (500, 503), (901, 902))  # shares the first 8 ids = 2 pages
    adm = s.admit(1, b, 11, 11, 64)
    assert adm == (True, 8)
    assert s.page_table(1).tolist() == [0, 1, 2]  # hits 0, 1; then the free stack gives 2
    s.release(1)  # page 2 of b holds 500.. (partial: not hashed) → free; 0, 1 cached again
    c = ids((100, 124))  # no hit; needs 6 pages: 4 free (2, 3, 4, 5) then evicts LRU: 1 before 0
    assert s.admit(2, c, 23, 23, 64) == (True, 0)
    assert s.page_table(2).tolist() == [2, 3, 4, 5, 1, 0]
    assert s.slot_states(None).cached == 0
    s.check_invariants()


def test_paged_hash_hit_is_verified_against_the_stored_ids(monkeypatch):
    monkeypatch.setattr(paged_mod, "page_hash", lambda parent, ids: 42)  # every page collides
    s = PagedStrategy(capacity_tokens=64, max_model_len=64, page_size=4)
    s.admit(0, ids((0, 10)), 9, 8, 64)
    s.grow(0, 1)
    assert s.admit(1, ids((50, 60)), 9, 8, 64).cached_tokens == 0  # same hash, other ids: no hit
    s.check_invariants()


def test_paged_fork_shares_pages_and_copies_the_partial_page_on_write():
    s = PagedStrategy(capacity_tokens=64, max_model_len=64, page_size=4)
    a = ids((0, 20))
    s.admit(0, a, 19, 6, 64)  # pages 0, 1 (6 tokens)
    assert s.fork(0, 1, a.copy(), 19)
    assert s.page_table(1).tolist() == [0, 1]
    assert s.slot_states(None).token == 6  # shared, counted once
    assert s.grow(1, 1)  # writes into shared page 1 → copy to page 2 first
    assert s.take_copies() == [(1, 2)]
    assert s.page_table(1).tolist() == [0, 2] and s.page_table(0).tolist() == [0, 1]
    assert s.slot_states(None).token == 6 + 3  # page 2 holds a copy of 2 ids plus the new one
    s.check_invariants()


# ---- slab -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reservation, expect", [("max", 64), ("pow2", 16), ("oracle", 11)])
def test_slab_reservation_sizes(reservation, expect):
    s = SlabStrategy(capacity_tokens=128, max_model_len=64, reservation=reservation)
    s.admit(0, ids((0, 12)), kv_len=11, num_prompt=8, max_new=64)
    assert s.slot_states(None) == SlotStates(token=8, reserved=3, internal=expect - 11, external=0,
                                             cached=0, free=128 - expect)


def _holes(placement: str) -> SlabStrategy:
    """Pool of 100 slots: [a:30][hole 20][c:10][hole 10][e:30] after releasing b and d."""
    s = SlabStrategy(capacity_tokens=100, max_model_len=64, reservation="oracle", placement=placement)
    for rid, n in enumerate([30, 20, 10, 10, 30]):
        assert s.admit(rid, ids((0, n + 1)), n, n, 64).admitted
    s.release(1)
    s.release(3)
    s.check_invariants()
    return s


def test_slab_first_fit_takes_the_lowest_hole_best_fit_the_tightest():
    first, best = _holes("first_fit"), _holes("best_fit")
    first.admit(9, ids((0, 9)), 8, 8, 64)
    best.admit(9, ids((0, 9)), 8, 8, 64)
    assert first.page_table(9)[0] == 30  # the 20-slot hole at 30
    assert best.page_table(9)[0] == 60  # the 10-slot hole at 60


def test_slab_external_fragmentation_is_free_space_too_small_for_the_waiting_request():
    s = _holes("first_fit")
    # holes of 20 and 10: a waiting request needing 15 cannot use the 10-slot hole
    assert s.slot_states(15) == SlotStates(token=70, reserved=0, internal=0, external=10, cached=0, free=20)
    # needing 25: neither hole serves it, all 30 free slots are external fragmentation
    assert s.slot_states(25).external == 30
    assert not s.admit(7, ids((0, 26)), 25, 25, 64).admitted
    s.release(2)  # the holes merge: 20 + 10 + 10 = 40 consecutive slots at 30
    s.check_invariants()
    assert s.slot_states(25).external == 0
    assert s.admit(7, ids((0, 26)), 25, 25, 64).admitted and s.page_table(7)[0] == 30


def test_slab_max_that_cannot_fit_one_request_is_a_config_error():
    with pytest.raises(ValueError, match="raise kv_capacity_tokens or lower max_model_len"):
        SlabStrategy(capacity_tokens=1000, max_model_len=2048, reservation="max")


# ---- radix ----------------------------------------------------------------------------------
def test_radix_match_splits_a_node_and_locks_the_matched_path():
    s = RadixStrategy(capacity_tokens=64, max_model_len=64)
    a = ids((0, 10), (90, 93))
    s.admit(0, a, 12, 10, 64)
    assert s.page_table(0).tolist() == list(range(10))
    s.grow(0, 1)  # prompt computed → inserted into the tree: [0..9]
    s.release(0)  # output token 90 at position 10 is inserted too: one leaf [0..10]
    assert s.slot_states(None).cached == 11
    b = ids((0, 6), (50, 55))  # shares 6 ids with a: the leaf is split at 6
    assert s.admit(1, b, 11, 11, 64) == (True, 6)
    assert s.page_table(1).tolist()[:6] == [0, 1, 2, 3, 4, 5]
    assert [len(n.key) for n in s.root.children.values()] == [6]
    assert s.slot_states(None).cached == 5  # the unlocked lower part [6..10] stays evictable
    s.check_invariants()


def test_radix_evicts_unlocked_leaves_least_recently_used_first():
    s = RadixStrategy(capacity_tokens=30, max_model_len=64)
    for rid, base in enumerate([100, 200, 300]):  # three unrelated 8-token requests
        s.admit(rid, ids((base, base + 9)), 8, 8, 64)
    s.release(1), s.release(0), s.release(2)  # LRU order now: 1, 0, 2
    assert s.slot_states(None).cached == 24
    s.admit(9, ids((200, 208), (7, 8)), 9, 9, 64)  # hits request 1's 8 ids: locks that leaf
    assert s.evict(1) == 8  # the oldest unlocked leaf is request 0's (request 1's is locked)
    assert [int(n.key[0]) for n in s.root.children.values()] == [200, 300]
    assert s.evict(100) == 8 and s.evict(100) == 0  # then request 2's; request 1's stays locked
    s.check_invariants()


def test_radix_deduplicates_a_prefix_two_requests_computed_at_once():
    s = RadixStrategy(capacity_tokens=64, max_model_len=64)
    p = ids((0, 14))
    s.admit(0, p, 13, 12, 64)  # both admitted before either prompt is in the tree
    s.admit(1, p.copy(), 13, 12, 64)
    assert s.slot_states(None).token == 24
    s.grow(0, 1), s.grow(1, 1)  # both insert their prompt: the second finds it there
    assert s.page_table(1).tolist()[:12] == s.page_table(0).tolist()[:12] == list(range(12))
    assert s.slot_states(None) == SlotStates(token=12 + 2, reserved=0, internal=0, external=0,
                                             cached=0, free=64 - 14)
    s.check_invariants()


def test_radix_page_size_4_caches_whole_pages_only():
    s = RadixStrategy(capacity_tokens=64, max_model_len=64, page_size=4)
    s.admit(0, ids((0, 12)), 11, 10, 64)  # 10 tokens: pages 0, 1 full, page 2 half
    s.grow(0, 1)
    s.release(0)  # 11 positions: 8 cached in the tree (2 pages), page 2 freed
    assert s.slot_states(None).cached == 8 and s.slot_states(None).free == 56
    assert s.admit(1, ids((0, 9), (60, 64)), 12, 12, 64).cached_tokens == 8
    s.check_invariants()
