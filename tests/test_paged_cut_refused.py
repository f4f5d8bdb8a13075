"""`PagedStrategy._cut_refused` finds the position of an owner's page among the waiting match's
hits from its place in the owner's run of the LRU (a guess, verified, else looked up as before):
here every call of it in guarded replays (tests/test_paged_refused_head.py's, fast path against
stepping) is compared with the lookup it replaces (each victim's position by `list.index`), and
the guess must be taken."""
from __future__ import annotations

from itertools import islice

import pytest

from kvbench.strategies.paged import PagedStrategy
from tests.test_paged_refused_head import CASES, _compare, _requests


def _reference(self, memo, e, nt, prompt, budget):
    """The lookup before: each victim's position in the match by `list.index` (then the same decision)."""
    hits, marks, lru = memo.hits, self._hash, self._lru
    index, nidx = memo.index, memo.nidx
    owner = marks[hits[-1]] if nidx < len(hits) else None
    cut = len(hits)
    for key in islice(lru.live(), e):
        if key in index:
            i = len(hits) - 1 if hits[-1] == key else hits.index(key)
        elif owner is not None and marks[key] is owner:
            try:
                i = hits.index(key, nidx)
            except ValueError:
                continue
        else:
            continue
        if i < cut:
            cut = i
    return None if cut == len(hits) else self._refused_cut(memo, cut, nt, prompt, budget)


@pytest.mark.parametrize("case", ["ps16", "ps16-small-budget", "ps4", "ps1"])
def test_cut_refused_equals_the_lookup(case, monkeypatch):
    calls = [0, 0, 0]
    fast = PagedStrategy._cut_refused

    def checked(self, memo, e, nt, prompt, budget):
        got = fast(self, memo, e, nt, prompt, budget)
        assert got == _reference(self, memo, e, nt, prompt, budget)
        calls[0] += 1
        calls[1] += got is not None
        hits, marks = memo.hits, self._hash
        if memo.nidx < len(hits):  # (victims that are the owner's pages: the guessed positions)
            owner = marks[hits[-1]]
            calls[2] += sum(marks[key] is owner for key in islice(self._lru.live(), e))
        return got
    monkeypatch.setattr(PagedStrategy, "_cut_refused", checked)
    kw, sched_kw = CASES[case]
    ps = kw["page_size"]
    for seed in range(4):
        _compare({**kw, "max_model_len": 4096}, sched_kw, _requests(60, seed, max(ps, 4)), check_guard=False)
    assert calls[0] > 0 and calls[2] > 0  # (calls, and owner's pages among their victims)
