"""paged without prefix caching (a solo pool: every page its request's own): `release` takes
the request's length off the token count instead of summing its pages' fills (each position is
written once into its own pages: they sum to it). Against a pool that checks that sum at every
release (and writes every `_ref` at release and take, as before; the pool leaves a freed page's
`_ref` unwritten: a free page's is not read), under the same random admits, grows and releases
with a small pool: every answer, page table, the free stack, reference counts (`_true_refs`: a
free page's reads 0), fills, counters and slot states agree after every call."""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.strategies.paged import PagedStrategy


class _Writing(PagedStrategy):
    """The solo paths with the fills summed at release (and `_ref` written at every release and take)."""

    def release(self, rid) -> None:
        if self._solo:
            seq = self._seqs[rid]
            pages, ref, fill = seq.pages, self._ref, self._fill
            token = sum(fill[p] for p in pages)
            assert token == seq.length  # (what the solo release takes off)
            super().release(rid)
            for pid in pages:
                ref[pid] = 0
            return
        super().release(rid)

    def _take_pages(self, k: int, fill_to: int = 0):
        got = super()._take_pages(k, fill_to)
        for pid in got:
            self._ref[pid] = 1
        return got


def _state(s: PagedStrategy, live) -> tuple:
    return (s.slot_states(None), list(s._free), s._fresh, s._true_refs(), list(s._fill), s._token, s._reserved,
            {rid: s.page_table(rid).tolist() for rid in live})


@pytest.mark.parametrize("ps", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_solo_release_and_take_equal_writing_every_ref(ps, seed):
    rng = np.random.default_rng(seed)
    new = PagedStrategy(64 * ps, 1 << 12, page_size=ps, prefix_caching=False)
    old = _Writing(64 * ps, 1 << 12, page_size=ps, prefix_caching=False)
    assert new._solo and old._solo
    live: dict[int, list[int]] = {}  # rid -> [length, kv_len]
    for step in range(2000):
        op = rng.random()
        if op < 0.3:
            kv_len = int(rng.integers(2, 40 * ps))
            prompt = int(rng.integers(1, kv_len))
            budget = int(rng.integers(1, 30 * ps))
            a = new.admit(step, None, kv_len, prompt, budget)
            assert a == old.admit(step, None, kv_len, prompt, budget)
            if a.admitted:
                live[step] = [min(budget, prompt), kv_len]
        elif op < 0.8 and live:
            rid = list(live)[rng.integers(len(live))]
            length, kv_len = live[rid]
            if length < kv_len:
                n = 1 if rng.random() < 0.6 else int(rng.integers(1, kv_len - length + 1))
                ok = new.grow(rid, n)
                assert ok == old.grow(rid, n)
                if ok:
                    live[rid][0] += n
        elif live:
            rid = list(live)[rng.integers(len(live))]
            new.release(rid)
            old.release(rid)
            del live[rid]
        assert _state(new, live) == _state(old, live), (seed, step)
        if step % 50 == 0:
            new.check_invariants()
    new.check_invariants()
