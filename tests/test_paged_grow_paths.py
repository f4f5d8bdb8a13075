"""paged's short paths for the commonest calls answer and leave the pool exactly as the general
paths they skip:

- `grow`'s decode path is chosen by the request's reserved share (0 < n <= reserved: the tokens
  fit its own, partly filled last page, below its final length), which must say exactly what
  the page layout says (its last page partly filled, the tokens fit it, nobody else holds it,
  no growth past kv_len): checked before every grow of random admits (shared prefixes: hits),
  forks (shared, partly filled last pages), grows of random sizes and releases;
- an admission that makes no match (`_admit_cold`: its first page's hash is not in the table,
  or prefix caching is off) against admit's general path as it ran before (no hit: a request
  record with no pages, then `grow` of its positions): two pools see the same random calls,
  every answer and the whole pool agree after every call (prefix caching on and off, admission
  options, `scheduled` visibility, other eviction policies, a small pool: evictions, refusals).
"""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.strategies.base import Admission
from kvbench.strategies.paged import _NEVER, PagedStrategy, _Seq


def _layout_says_decode(s: PagedStrategy, rid: int, n: int) -> bool:
    """grow's decode path as the page layout says it (before it was read off `reserved`)."""
    seq = s._seqs[rid]
    rem = seq.length % s.page_size
    return (bool(rem) and rem + n <= s.page_size and s._ref[seq.pages[-1]] == 1
            and seq.length + n <= seq.kv_len)


@pytest.mark.parametrize("opts", [dict(), dict(prefix_caching=False), dict(prefix_visibility="scheduled"),
                                  dict(eviction="fifo"), dict(cache_outputs=False)])
@pytest.mark.parametrize("ps", [1, 4, 16])
def test_decode_path_choice_equals_the_page_layout(opts, ps):
    rng = np.random.default_rng(ps)
    s = PagedStrategy(48 * ps, 1 << 12, page_size=ps, **opts)
    heads = [rng.integers(0, 40, 5 * ps, dtype=np.int32) for _ in range(3)]
    live: dict[int, int] = {}  # rid -> kv_len
    decodes = 0
    for rid in range(1500):
        op = rng.random()
        if op < 0.2 or not live:
            own = rng.integers(0, 40, int(rng.integers(1, 6 * ps)), dtype=np.int32)
            tokens = np.concatenate([heads[rid % 3], own]) if rid % 2 else own
            prompt = int(rng.integers(1, len(tokens) + 1))
            if s.admit(rid, tokens, len(tokens), prompt, int(rng.integers(1, 4 * ps))).admitted:
                live[rid] = len(tokens)
        elif op < 0.25 and len(live) < 20:  # a fork: a shared, partly filled last page
            parent = list(live)[int(rng.integers(len(live)))]
            src = s._seqs[parent]
            s.fork(parent, 10_000 + rid, src.tokens, src.kv_len)
            live[10_000 + rid] = src.kv_len
        elif op < 0.35:
            victim = list(live)[int(rng.integers(len(live)))]
            s.release(victim)
            del live[victim]
        else:
            rid_ = list(live)[int(rng.integers(len(live)))]
            seq = s._seqs[rid_]
            left = live[rid_] - seq.length
            if left <= 0:
                continue
            n = int(rng.integers(1, min(left, 2 * ps) + 1))
            fast = 0 < n <= seq.reserved
            assert fast == _layout_says_decode(s, rid_, n)
            decodes += fast
            s.grow(rid_, n)
        s.check_invariants()
    assert decodes > 50 or ps == 1  # (the decode path ran; page size 1: never a partly filled page)


class _Counted(PagedStrategy):
    """Counts the admissions that took `_admit_cold`."""

    cold = 0

    def _admit_cold(self, *a) -> Admission:
        self.cold += 1
        return super()._admit_cold(*a)


class _Before(PagedStrategy):
    """admit's general path for a request with no hit, as it ran before `_admit_cold`."""

    def _admit_cold(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        ps, rare = self.page_size, self._rare
        length = min(max_new, num_prompt)
        if self.pages_for(length) > self._available():
            if rare.prefix_caching:
                self._index(self._cached_prefix(rid, tokens, (num_prompt - 1) // ps))
            return Admission(False)
        self._hit_memo = None
        seq = _Seq(tokens=tokens, kv_len=kv_len, pages=[], length=0, hash_at=ps)
        if not rare.prefix_caching:
            seq.cache_pages, seq.hash_at = 0, _NEVER
        elif rare.admission:
            seq.cache_pages = (0 if num_prompt < rare.min_cache_len
                               else (num_prompt if not rare.cache_outputs else kv_len) // ps)
            if not seq.cache_pages:
                seq.hash_at = _NEVER
        self._seqs[rid] = seq
        assert self.grow(rid, length)  # (its general path: pages taken, counters, `scheduled` registration)
        if rare.tracks:
            self._lru.request(rid)
        return Admission(True, 0)


def _state(s: PagedStrategy):
    memo = s._hit_memo
    marks = [h if h is None or isinstance(h, int) else ("owner", h.hashes[-1]) for h in s._marks()]
    seqs = {rid: (list(q.pages), q.length, q.reserved, q.hash_at, q.cache_pages, q.lazy, q.ndef, list(q.hashes))
            for rid, q in s._seqs.items()}
    return (list(s._free), s._fresh, list(s._lru), dict(s._table), s._true_refs(), list(s._fill), marks,
            list(s._stored_ids), dict(s._kids), dict(s._ghosts), seqs, s._token, s._reserved, s.slot_states(None),
            None if memo is None else (memo.rid, list(memo.hits), memo.cached, set(memo.index)))


@pytest.mark.parametrize("opts", [dict(), dict(prefix_caching=False), dict(prefix_visibility="scheduled"),
                                  dict(eviction="fifo"), dict(min_cache_len=20), dict(cache_outputs=False)])
@pytest.mark.parametrize("ps", [1, 4, 16])
def test_cold_admission_equals_the_general_path(opts, ps):
    rng = np.random.default_rng(7 + ps)
    new = _Counted(60 * ps, 1 << 12, page_size=ps, **opts)
    old = _Before(60 * ps, 1 << 12, page_size=ps, **opts)
    heads = [rng.integers(0, 40, 3 * ps, dtype=np.int32) for _ in range(3)]
    live: dict[int, int] = {}
    for rid in range(800):
        op = rng.random()
        if op < 0.35 or not live:
            own = rng.integers(0, 40, int(rng.integers(1, 8 * ps)), dtype=np.int32)
            tokens = np.concatenate([heads[rid % 3], own]) if rid % 3 else own
            prompt = int(rng.integers(1, len(tokens) + 1))
            budget = int(rng.integers(1, 6 * ps))
            a = new.admit(rid, tokens, len(tokens), prompt, budget)
            assert a == old.admit(rid, tokens, len(tokens), prompt, budget)
            if a.admitted:
                live[rid] = len(tokens)
        elif op < 0.55:
            victim = list(live)[int(rng.integers(len(live)))]
            new.release(victim)
            old.release(victim)
            del live[victim]
        else:
            rid_ = list(live)[int(rng.integers(len(live)))]
            left = live[rid_] - new._seqs[rid_].length
            if left > 0:
                n = int(rng.integers(1, min(left, 2 * ps) + 1))
                assert new.grow(rid_, n) == old.grow(rid_, n)
        assert _state(new) == _state(old), f"differs after call {rid}"
    new.check_invariants()
    assert new.cold > 50  # (the cold path ran)
