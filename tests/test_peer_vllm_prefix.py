"""vLLM's prefix-caching expectations (tests/v1/core/test_prefix_caching.py), as kvbench tests of
the paged strategy: exact pages, exact eviction order, reference counts, cache content.

Written from the scenarios of vLLM's tests, driven through kvbench's contract (admit / grow /
release / evict / page_table / slot_states) by the content model's driver, so every call also
checks that each position a request reads holds its own ids. Page ids map to vLLM block ids
minus one: vLLM's block 0 is a null block, kvbench has none.

Deliberate differences, each stated where it shows:
- kvbench makes a page hittable once the step that computes it has run (the request's next
  `grow`, or its `release`); vLLM when it schedules it. Why: the default follows SGLang and does
  not rely on an engine writing a step's K/V before any attention of the same step reads it. The
  tests run that step (`grow(rid, 1)`) where vLLM's would hit at once; with
  `prefix_visibility=scheduled` kvbench does as vLLM, and vLLM's exact numbers come back (the
  tests named "scheduled").
- Free pages: kvbench hands out returned pages (most recent first), then never-used ones, then
  evicts cached pages least recently used first; vLLM's free queue has the same order
  (unhashed blocks prepended, cached blocks appended tail first), so block ids agree.
- A page whose ids another page already caches (recomputed because it could not hit) is freed
  at release; vLLM keeps it as a second cached block, most recently used. Why: two pages of the
  same ids hold memory that no hit can use (SGLang frees such a copy too). With
  `dedup_touch=true` kvbench moves the cached original to most recently used instead, the
  recency vLLM's copy would have.
"""
from __future__ import annotations

import numpy as np

from content_model import Driver
from kvbench.strategies.paged import PagedStrategy

PS = 16


def ids(*parts) -> np.ndarray:
    """Concatenated token ids: each part a list of ids."""
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])


def paged(num_pages: int, **options) -> Driver:
    return Driver(PagedStrategy(capacity_tokens=num_pages * PS, max_model_len=8192, page_size=PS, **options))


def prompt_only(d: Driver, rid: int, tokens: np.ndarray, decode: int = 2):
    """Admit `tokens` as a whole prompt (one step) that will decode `decode` tokens (final
    length = prompt + decode − 1: the last token's K/V is never written)."""
    full = ids(tokens, [0] * decode)
    return d.admit(rid, full, len(tokens) + decode - 1, len(tokens), len(tokens))


def table(d: Driver, rid: int) -> list[int]:
    return d.s.page_table(rid).tolist()


def hand_out_order(d: Driver, num_pages: int) -> list[int]:
    """The next `num_pages` pages the pool gives (free first, then evictions): a request of
    unrelated ids takes them. Mutates."""
    adm = prompt_only(d, 999, np.full(num_pages * PS, 99999, dtype=np.int32), decode=1)
    assert adm == (True, 0)
    return table(d, 999)


COMMON = ids([0] * 16, [1] * 16, [2] * 16)  # 3 full pages


def test_prefill_hits_full_pages_and_frees_partial_pages_first_then_cached_tail_first():
    """vLLM test_prefill (11 blocks: null + 10)."""
    d = paged(10)
    assert prompt_only(d, 0, ids(COMMON, [3] * 7)) == (True, 0)
    assert table(d, 0) == [0, 1, 2, 3]  # vLLM [1, 2, 3, 4]
    d.grow(0, 1)  # its prompt step ran: the 3 full pages are hittable now (vLLM: at once)
    assert prompt_only(d, 1, ids(COMMON, [3] * 5)) == (True, 48)  # full pages only
    assert table(d, 1) == [0, 1, 2, 4]  # vLLM [1, 2, 3] + [5]
    assert d.s.slot_states(None).free == 5 * PS  # vLLM: 5 free blocks
    d.release(0)
    d.release(1)
    assert d.s.slot_states(None).cached == 3 * PS
    # vLLM's free queue [5, 4, 6, 7, 8, 9, 10, 3, 2, 1]: partial pages first (req1's, req0's),
    # never-used pages, then the cached common pages tail first
    probe = paged(10)
    for step in (lambda p: prompt_only(p, 0, ids(COMMON, [3] * 7)), lambda p: p.grow(0, 1),
                 lambda p: prompt_only(p, 1, ids(COMMON, [3] * 5)), lambda p: p.release(0),
                 lambda p: p.release(1)):
        step(probe)
    assert hand_out_order(probe, 10) == [4, 3, 5, 6, 7, 8, 9, 2, 1, 0]
    # a hit on the free (cached) common pages; its own page is the most recently freed: 4
    assert prompt_only(d, 2, ids(COMMON, [3] * 6)) == (True, 48)
    assert table(d, 2) == [0, 1, 2, 4]  # vLLM [1, 2, 3] + [5]
    assert d.s.slot_states(None).free + d.s.slot_states(None).cached == 6 * PS
    d.release(2)
    # a miss of 10 pages: the eviction order is the page table (vLLM [5, 4, 6, ..., 3, 2, 1])
    assert hand_out_order(d, 10) == [4, 3, 5, 6, 7, 8, 9, 2, 1, 0]
    assert d.s.slot_states(None).cached == d.s.slot_states(None).free == 0


def _evict_scenario() -> Driver:
    """vLLM test_evict: request 0 of 5 full pages + 7 ids, request 1 of 3 full pages."""
    d = paged(10)
    prompt_only(d, 0, np.arange(5 * 16 + 7, dtype=np.int32))
    assert table(d, 0) == [0, 1, 2, 3, 4, 5]
    prompt_only(d, 1, np.arange(87, 87 + 48, dtype=np.int32))
    assert table(d, 1) == [6, 7, 8]
    assert d.s.slot_states(None).free == 1 * PS
    return d


def test_evict_frees_a_request_tail_first_and_the_oldest_request_first():
    """vLLM test_evict: free order [6, 10, 5, 4, 3, 2, 1] after request 0, then
    [.., 9, 8, 7] after request 1 (kvbench page = vLLM block − 1)."""
    d = _evict_scenario()
    d.release(0)  # partial page 5 → free (first out); 4..0 cached, tail first
    assert hand_out_order(d, 7) == [5, 9, 4, 3, 2, 1, 0]

    d = _evict_scenario()
    d.release(0)
    d.release(1)
    assert d.s.slot_states(None).free + d.s.slot_states(None).cached == 10 * PS
    assert hand_out_order(d, 10) == [5, 9, 4, 3, 2, 1, 0, 8, 7, 6]

    d = _evict_scenario()
    d.release(0)
    d.release(1)
    # touch the first 2 pages: they are hit, the new page is the first free one (vLLM [6])
    assert prompt_only(d, 2, np.arange(2 * 16 + 3, dtype=np.int32)) == (True, 32)
    assert table(d, 2) == [0, 1, 5]
    assert (d.s.slot_states(None).free + d.s.slot_states(None).cached) // PS == 7


def test_a_hit_moves_pages_to_most_recently_used():
    """vLLM test_computed_blocks_not_evicted, and the LRU order after a hit: pages a hit revives
    are evicted after every page that was not hit."""
    d = paged(2)  # vLLM: 3 blocks (null + 2)
    prompt_only(d, 0, np.arange(16, dtype=np.int32), decode=1)
    prompt_only(d, 1, np.arange(16, 32, dtype=np.int32))
    assert (table(d, 0), table(d, 1)) == ([0], [1])
    d.release(0)
    d.release(1)  # LRU: 0, then 1
    # request 2 hits page 0 and needs one more page: the LRU page 0 is not evicted, page 1 is
    assert prompt_only(d, 2, np.arange(32, dtype=np.int32)) == (True, 16)
    assert table(d, 2) == [0, 1]

    d = paged(4)
    a, b = np.arange(32, dtype=np.int32), np.arange(100, 132, dtype=np.int32)
    prompt_only(d, 0, a)
    prompt_only(d, 1, b)
    d.release(0)
    d.release(1)  # LRU (oldest first): 1, 0 (request 0, tail first), 3, 2 (request 1)
    assert prompt_only(d, 2, ids(a[:16], [7] * 3)) == (True, 16)  # hits page 0
    d.release(2)  # page 0 is most recent now; 2's own page goes to the free stack
    assert hand_out_order(d, 4) == [1, 3, 2, 0]  # vLLM: the touched block last


def test_a_reused_page_has_its_hash_cleared():
    """vLLM test_hash_block_correct_reuse: a cached page taken for another request's partial
    page leaves the hash table (a later prompt of the old ids misses)."""
    d = paged(1)
    prompt_only(d, 0, np.arange(16, dtype=np.int32))
    d.release(0)  # page 0 cached, hashed
    assert d.s.slot_states(None).cached == 16
    assert prompt_only(d, 1, np.full(15, 7, dtype=np.int32), decode=1) == (True, 0)  # evicts page 0
    assert table(d, 1) == [0] and d.s.slot_states(None).cached == 0
    assert d.s._hash[0] is None  # (private, read only) as vLLM's block_hash
    d.release(1)  # a partial page: not hashed, freed
    assert d.s.slot_states(None) == (0, 0, 0, 0, 0, 16)
    assert prompt_only(d, 2, np.arange(16, dtype=np.int32), decode=1) == (True, 0)


def test_a_partial_last_page_is_never_cached_and_a_full_prompt_hits_one_page_less():
    """vLLM test_prefill's partial-block check: only full pages are hashed; and a prompt whose
    every page is cached still computes its last token (vLLM caps a hit at length − 1)."""
    d = paged(10)
    prompt_only(d, 0, ids(COMMON, [3] * 7))  # 55 ids: 3 full pages + 7
    d.release(0)
    assert d.s.slot_states(None).cached == 48  # the 7-id page was freed, not cached
    assert prompt_only(d, 1, ids(COMMON, [3] * 7, [4] * 10)) == (True, 48)  # not 55
    d.release(1)
    assert prompt_only(d, 2, COMMON) == (True, 32)  # 48 cached ids, but the last one is computed


def test_a_refused_admission_leaves_reference_counts_unchanged():
    """vLLM test_prefill_not_enough_free_blocks_with_computed_blocks: a request that would hit
    6 pages (3 in use, 3 cached) but cannot get its 3 new pages changes nothing."""
    d = paged(10)
    prompt_only(d, 0, COMMON)
    assert table(d, 0) == [0, 1, 2]
    d.grow(0, 1)  # the step ran: 3 full pages hittable (vLLM: at once, without this step,
    # whose decode token here takes page 3: so one page less is left below than in vLLM's test)
    assert prompt_only(d, 1, ids(COMMON, COMMON)) == (True, 48)
    part1 = table(d, 1)
    assert part1 == [0, 1, 2, 4, 5, 6]
    d.release(1)  # 4, 5, 6 cached (ref 0); 0, 1, 2 still held by request 0
    assert d.s.slot_states(None).cached == 3 * PS
    prompt_only(d, 2, np.full(32, 7, dtype=np.int32))
    assert d.s.slot_states(None).free + d.s.slot_states(None).cached == 4 * PS  # vLLM: 5
    refs = [d.s._true_refs()[p] for p in part1]  # (private, read only) as vLLM's ref_cnt
    assert refs == [1, 1, 1, 0, 0, 0]
    # hits 6 pages (3 of them cached, revived), needs 3 more: 4 - 3 = 1 left → refused; the
    # driver also checks that nothing at all changed (page tables, slot states, private fields)
    assert prompt_only(d, 3, ids(COMMON, COMMON, COMMON)) == (False, 0)
    assert [d.s._true_refs()[p] for p in part1] == refs
    assert d.s.slot_states(None).cached == 3 * PS


def test_a_recomputed_duplicate_page_is_freed_not_cached_twice():
    """Difference from vLLM (which keeps both as cached blocks): two requests that computed the
    same prompt at once cache it once; the second's copy is freed at release."""
    d = paged(8)
    p = np.arange(40, dtype=np.int32)
    prompt_only(d, 0, p)
    prompt_only(d, 1, p)  # admitted before 0's step ran: no hit, its own pages
    assert table(d, 0) == [0, 1, 2] and table(d, 1) == [3, 4, 5]
    d.release(0)
    d.release(1)
    states = d.s.slot_states(None)
    assert (states.cached, states.free) == (2 * PS, 6 * PS)  # one cached copy of the 2 full pages
    assert prompt_only(d, 2, np.arange(41, dtype=np.int32)) == (True, 32)
    assert table(d, 2)[:2] == [0, 1]


def test_scheduled_visibility_hits_pages_in_the_step_that_schedules_them():
    """vLLM test_prefill's first steps with prefix_visibility=scheduled: request 1 hits request
    0's full pages while request 0's prompt step has not run yet; the same pages either way."""
    d = paged(10, prefix_visibility="scheduled")
    assert prompt_only(d, 0, ids(COMMON, [3] * 7)) == (True, 0)
    assert prompt_only(d, 1, ids(COMMON, [3] * 5)) == (True, 48)  # no step in between
    assert (table(d, 0), table(d, 1)) == ([0, 1, 2, 3], [0, 1, 2, 4])
    computed = paged(10)
    prompt_only(computed, 0, ids(COMMON, [3] * 7))
    assert prompt_only(computed, 1, ids(COMMON, [3] * 5)) == (True, 0)  # not yet hittable


def test_scheduled_visibility_refused_admission_with_vllms_numbers():
    """vLLM test_prefill_not_enough_free_blocks_with_computed_blocks, block for block: with
    scheduled visibility no step is needed, so 5 pages are left, as in vLLM."""
    d = paged(10, prefix_visibility="scheduled")
    prompt_only(d, 0, COMMON)
    assert prompt_only(d, 1, ids(COMMON, COMMON)) == (True, 48)
    part1 = table(d, 1)
    assert part1 == [0, 1, 2, 3, 4, 5]  # vLLM [1..6]
    d.release(1)
    prompt_only(d, 2, np.full(32, 7, dtype=np.int32))
    assert d.s.slot_states(None).free + d.s.slot_states(None).cached == 5 * PS  # vLLM: 5 free
    assert [d.s._true_refs()[p] for p in part1] == [1, 1, 1, 0, 0, 0]
    assert prompt_only(d, 3, ids(COMMON, COMMON, COMMON)) == (False, 0)  # 5 - 3 revived < 3
    assert [d.s._true_refs()[p] for p in part1] == [1, 1, 1, 0, 0, 0]


def _duplicate_then_release(**options) -> Driver:
    """Requests 0 and 1 compute the same 40 ids at once (1's 2 full pages duplicate 0's);
    request 2 is unrelated. Released 0, 2, 1."""
    d = paged(8, **options)
    p = np.arange(40, dtype=np.int32)
    prompt_only(d, 0, p)
    prompt_only(d, 1, p)
    prompt_only(d, 2, np.arange(100, 132, dtype=np.int32))
    assert (table(d, 0), table(d, 1), table(d, 2)) == ([0, 1, 2], [3, 4, 5], [6, 7])
    d.release(0)  # cached, tail first: 1, 0
    d.release(2)  # cached: 7, 6
    d.release(1)  # its copies 3, 4 of pages 0, 1 are freed
    return d


def test_dedup_touch_gives_a_freed_duplicates_recency_to_the_cached_original():
    """vLLM keeps request 1's copies as cached blocks freed last, so those ids are evicted last.
    kvbench frees the copies; by default the originals keep their place (evicted first), with
    dedup_touch they move to most recently used (evicted last, as in vLLM)."""
    free_first = [3, 4, 5, 2]  # request 1's freed pages (3 on top), then 0's partial page 2
    assert hand_out_order(_duplicate_then_release(), 8) == free_first + [1, 0, 7, 6]
    assert hand_out_order(_duplicate_then_release(dedup_touch=True), 8) == free_first + [7, 6, 1, 0]
