"""The host-memory tier of paged and radix (issue 14; strategies/host_tier.py).

Scripted sequences with exact pages (evict → host, host hit → which GPU pages, host_tokens, the
order of copies, the host's eviction order), the retry memo across host events, pure queries,
hypothesis operation sequences through the content model (a host hit must bring back the right
ids; check_invariants() after every call: no content in both tiers, GPU and host slots exact),
hits with a host tier >= hits without on a sequential stream, and config errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from content_model import Checked, Driver, family_tokens, fingerprint
from kvbench.strategies.base import Admission, HostStates, SlotStates
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy
from strategy_cases import build


def ids(*ranges: tuple[int, int]) -> np.ndarray:
    return np.concatenate([np.arange(a, b, dtype=np.int32) for a, b in ranges])


A, B = ids((0, 12)), ids((100, 116))  # 3 and 4 pages of 4


# ---- paged ----------------------------------------------------------------------------------
def paged_after_a_and_b() -> tuple[Driver, PagedStrategy]:
    """Pool of 4 pages of 4, host of 3 pages: a (3 pages) cached, then b (4 pages) evicts it to the host."""
    s = PagedStrategy(capacity_tokens=16, max_model_len=64, page_size=4, host_tier_tokens=12)
    d = Driver(s)
    assert d.admit(1, A, 12, 12, 12) == (True, 0)  # pages 0, 1, 2
    d.release(1)  # cached, tail first into the LRU: 2, 1, 0
    assert s.host_states() == HostStates(cached=0, free=12)
    assert d.admit(2, B, 16, 16, 16) == (True, 0)  # fresh page 3, then evicts 2, 1, 0 → host pages 0, 1, 2
    assert s.page_table(2).tolist() == [3, 2, 1, 0]
    assert d.host_copies == [("d2h", 2, 0), ("d2h", 1, 1), ("d2h", 0, 2)]
    d.host_copies.clear()
    return d, s


def test_paged_evicted_pages_go_to_the_host_in_lru_order():
    d, s = paged_after_a_and_b()
    assert d.host_slots.tolist() == [8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]  # host page 0 holds a's page 2
    assert s.slot_states(None) == SlotStates(token=16, reserved=0, internal=0, external=0, cached=0, free=0)
    assert s.host_states() == HostStates(cached=12, free=0)
    assert s.take_host_moves() == (12, 0) and s.take_host_moves() == (0, 0)  # handed over once


def test_paged_host_hit_loads_pages_back_and_frees_the_host_copy():
    d, s = paged_after_a_and_b()
    d.release(2)  # b cached: LRU 0 (ids 112..), 1 (108..), 2 (104..), 3 (100..)
    s.take_host_moves()
    before = fingerprint(s, d.live)
    assert s.cached_prefix_len(A, 12) == 8  # 2 pages from the host (the 3rd page: at least one id to compute)
    assert fingerprint(s, d.live) == before  # a pure query
    adm = d.admit(3, A, 12, 12, 12)
    assert adm == Admission(True, 8, 8) and adm.host_tokens == 8
    # the two host hits are pinned; their GPU pages come from evicting b's pages 0 and 1 (to the
    # host: a's unpinned page 2, then b's page 0 copy, are dropped to make room), then the
    # copies back; the rest of the prompt takes page 2 (b's 104.. to the host)
    assert d.host_copies == [("d2h", 0, 0), ("d2h", 1, 0), ("h2d", 2, 0), ("h2d", 1, 1), ("d2h", 2, 1)]
    assert s.page_table(3).tolist() == [0, 1, 2]
    assert s.take_host_moves() == (12, 8)
    assert d.host_slots[:8].tolist() == [108, 109, 110, 111, 104, 105, 106, 107]
    assert s.host_states() == HostStates(cached=8, free=4)
    assert s.cached_prefix_len(B, 16) == 12  # b: page 3 on the GPU, then two pages on the host
    summary = s.summary()
    assert (summary["prefix_hit_tokens_gpu"], summary["prefix_hit_tokens_host"]) == (0, 8)
    assert (summary["host_d2h_tokens"], summary["host_h2d_tokens"], summary["host_evicted_tokens"]) == (24, 8, 8)
    d.release_all()


def test_paged_host_drops_least_recently_demoted_first_and_a_reload_is_recent_again():
    s = PagedStrategy(capacity_tokens=64, max_model_len=64, page_size=4, host_tier_tokens=8)  # host: 2 pages
    d = Driver(s)
    x, y, z, w = (ids((k, k + 4)) for k in (0, 50, 70, 90))

    def cache_and_demote(rid, t):  # one full page, cached at release, then evicted to the host
        d.admit(rid, t, 4, 4, 4)
        d.release(rid)
        assert d.evict(4) == 4

    def on_host(t):
        return s.cached_prefix_len(np.append(t, 1).astype(np.int32), 5) == 4

    for rid, t in enumerate((x, y, z)):
        cache_and_demote(rid, t)
    assert (on_host(x), on_host(y), on_host(z)) == (False, True, True)  # x, demoted first, dropped for z
    assert d.admit(9, np.append(y, 1).astype(np.int32), 5, 5, 5) == Admission(True, 4, 4)
    d.release(9)
    assert d.evict(4) == 4  # y's page back to the host: demoted after z now
    cache_and_demote(10, w)
    assert (on_host(y), on_host(z), on_host(w)) == (True, False, True)
    assert s.summary()["host_evicted_tokens"] == 8
    d.release_all()


def test_paged_a_page_registered_on_the_gpu_drops_its_host_copy():
    """One tier per content: a request that recomputes a page the host holds (its earlier page
    is gone, so it could not hit it) supersedes the host copy."""
    s = PagedStrategy(capacity_tokens=12, max_model_len=64, page_size=4, host_tier_tokens=8)
    d = Driver(s)
    d.admit(0, A, 12, 12, 12)
    d.release(0)  # pages 2, 1, 0 cached (2 least recent)
    d.admit(1, ids((200, 208)), 8, 8, 8)  # evicts 2 then 1 → host
    d.release(1)
    d.admit(2, ids((300, 304), (4, 12)), 12, 12, 12)  # ids 4..11 after another page: different hashes
    assert s.host_states().cached == 8
    s.check_invariants()
    d.release_all()


def test_paged_retry_memo_stays_exact_across_host_moves():
    """A refused request keeps its match (leading GPU hits); its hit page then moves to the host:
    the retry finds it there (check_invariants compares the memo with a match from scratch)."""
    s = PagedStrategy(capacity_tokens=32, max_model_len=64, page_size=4, host_tier_tokens=16)
    d = Driver(s)
    d.admit(0, A, 12, 12, 12)
    d.release(0)  # pages 0, 1, 2 cached (LRU: 2, 1, 0)
    d.admit(1, ids((500, 528)), 28, 20, 20)  # pages 3..7, running
    big = ids((0, 8), (600, 620))
    assert not d.admit(2, big, 28, 28, 28).admitted  # hits pages 0, 1; needs 5 more: refused, memo kept
    assert d.grow(1, 4)  # evicts page 2 (not a memo hit) to the host
    assert s._hit_memo.hits == [0, 1]
    assert d.grow(1, 4)  # evicts page 1, the memo's 2nd hit, to the host: the memo is cut there
    assert s._hit_memo.hits == [0] and d.host_copies[-1] == ("d2h", 1, 1)
    s.check_invariants()  # (the memo equals a match from scratch)
    assert s.cached_prefix_len(big, 28) == 8
    d.release(1)
    adm = d.admit(2, big, 28, 28, 28)
    assert adm == Admission(True, 8, 4) and s.page_table(2).tolist()[0] == 0
    d.release_all()


# ---- radix ----------------------------------------------------------------------------------
def test_radix_evicted_leaf_stays_in_the_tree_on_the_host_and_comes_back():
    s = RadixStrategy(capacity_tokens=16, max_model_len=64, page_size=4, host_tier_tokens=32)
    d = Driver(s)
    d.admit(1, A, 12, 12, 12)  # private pages 0, 1, 2
    d.release(1)  # node a: 12 ids, pages [0, 1, 2], an unlocked leaf
    d.admit(2, B, 16, 16, 16)  # needs 4 pages: a moves to host pages 0, 1, 2; b takes 2, 1, 0, 3
    assert s.page_table(2).tolist() == [2, 1, 0, 3]
    (node_a,) = [n for n in s.root.children.values() if n.pages is None]
    assert s._host_pages[node_a].tolist() == [0, 1, 2] and len(s.root.children) == 1
    assert d.host_slots[:12].tolist() == list(range(12))
    assert s.take_host_moves() == (12, 0)
    d.release(2)  # node b: 16 ids on pages [2, 1, 0, 3]
    assert s.cached_prefix_len(A, 12) == 8  # host hits count in the pure query
    adm = d.admit(3, A, 12, 12, 12)
    # a splits at 8 (upper: host pages 0, 1); b (least recent device leaf) moves to host pages
    # 3..6; the upper part comes back on b's pages 3, 0; the 3rd position block takes page 1
    assert adm == Admission(True, 8, 8)
    assert s.page_table(3).tolist() == [3, 0, 1]
    assert s.take_host_moves() == (16, 8)
    assert s.host_states() == HostStates(cached=20, free=12)  # a's lower part (1 page) and b (4)
    d.release(3)  # its ids 8..11 meet a's lower part on the host: adopted (its page 1), host copy freed
    assert s.host_states() == HostStates(cached=16, free=16)
    assert s.slot_states(None).cached == 12 and s.take_host_moves() == (0, 0)
    assert d.admit(4, B, 16, 16, 16) == Admission(True, 12, 12)  # b back from the host
    summary = s.summary()
    assert (summary["prefix_hit_tokens_gpu"], summary["prefix_hit_tokens_host"]) == (0, 20)
    d.release_all()


def test_radix_a_node_larger_than_the_free_host_is_dropped_and_host_leaves_go_first():
    s = RadixStrategy(capacity_tokens=16, max_model_len=64, page_size=4, host_tier_tokens=16)
    d = Driver(s)
    d.admit(1, A, 12, 12, 12)
    d.release(1)
    d.admit(2, B, 16, 16, 16)  # a → host pages 0, 1, 2
    d.release(2)
    adm = d.admit(3, A, 12, 12, 12)
    # loading a's first 8 ids (pinned) needs 2 GPU pages: b (4 pages) must leave the GPU; the
    # host drops a's lower part (its only leaf) and still has room for 2 pages < 4: b is dropped
    assert adm == Admission(True, 8, 8) and s.page_table(3).tolist() == [3, 0, 1]
    assert s.cached_prefix_len(B, 16) == 0
    assert s.summary()["host_evicted_tokens"] == 4 and s.host_states() == HostStates(cached=0, free=16)
    d.release_all()


def test_radix_host_drops_the_least_recently_used_host_leaf_first():
    s = RadixStrategy(capacity_tokens=64, max_model_len=64, page_size=4, host_tier_tokens=8)  # host: 2 pages
    d = Driver(s)
    x, y, z = (ids((k, k + 4)) for k in (0, 50, 70))
    for rid, t in enumerate((x, y, z)):  # a one-page leaf each, demoted at once: x, y, then z
        d.admit(rid, t, 4, 4, 4)
        d.release(rid)
        assert d.evict(4) == 4

    def on_host(t):
        return s.cached_prefix_len(np.append(t, 1).astype(np.int32), 5) == 4

    assert (on_host(x), on_host(y), on_host(z)) == (False, True, True)  # x, least recently used, dropped
    # each request reuses GPU page 0 (freed by the demotion before it); z reuses x's host page 0
    assert d.host_copies == [("d2h", 0, 0), ("d2h", 0, 1), ("d2h", 0, 0)]
    assert len(s.root.children) == 2 and s.summary()["host_evicted_tokens"] == 4
    d.release_all()


def test_radix_retry_memo_stays_exact_when_its_path_moves_to_the_host():
    s = RadixStrategy(capacity_tokens=32, max_model_len=64, page_size=4, host_tier_tokens=32)
    d = Driver(s)
    d.admit(0, A, 12, 12, 12)
    d.release(0)  # node a: pages 0, 1, 2
    d.admit(1, ids((500, 528)), 28, 20, 20)  # pages 3..7, running
    big = ids((0, 8), (600, 620))
    assert not d.admit(2, big, 28, 28, 28).admitted  # memo: 8 ids into node a
    (node_a,) = s._match_memo.nodes
    assert d.grow(1, 4)  # a (the only unlocked leaf) moves to the host; the memo still ends in it
    assert node_a.pages is None and s._match_memo.nodes == [node_a]
    s.check_invariants()  # (the memo equals a match from scratch)
    assert s.cached_prefix_len(big, 28) == 8
    d.release(1)
    assert d.admit(2, big, 28, 28, 28) == Admission(True, 8, 8)
    d.release_all()


# ---- properties -----------------------------------------------------------------------------
# host tiers of 2x the pool down to a few pages, each host policy, with other options of the
# strategies (GPU eviction policies, visibility, admission, dedup_touch) mixed in
HOST_CASES = [("paged", {"page_size": 3, "host_tier_tokens": 96, "dedup_touch": True, "prefix_visibility": "scheduled"}),
              ("paged", {"page_size": 1, "host_tier_tokens": 20, "host_tier_eviction": "s3fifo"}),
              ("paged", {"page_size": 2, "host_tier_tokens": 24, "host_tier_eviction": "lfu", "eviction": "arc"}),
              ("radix", {"page_size": 1, "host_tier_tokens": 96, "eviction": "lfu", "min_cache_len": 5}),
              ("radix", {"page_size": 2, "host_tier_tokens": 10, "host_tier_eviction": "arc"}),
              ("radix", {"page_size": 3, "host_tier_tokens": 48, "prefix_visibility": "scheduled",
                         "host_tier_eviction": "slru", "cache_outputs": False})]

op = st.one_of(st.tuples(st.just("admit"), st.integers(0, 2), st.integers(2, 40), st.integers(1, 8),
                         st.integers(1, 40), st.booleans()),
               st.tuples(st.just("grow"), st.integers(0, 50), st.integers(1, 8)),
               st.tuples(st.just("release"), st.integers(0, 50), st.booleans()),
               st.tuples(st.just("evict"), st.integers(1, 48)))


def admit(d: Driver, rid, tokens, kv_len, num_prompt, max_new) -> bool:
    """An admit through the driver, after the pure query that must predict its hit (host part
    included) and change nothing."""
    before = fingerprint(d.s, d.live)
    predicted = d.s.cached_prefix_len(tokens, num_prompt)
    assert fingerprint(d.s, d.live) == before, "cached_prefix_len changed the strategy"
    adm = d.admit(rid, tokens, kv_len, num_prompt, max_new)
    assert not adm.admitted or adm.cached_tokens == predicted, (adm, predicted)
    return adm.admitted


def play(d: Driver, ops, rng) -> None:
    """Ops through the driver (content and check_invariants() after each call); a refused
    request is retried under its id, a release may be a preemption."""
    s, waiting, next_id = d.s, [], 0
    for o in ops:
        if o[0] == "admit":
            _, family, prompt, output, max_new, retry = o
            if retry and waiting:
                rid, tokens, kv_len, num_prompt = waiting[0]
                if admit(d, rid, tokens, kv_len, num_prompt, max_new):
                    waiting.pop(0)
                continue
            kv_len = prompt + output - 1
            if not s.never_fits(kv_len):
                tokens = family_tokens(rng, 2, family, prompt, output)
                if not admit(d, next_id, tokens, kv_len, prompt, max_new):
                    waiting.append((next_id, tokens, kv_len, prompt))
                next_id += 1
        elif o[0] in ("grow", "release") and d.live:
            rid = sorted(d.live)[o[1] % len(d.live)]
            lv = d.live[rid]
            if o[0] == "grow":
                n = min(o[2], lv.kv_len - lv.length)
                if n:
                    d.grow(rid, n)
            else:
                d.release(rid)
                if o[2] and lv.length < lv.kv_len:
                    waiting.insert(0, (rid, lv.tokens, lv.kv_len, max(lv.num_prompt, lv.length)))
        elif o[0] == "evict":
            d.evict(o[1])
        hs = s.host_states()
        assert hs.total == s.host_tier_tokens and s.slot_states(None).total == s.capacity
    d.release_all()
    assert s.slot_states(None).free == s.capacity  # everything cached went to the host or was dropped


@pytest.mark.parametrize("name, opts", HOST_CASES, ids=[f"{n}-{o}" for n, o in HOST_CASES])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40), seed=st.integers(0, 2**16))
def test_random_operations_keep_one_owner_tier_and_serve_the_right_content(name, opts, ops, seed):
    play(Driver(build(name, 48, 48, **opts)), ops, np.random.default_rng(seed))


def sequential_hits(s, requests) -> tuple[int, int]:
    """Each request admitted whole, grown to its end and released before the next. (hits, host hits)."""
    hits = host = 0
    for rid, (tokens, kv_len, prompt) in enumerate(requests):
        adm = s.admit(rid, tokens, kv_len, prompt, prompt)
        assert adm.admitted
        hits, host = hits + adm.cached_tokens, host + adm.host_tokens
        if kv_len > prompt:
            assert s.grow(rid, kv_len - prompt)
        s.release(rid)
    return hits, host


@pytest.mark.parametrize("name, ps", [("paged", 4), ("radix", 1), ("radix", 4)])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), host_pages=st.integers(1, 40), n=st.integers(5, 40))
def test_a_host_tier_never_loses_hits_on_a_sequential_stream(name, ps, seed, host_pages, n):
    """LRU on the GPU, LRU on the host, one request at a time, whole prompts: the GPU holds the
    same most recent pages with or without the host tier (the same pages are in use: a host hit
    takes the pages a miss would have computed into), and the host holds the next ones, so the
    cached set only grows. Not so with concurrent, chunked admissions: a host hit makes an
    admission hold its prefix and its chunk at once, which may evict pages the run without a
    host tier keeps, and a small host tier may drop them (random streams of 3 concurrent
    requests, chunks of 8, 8-token host tier: fewer hits in 5 of 200 paged and 9 of 200 radix
    streams; with a host tier of 2x the pool, none)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(n):
        prompt, output = int(rng.integers(4, 40)), int(rng.integers(1, 8))
        reqs.append((family_tokens(rng, 3, int(rng.integers(4)), prompt, output), prompt + output - 1, prompt))
    base, host0 = sequential_hits(build(name, 64, 64, page_size=ps), reqs)
    with_host, from_host = sequential_hits(build(name, 64, 64, page_size=ps, host_tier_tokens=host_pages * ps), reqs)
    assert host0 == 0 and from_host >= 0 and with_host >= base


@pytest.mark.parametrize("name, opts", [("paged", {"page_size": 4}), ("radix", {"page_size": 1})])
def test_scheduler_replay_under_pressure_serves_host_hits_with_the_right_content(name, opts):
    """The real scheduler on a pool too small for the load (preemptions), every strategy call
    checked against the content model; the host tier (2x the pool) serves hits."""
    import inspect

    from test_scheduler import req

    from kvbench.engines.sim import SimEngine
    from kvbench.replay import replay
    from kvbench.scheduler import Scheduler

    # (an engine that charges host copies needs the bytes per token: a 1 KiB token)
    extra = {"kv_bytes_per_token": 1024} if "kv_bytes_per_token" in inspect.signature(SimEngine).parameters else {}
    engine = SimEngine(overhead_s=0.01, prefill_token_s=0.0, decode_token_s=0.0, kv_read_token_s=0.0, **extra)

    strategy = build(name, 512, 512, host_tier_tokens=1024, **opts)
    rng = np.random.default_rng(7)
    reqs = [req(i, int(rng.integers(10, 200)), int(rng.integers(1, 60)), i * 0.005, base=i % 3) for i in range(60)]
    checked = Checked(strategy, check_no_mutation=False, invariants=False)  # (content: every call)
    result = replay(reqs, Scheduler(checked, max_num_seqs=16, max_num_batched_tokens=256), engine, progress=False)
    assert len(result.finished) == 60 and checked.driver.host_hits > 0
    summary = strategy.summary()
    assert summary["prefix_hit_tokens_host"] == checked.driver.host_hits
    assert summary["prefix_hit_tokens_gpu"] + summary["prefix_hit_tokens_host"] == checked.driver.hits
    assert summary["host_h2d_tokens"] == checked.driver.host_hits  # a host hit copies exactly its pages in
    strategy.check_invariants()


# ---- off, config ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PagedStrategy, RadixStrategy])
def test_off_by_default_and_keys_in_the_summary(cls):
    s = cls(capacity_tokens=64, max_model_len=64, page_size=4)
    assert s._host is None and s.host_states() == HostStates(0, 0) and s.take_host_moves() == (0, 0)
    assert s.take_host_copies() == [] and "-host" not in s.label
    summary = s.summary()
    assert summary["host_tier_tokens"] == 0 and summary["prefix_hit_tokens_host"] == 0
    on = cls(capacity_tokens=64, max_model_len=64, page_size=4, host_tier_tokens=130, host_tier_eviction="fifo")
    assert on.host_tier_tokens == 128 and on.label.endswith("-host128-fifo")  # whole pages


@pytest.mark.parametrize("kwargs, match", [
    ({"host_tier_tokens": -4}, "host_tier_tokens must be >= 0"),
    ({"host_tier_tokens": 3}, "host_tier_tokens=3 is less than one page"),
    ({"host_tier_tokens": 64, "host_tier_eviction": "belady"}, "host_tier_eviction must be one of lru, fifo"),
])
def test_bad_host_tier_values_are_refused_when_built(kwargs, match):
    for cls in (PagedStrategy, RadixStrategy):
        with pytest.raises(ValueError, match=match):
            cls(capacity_tokens=64, max_model_len=64, page_size=4, **kwargs)


@pytest.mark.parametrize("overrides, expect", [
    (["strategy=paged", "strategy.host_tier_tokens=-1"], "strategy.host_tier_tokens=-1: must be an integer >= 0"),
    (["strategy=radix", "strategy.host_tier_tokens=1.5"], "strategy.host_tier_tokens=1.5: must be an integer >= 0"),
    (["strategy=radix", "strategy.host_tier_eviction=belady"],
     "strategy.host_tier_eviction='belady': must be one of lru, fifo, lfu, slru, arc, s3fifo"),
])
def test_bad_host_tier_config_is_a_config_error(overrides, expect):
    from test_cli_errors import composed

    from kvbench.schema import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(composed(*overrides))
    assert str(err.value).startswith(expect)


def test_a_bad_host_tier_through_the_cli_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from test_cli_errors import SMALL, cli_main, one_line_error

    out = cli_main(monkeypatch, capsys, "strategy=paged", "strategy.host_tier_tokens=-16", *SMALL,
                   f"hydra.run.dir={tmp_path}")
    one_line_error(out, "strategy.host_tier_tokens=-16: must be an integer >= 0")
    assert not (tmp_path / "summary.json").exists()
