"""paged's admission of a request whose first page misses (no kept match of it: the Azure traces'
every admission) makes no match (`PagedStrategy.admit`: one probe of the first page's hash, then
no hit), unless it is refused: it answers and leaves the pool exactly as matching first
(`_cached_prefix`) does. The same random admits, grows and releases run twice, once as they are
and once with `page_hash` replaced by an equal function (admit then matches every request first,
as before); after every call the answers, the pool (free stack, LRU, hash table, lazily
registered owners, per-page lists, requests) and the waiting match agree. Requests share
prefixes of a few families (hits, misses, owners), the pool is small (evictions, refusals)."""
from __future__ import annotations

import numpy as np
import pytest

import kvbench.strategies.paged as paged_mod
from kvbench.strategies.paged import PagedStrategy


def _state(s: PagedStrategy):
    memo = s._hit_memo
    marks = [h if h is None or isinstance(h, int) else ("owner", h.hashes[-1]) for h in s._marks()]
    seqs = {rid: (list(q.pages), q.length, q.reserved, q.hash_at, q.lazy, q.ndef, list(q.hashes))
            for rid, q in s._seqs.items()}
    return (list(s._free), s._fresh, list(s._lru), dict(s._table), s._true_refs(), list(s._fill), marks,
            list(s._stored_ids), {h: (o.ndef, list(o.pages)) for h, o in s._owners.items()}, dict(s._kids),
            dict(s._ghosts), seqs, s._token, s._reserved, s.slot_states(None),
            None if memo is None else (memo.rid, list(memo.hits), list(memo.hashes), memo.cached, set(memo.index)))


def _calls(seed: int, ps: int):
    """Random calls: (op, rid, tokens, kv_len, prompt, budget) with tokens of 4 families."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(0, 30000, int(rng.integers(1, 6 * ps)), dtype=np.int32) for _ in range(4)]
    out, live, memo = [], [], {}
    for rid in range(300):
        if live and rng.random() < 0.45:
            out.append(("release", live.pop(int(rng.integers(len(live))))))
        own = rng.integers(0, 30000, int(rng.integers(1, 8 * ps)), dtype=np.int32)
        tokens = np.concatenate([heads[rid % 4], own]) if rid % 3 else own
        prompt = int(rng.integers(1, len(tokens) + 1))
        memo[rid] = tokens
        out.append(("admit", rid, tokens, len(tokens), prompt, int(rng.integers(1, 4 * ps))))
        if rid % 5 == 0 and rid:  # a refused request tried again (its kept match)
            old = int(rng.integers(rid))
            t = memo[old]
            out.append(("admit", 1000 + old, t, len(t), len(t), 64 * ps))
        live.append(rid)
    return out


class _Counted(PagedStrategy):
    """Counts the matches admission makes (`_cached_prefix` on the pool itself)."""

    made = 0

    def _cached_prefix(self, rid, tokens, num_full):
        if isinstance(self, _Counted):  # (not the scratch view of `check_invariants`)
            _Counted.made += 1
        return PagedStrategy._cached_prefix(self, rid, tokens, num_full)


def _run(calls, ps: int):
    s = _Counted(capacity_tokens=150 * ps, max_model_len=4096, page_size=ps)
    _Counted.made = 0
    states, live, admits = [], {}, 0
    for op, rid, *rest in calls:
        if op == "release":
            if rid in live:
                s.release(rid)
                del live[rid]
            states.append(_state(s))
            continue
        tokens, kv_len, prompt, budget = rest
        if rid in live:  # (a request tried again once admitted: not again)
            continue
        adm = s.admit(rid, tokens, kv_len, prompt, budget)
        admits += 1
        if adm.admitted:
            live[rid] = True
            states.append((adm, _state(s)))
            n = min(3, kv_len - s._seqs[rid].length)
            if n > 0:  # (its next page registers the prompt's full pages; it may find no room)
                states.append(s.grow(rid, n))
        else:
            states.append((adm, _state(s)))
        states.append(_state(s))
    made = _Counted.made
    s.check_invariants()
    return states, made, admits


@pytest.mark.parametrize("ps", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_page_miss_admits_as_matching_first(ps, seed, monkeypatch):
    calls = _calls(seed, ps)
    fast, made_fast, admits = _run(calls, ps)
    real = paged_mod.page_hash
    monkeypatch.setattr(paged_mod, "page_hash", lambda parent, ids: real(parent, ids))  # (admit matches first)
    slow, made_slow, _ = _run(calls, ps)
    assert made_slow == admits and made_fast < admits  # (the first-miss path ran)
    assert len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a == b, f"differs after call {i}"
