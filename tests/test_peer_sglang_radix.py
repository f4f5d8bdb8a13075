"""SGLang's radix-cache expectations (test/srt/test_radix_cache_unit.py, and the behaviour of
python/sglang/srt/mem_cache/radix_cache.py its scheduler relies on), as kvbench tests of the
radix strategy: tree shape, node splits, LRU leaf order, locks, deduplication, hit lengths.

Written from SGLang's scenarios, driven through kvbench's contract by the content model's driver
(every call also checks that each position a request reads holds its own ids). SGLang's tests
call `insert` and `match_prefix` on the tree directly; kvbench's tree is filled by requests, so
"insert ids X" is a request whose prompt is X, computed and released (SGLang's
`cache_finished_req`). The tree's shape is read from private fields (`root`, `children`, `key`),
read only.

Deliberate differences, each stated where it shows:
- A refused admission changes nothing in kvbench (the contract: a call that answers no does not
  mutate); SGLang's `match_prefix` splits the node a match ends in and refreshes access times
  whether or not the request is then scheduled. Why: the scheduler retries the head of the queue
  every step, and those retries must not reorder eviction or reshape the tree.
- `prefix_visibility=scheduled` (vLLM's rule, not SGLang's) inserts a prompt chunk in the call
  that schedules it, so a second request with the same prompt hits it at once and nothing is
  computed twice; SGLang (and kvbench's default) inserts it after the chunk ran.
- Access times are a logical clock (lock, unlock, insert) rather than `time.monotonic()`: the
  same order, but deterministic (no ties left to timer resolution), so runs repeat exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

from content_model import Driver
from kvbench.strategies.radix import RadixStrategy


def radix(capacity: int = 64, page_size: int = 1, **options) -> Driver:
    return Driver(RadixStrategy(capacity_tokens=capacity, max_model_len=256, page_size=page_size, **options))


def ids(*xs) -> np.ndarray:
    return np.asarray(xs, dtype=np.int32)


def admit(d: Driver, rid: int, prompt: np.ndarray, decode: int = 1):
    """Admit `prompt` whole (one step); final length = prompt + decode − 1."""
    tokens = np.concatenate([prompt, np.full(decode, 7777, dtype=np.int32)])
    return d.admit(rid, tokens, len(prompt) + decode - 1, len(prompt), len(prompt))


_rid = iter(range(10**6))


def insert(d: Driver, *prompt: int) -> list[int]:
    """The tree gets `prompt` (whole pages of it): a request computes it and finishes. Returns
    the pages that held it."""
    rid = next(_rid)
    assert admit(d, rid, ids(*prompt)).admitted
    pages = d.s.page_table(rid).tolist()
    d.release(rid)
    return pages


def tree(d: Driver) -> dict:
    """The tree as nested {key ids: subtree} (private fields, read only)."""
    def walk(node):
        return {tuple(int(x) for x in ch.key): walk(ch) for ch in node.children.values()}
    return walk(d.s.root)


@pytest.mark.parametrize("page_size", [1, 2])
def test_match_and_insert(page_size):
    """SGLang test_insert_and_match_basic: insert [1, 2, 3, 4]; a match returns the stored
    pages of its longest cached prefix (whole pages)."""
    d = radix(page_size=page_size)
    pages = insert(d, 1, 2, 3, 4)
    assert tree(d) == {(1, 2, 3, 4): {}}
    assert d.s.slot_states(None).cached == 4  # SGLang evictable_size
    assert admit(d, 100, ids(1, 2, 3, 4, 5)) == (True, 4)
    assert d.s.page_table(100).tolist()[:len(pages)] == pages
    assert admit(d, 101, ids(1, 2, 9, 9, 9)) == (True, 2)  # a partial match, whole pages
    assert d.s.page_table(101).tolist()[:2 // page_size] == pages[:2 // page_size]


def test_node_splits_at_page_size_1():
    d = radix(page_size=1)
    insert(d, 1, 2, 3, 4)
    insert(d, 1, 2, 5, 6)
    assert tree(d) == {(1, 2): {(3, 4): {}, (5, 6): {}}}
    insert(d, 1, 2, 3, 9)  # splits [3, 4] after one id
    assert tree(d) == {(1, 2): {(3,): {(4,): {}, (9,): {}}, (5, 6): {}}}


def test_node_splits_at_page_size_2_fall_on_page_boundaries():
    """SGLang's _key_match_paged compares whole pages: a split lands on a page boundary."""
    d = radix(page_size=2)
    insert(d, 1, 2, 3, 4, 5, 6)
    insert(d, 1, 2, 3, 4, 7, 8)
    assert tree(d) == {(1, 2, 3, 4): {(5, 6): {}, (7, 8): {}}}
    insert(d, 1, 2, 3, 9, 10, 11)  # 3 ids in common: the split is after 2 (one page)
    assert tree(d) == {(1, 2): {(3, 4): {(5, 6): {}, (7, 8): {}}, (3, 9, 10, 11): {}}}
    insert(d, 1, 2, 3)  # 3 ids: the tree takes its whole pages only, [1, 2], already there
    assert tree(d) == {(1, 2): {(3, 4): {(5, 6): {}, (7, 8): {}}, (3, 9, 10, 11): {}}}


def test_unlocked_leaves_go_least_recently_used_first_and_a_parent_after_its_children():
    d = radix()
    insert(d, 10, 11)  # a
    insert(d, 20, 21)  # b
    insert(d, 30, 31)  # c
    assert admit(d, 200, ids(10, 11, 12)) == (True, 2)  # a hit: a is most recent now
    d.release(200)  # [12] hangs below a
    assert tree(d) == {(10, 11): {(12,): {}}, (20, 21): {}, (30, 31): {}}
    seen = []
    while tree(d):
        assert d.evict(1) >= 1  # one leaf at a time
        seen.append(tree(d))
    assert seen == [{(10, 11): {(12,): {}}, (30, 31): {}},  # b: least recently used
                    {(10, 11): {(12,): {}}},  # c
                    {(10, 11): {}},  # a's child, then a: a parent after its children
                    {}]
    assert d.s.slot_states(None).free == 64


def test_a_parent_is_evicted_only_after_all_its_children():
    d = radix()
    insert(d, 1, 2, 3, 4)
    insert(d, 1, 2, 5, 6)
    assert d.evict(1) == 2 and tree(d) == {(1, 2): {(5, 6): {}}}  # the older child
    assert d.evict(1) == 2 and tree(d) == {(1, 2): {}}  # the parent is a leaf now
    assert d.evict(1) == 2 and tree(d) == {}


def test_a_locked_path_survives_an_evict_everything():
    """SGLang test_lock_ref_prevents_eviction: while a request holds [1..8] (lock), evicting
    everything frees only the unlocked nodes, including an unlocked child of the locked path."""
    d = radix()
    insert(d, *range(1, 9), 20, 21)
    insert(d, 50, 51, 52)
    assert admit(d, 300, ids(*range(1, 9), 99)) == (True, 8)  # locks [1..8], splits off [20, 21]
    assert tree(d) == {tuple(range(1, 9)): {(20, 21): {}}, (50, 51, 52): {}}
    assert d.evict(10**6) == 2 + 3
    assert tree(d) == {tuple(range(1, 9)): {}}
    assert d.s.slot_states(None).cached == 0  # the driver checked request 300's ids are intact
    d.release(300)  # [1..8, 99] unlocked: the next evict-everything frees it all
    assert d.evict(10**6) == 9 and tree(d) == {} and d.s.slot_states(None).free == 64


def test_a_duplicate_insert_frees_its_copy():
    """SGLang frees the indices of a prefix another request inserted first (cache_finished_req /
    cache_unfinished_req free kv_indices[old prefix : new prefix])."""
    d = radix()
    p = ids(*range(1, 11))
    assert admit(d, 400, p, decode=3) == (True, 0)
    assert admit(d, 401, p, decode=3) == (True, 0)  # before 400's ids are in the tree: no hit
    free0 = d.s.slot_states(None).free
    d.grow(400, 1)  # 400's computed prompt goes into the tree
    assert d.s.slot_states(None).free == free0 - 1
    d.grow(401, 1)  # 401 finds its 10 ids there: its copy is freed, it reads the tree's pages
    assert d.s.slot_states(None).free == free0 - 2 + 10
    assert d.s.page_table(401).tolist()[:10] == d.s.page_table(400).tolist()[:10]
    assert tree(d) == {tuple(range(1, 11)): {}}


@pytest.mark.parametrize("page_size, hit", [(1, 7), (2, 6), (4, 4)])
def test_a_fully_cached_prompt_hits_its_length_minus_one(page_size, hit):
    """SGLang's scheduler matches at most len(prompt) − 1 ids (the last one is computed to get
    logits), in whole pages."""
    d = radix(page_size=page_size)
    insert(d, *range(1, 9))
    assert admit(d, 500, ids(*range(1, 9))) == (True, hit)


def test_a_refused_admission_neither_splits_nor_touches():
    """Difference from SGLang (match_prefix splits and refreshes access times even when the
    request is not scheduled): in kvbench a refused admission changes nothing."""
    d = radix(capacity=8)
    insert(d, 1, 2, 3, 4)
    insert(d, 5, 6)  # free: 2 slots
    assert admit(d, 600, ids(1, 2, 9, 9, 9, 9, 9, 9, 9)) == (False, 0)  # the driver checks no change
    assert tree(d) == {(1, 2, 3, 4): {}, (5, 6): {}}  # no split at 2
    assert d.evict(1) == 4  # [1..4] is still the least recently used


def test_scheduled_visibility_hits_a_prompt_in_the_step_that_computes_it():
    """kvbench's option, vLLM's rule: the duplicate of test_a_duplicate_insert_frees_its_copy is
    never computed; the second request hits the first one's pages at admission."""
    d = radix(prefix_visibility="scheduled")
    p = ids(*range(1, 11))
    assert admit(d, 700, p, decode=3) == (True, 0)
    assert admit(d, 701, p, decode=3) == (True, 9)  # length − 1: the last id is computed
    # its one computed position (id 10 at 9) is in the tree already, scheduled by 700: it is
    # deduplicated at once (701 writes the same K/V into the same slot), no page of its own
    assert d.s.page_table(701).tolist() == d.s.page_table(700).tolist()
    assert d.s.slot_states(None).token == 10
