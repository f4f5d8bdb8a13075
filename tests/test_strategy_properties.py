"""Random admit / grow / fork / release / evict sequences on every strategy (hypothesis), with
check_invariants() after every operation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategy_cases import build, case_id, cases

CAPACITY, MAX_LEN, VOCAB = 256, 96, 4  # a tiny vocabulary makes shared prefixes common

op = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 2), st.integers(2, 60), st.integers(1, 30), st.integers(1, 64)),
    st.tuples(st.just("grow"), st.integers(0, 50), st.integers(1, 8)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("fork"), st.integers(0, 50)),
    st.tuples(st.just("evict"), st.integers(1, 64)),
)


def make_tokens(rng: np.random.Generator, family: int, prompt: int, output: int) -> np.ndarray:
    """Requests of one family share a long common prefix (like a system prompt)."""
    base = np.random.default_rng(family).integers(0, VOCAB, 40, dtype=np.int32)
    ids = rng.integers(0, VOCAB, prompt + output, dtype=np.int32)
    k = min(len(base), prompt)
    ids[:k] = base[:k]
    return ids


@pytest.mark.parametrize("case", cases(), ids=case_id)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=60), seed=st.integers(0, 2**16))
def test_random_operations_keep_invariants(case, ops, seed):
    name, opts = case
    s = build(name, CAPACITY, MAX_LEN, **opts)
    rng = np.random.default_rng(seed)
    live: dict[int, list] = {}  # rid -> [tokens, kv_len, length]
    next_id = 0
    for o in ops:
        kind = o[0]
        if kind == "admit":
            _, family, prompt, output, max_new = o
            tokens = make_tokens(rng, family, prompt, output)
            kv_len = prompt + output - 1
            if s.never_fits(kv_len):
                continue
            free_before = s.slot_states(None)
            adm = s.admit(next_id, tokens, kv_len, prompt, max_new)
            if adm.admitted:
                assert 0 <= adm.cached_tokens <= prompt - 1
                assert adm.cached_tokens % s.page_size == 0
                live[next_id] = [tokens, kv_len, adm.cached_tokens + min(max_new, prompt - adm.cached_tokens)]
            else:
                assert s.slot_states(None) == free_before, "a refused admit must not mutate"
            next_id += 1
        elif kind in ("grow", "release", "fork") and live:
            rid = sorted(live)[o[1] % len(live)]
            tokens, kv_len, length = live[rid]
            if kind == "grow":
                n = min(o[2], kv_len - length)
                if n and s.grow(rid, n):
                    live[rid][2] += n
            elif kind == "release":
                s.release(rid)
                del live[rid]
            elif s.fork(rid, next_id, tokens.copy(), kv_len):
                live[next_id] = [tokens, kv_len, length]
                next_id += 1
        elif kind == "evict":
            s.evict(o[1])
        s.check_invariants()
        s.take_copies()
        for rid, (tokens, kv_len, length) in live.items():
            assert len(s.page_table(rid)) == s.pages_for(length)
    states = s.slot_states(None)
    assert states.token >= 0
    for rid in list(live):
        s.release(rid)
        s.check_invariants()
    end = s.slot_states(None)
    assert end.token == end.reserved == end.internal == end.external == 0
    assert end.free + end.cached == s.capacity
    s.evict(s.capacity)
    s.check_invariants()
    assert s.slot_states(None).free == s.capacity


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_shared_prefix_is_stored_once(case):
    """Two running requests with the same 32-token prefix: caching strategies store it once."""
    name, opts = case
    s = build(name, 512, 128, **opts)
    prefix = np.arange(100, 132, dtype=np.int32)
    a = np.concatenate([prefix, np.arange(0, 10, dtype=np.int32), np.zeros(10, np.int32)])
    b = np.concatenate([prefix, np.arange(50, 60, dtype=np.int32), np.zeros(10, np.int32)])
    assert s.admit(0, a, 51, 42, 64).admitted
    s.grow(0, 1)  # a's prompt is computed: caching strategies now hold it
    adm = s.admit(1, b, 51, 42, 64)
    s.check_invariants()
    shares = s.caches_prefixes
    assert adm.cached_tokens == (32 if shares else 0)
    assert s.slot_states(None).token == (42 + 1 + 10 if shares else 42 + 1 + 42)
