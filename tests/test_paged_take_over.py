"""paged's lazy registration: a preempted request back takes over the pages it registered
lazily by reusing its old record (`_take_over` returns the owner's record, given the new one's
fields: no page is marked again) where its hits past the owner's node are exactly those pages.
tests/test_paged_lazy.py's random calls compare the lazy pool with one that hashes every page
(every answer, page table, slot state and the hashed view of the table after every call); here
the same runs must take the reusing path and still agree; and a
replay with preemptions (fast path against stepping, the pool after every planned step:
tests/test_paged_refused_head.py) takes it too."""
from __future__ import annotations

import pytest

from kvbench.strategies.paged import PagedStrategy
from tests import test_paged_lazy as L
from tests.test_paged_refused_head import CASES, _compare, _requests


def _counting(monkeypatch):
    seen = {"reused": 0, "marked": 0}
    take = PagedStrategy._take_over

    def counted(self, owner, seq, nhit):
        got = take(self, owner, seq, nhit)
        seen["reused" if got is owner else "marked"] += 1
        assert got is owner or got is seq
        return got
    monkeypatch.setattr(PagedStrategy, "_take_over", counted)
    return seen


def test_take_over_reuses_the_owner_and_agrees_with_hashing_every_page(monkeypatch):
    seen = _counting(monkeypatch)
    for seed in range(12):
        L.run(seed, 600)
    assert seen["reused"] > 0


@pytest.mark.parametrize("case", ["ps16", "ps4", "ps1"])
def test_take_over_in_replays_equal_stepping(case, monkeypatch):
    seen = _counting(monkeypatch)
    kw, sched_kw = CASES[case]
    ps = kw["page_size"]
    for seed in (0, 1, 2):
        _compare({**kw, "max_model_len": 4096}, sched_kw, _requests(60, seed, max(ps, 4)), check_guard=False)
    assert seen["reused"] > 0
