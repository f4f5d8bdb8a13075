"""Eviction policies inside the strategies: the same script gives each policy's exact victims
in paged (pages) and radix (unlocked leaves only), and a policy change moves only the order."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kvbench.strategies.eviction.base import POLICIES
from kvbench.strategies.eviction.belady import Belady, paged_future
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy

A = np.arange(100, 110, dtype=np.int32)  # 9 prompt ids + 1 output
B = np.arange(200, 210, dtype=np.int32)


def _paged(eviction):
    if eviction == "belady":  # requests 0..3 in arrival order: A, B, A, B (2 full pages each)
        reqs = [SimpleNamespace(id=i, tokens=t, num_prompt=9) for i, t in enumerate([A, B, A, B])]
        eviction = Belady(paged_future(reqs, 4))
    return PagedStrategy(32, 32, page_size=4, eviction=eviction)


@pytest.mark.parametrize("eviction, b_survives", [
    ("lru", False), ("lfu", False), ("slru", False), ("arc", False), ("s3fifo", False),
    ("fifo", True),  # A entered first: a hit does not move it
    ("belady", True),  # A is never asked for again, B next
])
def test_paged_victims(eviction, b_survives):
    """A and B each leave 2 cached pages; A is hit again (a use). Freeing 2 pages then takes
    B's (the less recently / less often used) or A's (first in; or, for Belady, never used again)."""
    s = _paged(eviction)
    for rid, toks in enumerate([A, B, A]):
        adm = s.admit(rid, toks, 9, 9, 9)
        assert adm.admitted and adm.cached_tokens == (8 if rid == 2 else 0)
        s.release(rid)
        s.check_invariants()
    assert s.slot_states(None).cached == 16
    assert s.evict(8) == 8
    s.check_invariants()
    assert s.admit(3, B, 9, 9, 9).cached_tokens == (8 if b_survives else 0)
    assert s.admit(4, A, 9, 9, 9).cached_tokens == (0 if b_survives else 8)
    s.check_invariants()


def test_lru_is_the_default_and_labels_name_the_others():
    assert PagedStrategy(32, 32, page_size=4).eviction == "lru"
    assert PagedStrategy(32, 32, page_size=4, eviction="arc").label == "paged-4-arc"
    assert RadixStrategy(32, 32, eviction="s3fifo").summary()["eviction"] == "s3fifo"
    with pytest.raises(ValueError, match="eviction must be one of"):
        PagedStrategy(32, 32, eviction="random")
    with pytest.raises(ValueError, match="paged only"):
        RadixStrategy(32, 32, eviction=Belady({}))
    with pytest.raises(ValueError, match="belady is offline"):
        PagedStrategy(32, 32, eviction="belady")


@pytest.mark.parametrize("eviction", [p for p in POLICIES if p != "belady"])
def test_radix_evicts_unlocked_leaves_only(eviction):
    """Y leaves shared ids 0..5 + its own 8 in the tree; X computes 0..5, 50, 51, 52 and leaves;
    X again matches (and locks) 0..5, 50, 51. The unlocked leaves are Y's 8 ids and X's 52: any
    policy frees exactly those 9 and nothing locked; after X leaves everything goes."""
    s = RadixStrategy(64, 64, eviction=eviction)
    shared = np.arange(6, dtype=np.int32)
    x = np.concatenate([shared, [50, 51, 52, 53]]).astype(np.int32)  # prompt 9, output 1
    y = np.concatenate([shared, np.arange(70, 78), [0]]).astype(np.int32)  # prompt 14, output 1
    assert s.admit(0, y, 14, 14, 14).admitted
    s.release(0)
    assert s.admit(1, x, 9, 9, 9).cached_tokens == 6
    s.release(1)
    assert s.admit(2, x, 9, 9, 9).cached_tokens == 8
    s.check_invariants()
    assert s.evict(64) == 9
    s.check_invariants()
    assert s.evict(64) == 0 and s.slot_states(None).cached == 0
    s.release(2)
    assert s.evict(64) == 9
    s.check_invariants()
    assert not s.root.children
