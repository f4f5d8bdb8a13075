"""The priority policy: lowest priority first (least recent among equals), expired keys before
anything; per-request priority and TTL, in the policy alone and inside paged and radix."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kvbench.strategies.eviction.priority import Priority, from_requests
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy


def test_order_priority_then_recency_then_expiry():
    p = Priority({1: (5, None), 2: (1, None), 3: (5, 2)})
    p.bind(8)
    for owner, keys in ((1, "ab"), (2, "cd"), (3, "e")):
        p.releasing(owner)
        for k in keys:
            p.insert(k)
    assert p.victim() == "c"  # priority 1 first, least recent first
    p.request(10), p.request(11)  # two admissions: e (ttl 2, inserted at clock 0) has expired
    assert p.victim() == "e"
    assert [p.victim() for _ in range(3)] == ["d", "a", "b"]
    p.check()


def test_touch_keeps_priority_and_moves_recency():
    p = Priority({1: (3, None)})
    p.releasing(1)
    p.insert("x"), p.insert("y")
    p.touch("x")
    assert p.victim() == "y"


def test_from_requests_reads_meta():
    reqs = [SimpleNamespace(id=0, meta={"priority": 2, "ttl": 5}), SimpleNamespace(id=1, meta={})]
    assert from_requests(reqs) == {0: (2.0, 5), 1: (0.0, None)}


A = np.arange(100, 110, dtype=np.int32)
B = np.arange(200, 210, dtype=np.int32)
C = np.arange(300, 310, dtype=np.int32)


@pytest.mark.parametrize("cls, ps", [(PagedStrategy, 4), (RadixStrategy, 4)])
@pytest.mark.parametrize("ttl_a, survivor", [(None, "A"), (1, "B")])
def test_in_a_strategy(cls, ps, ttl_a, survivor):
    """A (priority 5) and B (priority 1) leave 8 cached ids each; C is admitted (the clock moves
    one). Freeing 8 slots takes B's (lower priority), unless A's TTL of one admission ran out."""
    s = cls(64, 64, page_size=ps, eviction=Priority({0: (5, ttl_a), 1: (1, None)}))
    for rid, toks in ((0, A), (1, B)):
        assert s.admit(rid, toks, 9, 9, 9).admitted
        s.release(rid)
    assert s.admit(2, C, 9, 9, 9).admitted
    s.check_invariants()
    assert s.evict(8) == 8
    s.check_invariants()
    s.release(2)
    hits = {name: s.admit(rid, toks, 9, 9, 9).cached_tokens for rid, name, toks in ((3, "A", A), (4, "B", B))}
    assert hits == {survivor: 8, ("B" if survivor == "A" else "A"): 0}
