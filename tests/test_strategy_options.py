"""Strategy options and the kept match of a waiting request, with exact expectations.

- prefix_visibility (paged, radix): computed (default) vs scheduled (vLLM: hittable in the step
  that schedules the page).
- dedup_touch (paged): a freed duplicate moves the cached original to most recent.
- The match of a request that waits for memory is computed once and kept exact through
  evictions, splits and insertions: a retry probes only past its last hit.
- Pools are sized lazily: page ids still come 0, 1, 2, … and a huge pool costs nothing up front.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.strategies import paged as paged_mod
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy


def ids(*ranges: tuple[int, int]) -> np.ndarray:
    return np.concatenate([np.arange(a, b, dtype=np.int32) for a, b in ranges])


class _CountingDict(dict):
    """The paged hash table, counting look-ups (the work a prefix match does per page)."""

    gets = 0

    def get(self, key, default=None):
        self.gets += 1
        return super().get(key, default)


# ---- prefix_visibility ------------------------------------------------------------------------
@pytest.mark.parametrize("visibility, cached, table", [("computed", 0, [3, 4, 5]), ("scheduled", 8, [0, 1, 3])])
def test_paged_visibility_same_step(visibility, cached, table):
    """b is admitted in the step that computes a's prompt: it hits a's two full pages only when
    pages are visible once scheduled."""
    s = PagedStrategy(capacity_tokens=8 * 4, max_model_len=64, page_size=4, prefix_visibility=visibility)
    assert s.admit(0, ids((0, 10), (900, 902)), kv_len=11, num_prompt=10, max_new=64) == (True, 0)
    assert s.admit(1, ids((0, 8), (500, 503)), kv_len=11, num_prompt=11, max_new=64) == (True, cached)
    assert s.page_table(1).tolist() == table
    s.check_invariants()


@pytest.mark.parametrize("visibility, cached", [("computed", 0), ("scheduled", 4)])
def test_paged_scheduled_visibility_covers_only_the_scheduled_chunk(visibility, cached):
    s = PagedStrategy(capacity_tokens=8 * 4, max_model_len=64, page_size=4, prefix_visibility=visibility)
    s.admit(0, ids((0, 10), (900, 902)), kv_len=11, num_prompt=10, max_new=6)  # chunk of 6: page 0 full
    assert s.admit(1, ids((0, 8), (500, 503)), kv_len=11, num_prompt=11, max_new=64).cached_tokens == cached
    s.check_invariants()


@pytest.mark.parametrize("visibility, chunk, cached", [("computed", 64, 0), ("scheduled", 64, 8),
                                                       ("scheduled", 4, 4)])
def test_radix_visibility_same_step(visibility, chunk, cached):
    s = RadixStrategy(capacity_tokens=64, max_model_len=64, page_size=1, prefix_visibility=visibility)
    s.admit(0, ids((0, 10), (900, 905)), kv_len=14, num_prompt=10, max_new=chunk)
    assert s.admit(1, ids((0, 8), (500, 505)), kv_len=12, num_prompt=12, max_new=64).cached_tokens == cached
    s.check_invariants()


def test_radix_scheduled_visibility_inserts_no_output():
    """Decode positions reach the tree at release, as with computed visibility."""
    s = RadixStrategy(capacity_tokens=64, max_model_len=64, page_size=1, prefix_visibility="scheduled")
    a = ids((0, 4), (900, 904))
    s.admit(0, a, kv_len=7, num_prompt=4, max_new=64)
    assert s.grow(0, 1) and s.grow(0, 1)
    assert s.slot_states(None).token == 6
    assert s.admit(1, a.copy(), kv_len=7, num_prompt=7, max_new=64).cached_tokens == 4  # the prompt only
    s.release(0)
    s.release(1)
    s.check_invariants()


@pytest.mark.parametrize("cls", [PagedStrategy, RadixStrategy])
def test_bad_visibility_is_refused(cls):
    with pytest.raises(ValueError, match="prefix_visibility must be computed or scheduled, got 'eager'"):
        cls(capacity_tokens=64, max_model_len=64, prefix_visibility="eager")


def test_labels_name_the_non_default_options():
    assert PagedStrategy(64, 64).label == "paged-16"
    assert PagedStrategy(64, 64, prefix_visibility="scheduled", dedup_touch=True).label == "paged-16-sched-touch"
    assert RadixStrategy(64, 64).label == "radix-1"
    assert RadixStrategy(64, 64, prefix_visibility="scheduled").label == "radix-1-sched"


# ---- dedup_touch -------------------------------------------------------------------------------
@pytest.mark.parametrize("touch, evicted_first, hit", [(False, [1, 0], 0), (True, [6, 4], 8)])
def test_paged_dedup_touch_moves_the_original_to_most_recent(touch, evicted_first, hit):
    """a and b compute the same 8-token prompt in one step: b's two pages are duplicates, freed
    when b leaves. Without the touch a's originals keep their place (older than c's pages); with
    it they move to most recent, so an eviction takes c's pages and a's prompt stays hittable."""
    s = PagedStrategy(capacity_tokens=10 * 4, max_model_len=64, page_size=4, dedup_touch=touch)
    prompt = ids((0, 8))
    s.admit(0, np.append(prompt, 900).astype(np.int32), 9, 8, 64)  # pages 0, 1
    s.admit(1, np.append(prompt, 901).astype(np.int32), 9, 8, 64)  # pages 2, 3: not hits (computed)
    assert s.grow(0, 1) and s.grow(1, 1)  # a's 0, 1 hashed; b's 2, 3 hold the same ids: not hashed
    assert s.page_table(1).tolist() == [2, 3, 5]
    s.release(0)  # LRU: 1, 0
    s.admit(2, ids((100, 109)), 9, 8, 64)
    assert s.page_table(2).tolist() == [4, 6]
    s.grow(2, 1)
    s.release(2)  # LRU: 1, 0, 6, 4
    s.release(1)  # frees 5, 3, 2; touch: 1 then 0 to most recent → LRU 6, 4, 1, 0
    s.check_invariants()
    s.admit(3, ids((200, 232)), 32, 32, 64)  # 8 pages: free 2, 3, 5, 7, fresh 8, 9, then 2 evicted
    assert s.page_table(3).tolist() == [2, 3, 5, 7, 8, 9, *evicted_first]
    s.release(3)
    assert s.admit(4, np.append(prompt, 902).astype(np.int32), 9, 9, 64).cached_tokens == hit
    s.check_invariants()


def test_paged_dedup_touch_skips_an_original_in_use():
    """The original is held by a running request: nothing moves (its recency is set at its release)."""
    s = PagedStrategy(capacity_tokens=10 * 4, max_model_len=64, page_size=4, dedup_touch=True)
    prompt = ids((0, 8))
    s.admit(0, np.append(prompt, 900).astype(np.int32), 9, 8, 64)
    s.admit(1, np.append(prompt, 901).astype(np.int32), 9, 8, 64)
    assert s.grow(0, 1) and s.grow(1, 1)
    s.release(1)  # a still holds 0, 1: b's duplicates 2, 3 are just freed
    assert s.slot_states(None).cached == 0
    s.release(0)
    assert s.admit(2, ids((300, 340)), 40, 40, 64)  # all 10 pages: free first, then 1, 0 evicted
    assert s.page_table(2).tolist()[-2:] == [1, 0]
    s.check_invariants()


# ---- the kept match of a waiting request ------------------------------------------------------
def test_paged_retry_probes_only_past_its_last_hit():
    s = PagedStrategy(capacity_tokens=10 * 4, max_model_len=64, page_size=4)
    s._table = table = _CountingDict()
    s._lazy = False  # every page hashed (lazy registration's retries: tests/test_paged_lazy.py)
    s.admit(0, ids((0, 16), (900, 901)), kv_len=17, num_prompt=16, max_new=8)  # pages 0, 1
    assert s.grow(0, 8)  # pages 0, 1 hashed (computed); 2, 3 taken
    s.admit(1, ids((300, 324)), kv_len=24, num_prompt=24, max_new=64)  # pages 4..9: the pool is full
    h = ids((0, 16), (500, 516))

    table.gets = 0
    assert s.admit(2, h, 32, 32, 64) == (False, 0) and table.gets == 3  # hits 0, 1; page 2 misses
    table.gets = 0
    assert s.admit(2, h, 32, 32, 64) == (False, 0) and table.gets == 1  # the retry probes page 2 only
    s.release(0)  # a's four full pages are cached: LRU 3, 2, 1, 0
    table.gets = 0
    assert s.admit(2, h, 32, 32, 64) == (False, 0) and table.gets == 3  # hits 2, 3 too; page 4 misses
    s.check_invariants()
    assert s.evict(4) == 4  # page 3, least recent: the kept match is cut to 0, 1, 2
    s.check_invariants()
    table.gets = 0
    assert s.admit(2, h, 32, 32, 64) == (False, 0) and table.gets == 1
    s.release(1)  # b's 6 pages join the LRU: room for the 5 pages h needs past its 3 hits
    assert s.admit(2, h, 32, 32, 64) == (True, 12)
    assert s.page_table(2).tolist() == [0, 1, 2, 3, 9, 8, 7, 6]
    s.check_invariants()


def test_paged_kept_match_hashes_each_page_once(monkeypatch):
    calls = []
    real = paged_mod.page_hash
    monkeypatch.setattr(paged_mod, "page_hash", lambda parent, b: calls.append(1) or real(parent, b))
    s = PagedStrategy(capacity_tokens=4 * 4, max_model_len=64, page_size=4)
    s.admit(0, ids((0, 16)), kv_len=16, num_prompt=16, max_new=64)  # the pool is full
    calls.clear()
    h = ids((100, 120))  # (the scheduler passes the same array on every retry)
    for _ in range(5):
        assert not s.admit(1, h, kv_len=20, num_prompt=20, max_new=64).admitted
    assert len(calls) == 1  # page 0 misses: hashed once over five attempts


def test_radix_retry_compares_no_ids_again():
    s = RadixStrategy(capacity_tokens=40, max_model_len=64, page_size=1)
    real, compares = s._common, []
    s._common = lambda a, b: compares.append(1) or real(a, b)
    s.admit(0, ids((0, 20), (900, 901)), kv_len=21, num_prompt=20, max_new=64)
    s.release(0)  # tree: [0..20) → [900], all cached
    s.admit(1, ids((300, 319)), kv_len=19, num_prompt=19, max_new=64)  # the free pages are gone
    h = ids((0, 10), (500, 520))
    compares.clear()
    assert not s.admit(2, h, kv_len=30, num_prompt=30, max_new=64).admitted  # 10 cached, 20 more: no room
    assert len(compares) == 1
    compares.clear()
    for _ in range(3):
        assert not s.admit(2, h, kv_len=30, num_prompt=30, max_new=64).admitted
    assert compares == []  # the match ends inside a node: nothing to extend
    s.check_invariants()


def _waiting_behind_a_split(at: int) -> tuple[RadixStrategy, np.ndarray]:
    """h waits with a match ending 10 ids inside node [0..20); then a running request's prompt,
    which shares the node's first `at` ids, goes into the tree and splits the node there."""
    s = RadixStrategy(capacity_tokens=48, max_model_len=64, page_size=1)
    r = ids((0, at), (700, 704))
    s.admit(0, r, kv_len=at + 4, num_prompt=at + 3, max_new=64)  # (the tree is empty: no split yet)
    s.admit(1, ids((0, 20)), kv_len=20, num_prompt=20, max_new=64)
    s.release(1)  # tree: [0..20), cached
    s.admit(2, ids((300, 325 - at)), kv_len=25 - at, num_prompt=25 - at, max_new=64)  # the pool is full
    h = ids((0, 10), (500, 520))
    assert not s.admit(3, h, kv_len=30, num_prompt=30, max_new=64).admitted  # 10 cached, 20 more: no room
    assert s.grow(0, 1)  # r's prompt goes into the tree: [0..at) ── [at..20), and [0..at) ── r's rest
    s.check_invariants()  # (the kept match equals a match from scratch)
    assert not s.admit(3, h, kv_len=30, num_prompt=30, max_new=64).admitted
    s.check_invariants()
    return s, h


@pytest.mark.parametrize("at", [5, 10, 15])  # the split falls before, at, or after the match's end
def test_radix_kept_match_through_a_split(at):
    s, h = _waiting_behind_a_split(at)
    s.release(2)  # room: h is admitted with its 10 ids from cache
    assert s.admit(3, h, kv_len=30, num_prompt=30, max_new=64) == (True, 10)
    assert s.page_table(3)[:min(at, 10)].tolist() == s.page_table(0)[:min(at, 10)].tolist()
    s.check_invariants()


def test_radix_kept_match_through_an_eviction_of_its_last_node():
    s, h = _waiting_behind_a_split(5)
    assert s.evict(15) == 15  # the unlocked leaf [5..20): h's match is cut back to [0..5)
    s.check_invariants()
    assert not s.admit(3, h, kv_len=30, num_prompt=30, max_new=64).admitted
    s.release(2)
    assert s.admit(3, h, kv_len=30, num_prompt=30, max_new=64) == (True, 5)
    s.check_invariants()


def test_radix_kept_match_extends_when_a_prefix_is_inserted():
    s = RadixStrategy(capacity_tokens=32, max_model_len=64, page_size=1)
    s.admit(0, ids((0, 16)), kv_len=16, num_prompt=16, max_new=8)  # a computes its prompt in 2 chunks
    s.admit(1, ids((300, 316)), kv_len=16, num_prompt=16, max_new=64)  # the pool is full
    h = ids((0, 16), (500, 510))
    assert not s.admit(2, h, kv_len=26, num_prompt=26, max_new=64).admitted  # nothing in the tree yet
    assert s.grow(0, 8)  # a's first chunk [0..8) goes into the tree
    assert not s.admit(2, h, kv_len=26, num_prompt=26, max_new=64).admitted
    s.check_invariants()
    s.release(0)  # [8..16) too
    s.release(1)
    assert s.admit(2, h, kv_len=26, num_prompt=26, max_new=64) == (True, 16)
    s.check_invariants()


# ---- lazy pools -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, page_size", [(PagedStrategy, 16), (RadixStrategy, 1)])
def test_a_huge_pool_costs_nothing_before_it_is_used(cls, page_size):
    s = cls(capacity_tokens=10**12, max_model_len=64, page_size=page_size)  # 1e12 slots: no lists of that size
    assert s.slot_states(None).free == s.capacity
    assert s.admit(0, ids((0, 40)), kv_len=40, num_prompt=40, max_new=64).admitted
    assert s.page_table(0).tolist() == list(range(s.pages_for(40)))
    s.release(0)
    s.check_invariants()


@pytest.mark.parametrize("cls, table", [(PagedStrategy, [0, 1, 2, 5, 6]), (RadixStrategy, [2, 1, 0, 5, 6])])
def test_returned_pages_come_back_before_fresh_ones_most_recent_first(cls, table):
    """As from one stack that held every page: returned pages first, the last returned first
    (paged evicts a's cached pages tail first, radix frees a's node in page order), then fresh."""
    s = cls(capacity_tokens=10 * 4, max_model_len=64, page_size=4)
    s.admit(0, ids((0, 12)), kv_len=12, num_prompt=12, max_new=64)  # 0, 1, 2
    s.admit(1, ids((100, 108)), kv_len=8, num_prompt=8, max_new=64)  # 3, 4
    s.release(0)
    s.evict(s.capacity)  # radix/paged may cache a's pages: free them all
    s.admit(2, ids((200, 220)), kv_len=20, num_prompt=20, max_new=64)
    assert s.page_table(2).tolist() == table
    s.check_invariants()
