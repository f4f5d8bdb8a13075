"""Eviction policies (strategies/eviction/) on their own: exact eviction orders on scripted
streams (the textbook ARC and S3-FIFO runs, worked by hand from the papers' pseudo-code),
random event sequences with check() after each against a model of the evictable set, and
Belady's optimality: on the same demand-paging stream (unit keys, evict one key only when a
missing key enters a full cache), no policy hits more often than Belady."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench.strategies.eviction import make_policy
from kvbench.strategies.eviction.arc import ARC
from kvbench.strategies.eviction.base import POLICIES
from kvbench.strategies.eviction.belady import Belady
from kvbench.strategies.eviction.lru import TimedLRU

ONLINE = [p for p in POLICIES if p != "belady"]


def cache_run(policy, stream, capacity, textbook=False):
    """Demand paging: a hit is a use (a strategy's remove then insert; `textbook`: touch), a
    miss on a full cache evicts one victim first. Returns (hits, evicted keys in order)."""
    policy.bind(capacity)
    hits, evicted = 0, []
    for t, key in enumerate(stream):
        if isinstance(policy, Belady):
            policy.request(t)
        if key in policy:
            hits += 1
            if textbook:
                policy.touch(key)
            else:
                policy.remove(key)
                policy.insert(key)
            continue
        if len(policy) >= capacity:
            if textbook and isinstance(policy, ARC):
                policy.miss(key)
            evicted.append(policy.victim())
        policy.insert(key)
        policy.check()
    return hits, evicted


def belady_for(stream):
    return Belady({t: [k] for t, k in enumerate(stream)})


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="eviction must be one of"):
        make_policy("mru")


@pytest.mark.parametrize("name, stream, capacity, expected", [
    ("lru", "abcad", 3, ["b"]),
    ("lru", "abcabdeb", 3, ["c", "a"]),
    ("fifo", "abcad", 3, ["a"]),  # a use does not move a key
    ("fifo", "abcabdeb", 3, ["a", "b", "c"]),
    ("lfu", "aabcd", 3, ["b"]),  # b and c used once: the least recent of them
    ("lfu", "aabbcdc", 3, ["c", "d"]),
])
def test_simple_orders(name, stream, capacity, expected):
    assert cache_run(make_policy(name), stream, capacity)[1] == list(expected)


def test_slru_order():
    """4 keys, protected 50 % (2 keys). a, b used again: protected; c, d probationary; e evicts
    the probationary least recent (c); a third protected key (d) demotes the protected least
    recent (a) to the probationary most recent end, so f evicts e, then g evicts a."""
    p = make_policy({"name": "slru", "protected": 0.5})
    assert cache_run(p, "abcdabedfg", 4)[1] == ["c", "e", "a"]
    assert list(p._prot) == ["b", "d"] and list(p._prob) == ["f", "g"]


def test_arc_textbook_sequence():
    """ARC as in the paper (c = 2; `miss` announces the key before REPLACE): a b a c b d a.
    c: T1 = [b] > p = 0 evicts b (to B1). b (in B1): p = 1; REPLACE: |T1| = 1 not > 1, so T2's
    LRU a goes (to B2). d: |T1| = 1 not > p: T2's b. a (in B2): p = 0; |T1| = 2 > 0: c."""
    p = ARC()
    assert cache_run(p, "abacbda", 2, textbook=True)[1] == ["b", "a", "b", "c"]
    assert (list(p.t1), list(p.t2), list(p.b1), list(p.b2), p.p) == (["d"], ["a"], ["c"], ["b"], 0)


def test_arc_in_a_pool_adapts_after_the_eviction():
    """In a pool the missing key is not known when room is made: the same stream without `miss`
    evicts c, not a, at the fourth miss (p moves when b enters)."""
    p = ARC()
    assert cache_run(p, "abacbda", 2)[1] == ["b", "c", "a", "b"]
    assert p.p == 0 and list(p.t2) == ["a"] and list(p.t1) == ["d"]


def test_s3fifo_textbook_sequence():
    """S3-FIFO, capacity 4, small queue 1 key: a b c d fill S; a is used. e: S's oldest a was
    used: moves to M; b was not: evicted to G. b (a ghost) enters M after c is evicted; f evicts d."""
    p = make_policy({"name": "s3fifo", "small": 0.25})
    assert cache_run(p, "abcdaebf", 4, textbook=True)[1] == ["b", "c", "d"]
    assert list(p.s) == ["e", "f"] and list(p.m) == ["a", "b"] and list(p.g) == ["c", "d"]


def test_s3fifo_main_queue_is_a_clock():
    """M's oldest key with a count goes back to M's head with count - 1."""
    p = make_policy({"name": "s3fifo", "small": 0.5})  # capacity 2: S holds 1
    p.bind(2)
    for k in "ab":
        p.insert(k)
    p.touch("a"), p.touch("b")
    assert p.victim() == "a"  # S = [a, b], both used: both move to M (count 0); M's oldest goes
    assert list(p.m) == ["b"] and list(p.s) == []


def test_belady_evicts_the_farthest_next_use():
    stream = "abcdabeabcde"
    hits, evicted = cache_run(belady_for(stream), stream, 3)
    # at d (t=3): next uses a 4, b 5, c 9 → c; at e (t=6): a 7, b 8, d 10 → d; at c (t=9): e 11? a never, b never
    assert evicted[:2] == ["c", "d"] and hits == 5


def test_timed_lru_orders_by_last_use_time():
    """radix's LRU: a key that enters late with an old last-use time goes first."""
    p = TimedLRU()
    p.insert("x", 5), p.insert("y", 9), p.insert("parent", 2)
    assert [p.victim() for _ in range(3)] == ["parent", "x", "y"]


events = st.lists(st.tuples(st.sampled_from(["insert", "remove", "touch", "victim"]), st.integers(0, 12)),
                  max_size=80)


@pytest.mark.parametrize("name", [*ONLINE, "belady"])
@settings(max_examples=60, deadline=None)
@given(ops=events, capacity=st.integers(1, 8))
def test_random_events_keep_the_evictable_set(name, ops, capacity):
    """The policy's keys are exactly the evictable keys of a model (inserted, not removed or
    evicted); a victim is one of them; check() holds after every event."""
    p = belady_for([k for _, k in ops]) if name == "belady" else make_policy(name)
    p.bind(capacity)
    evictable: set[int] = set()
    for t, (kind, key) in enumerate(ops):
        if name == "belady":
            p.request(t)
        if kind == "insert" and key not in evictable:
            p.insert(key)
            evictable.add(key)
        elif kind == "remove":
            p.remove(key)
            evictable.discard(key)
        elif kind == "touch" and key in evictable:  # (touch: an evictable key was used)
            p.touch(key)
        elif kind == "victim" and evictable:
            v = p.victim()
            assert v in evictable
            evictable.discard(v)
        assert set(p) == evictable and len(p) == len(evictable)
        assert all(k in p for k in evictable)
        p.check()


@settings(max_examples=150, deadline=None)
@given(stream=st.lists(st.integers(0, 9), min_size=1, max_size=60), capacity=st.integers(1, 6))
def test_no_policy_beats_belady(stream, capacity):
    """On one demand-paging stream, Belady's hits >= every online policy's (MIN is optimal
    for unit-size demand paging); and LRU's equal its stack-distance count."""
    best = cache_run(belady_for(stream), stream, capacity)[0]
    for name in ONLINE:
        assert cache_run(make_policy(name), stream, capacity)[0] <= best, name
    stack, lru_hits = [], 0  # LRU hits = accesses whose stack distance < capacity
    for k in stream:
        if k in stack:
            lru_hits += stack.index(k) < capacity
            stack.remove(k)
        stack.insert(0, k)
    assert cache_run(make_policy("lru"), stream, capacity)[0] == lru_hits


def test_belady_without_a_future_is_refused():
    with pytest.raises(ValueError, match="belady is offline"):
        make_policy("belady")
    assert make_policy({"name": "belady", "future": {0: ["k"]}}).next_use("k") == 0
