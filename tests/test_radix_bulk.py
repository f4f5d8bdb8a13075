"""radix's bulk decode (`RadixStrategy.decode_steps`) against the per-token path it replaces:
the same slot states after every step, the same pages in every page table, the same free
stack, the same tree, and the same eviction order afterwards (every policy, host tier on/off)."""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.strategies.base import SlotStates
from kvbench.strategies.radix import RadixStrategy


def build(seed: int, capacity: int, running: int = 4, just_prefilled: bool = False,
          **kw) -> tuple[RadixStrategy, list[int]]:
    """A pool with cached leaves (finished requests sharing prefixes), returned pages on the
    free stack, and `running` requests mid-decode, some just past their prefill (all of them
    with `just_prefilled`: their first decode inserts their prompt). Made the same way each
    call (seeded), so two calls give equal strategies."""
    rng = np.random.default_rng(seed)
    st = RadixStrategy(capacity_tokens=capacity, max_model_len=capacity, page_size=1, **kw)
    prefixes = [rng.integers(0, 50, int(rng.integers(4, 20))).astype(np.int32) for _ in range(3)]
    rid, live = 0, []
    for turn in range(10 + running):
        prompt = np.concatenate([prefixes[turn % 3], rng.integers(0, 50, int(rng.integers(2, 12))).astype(np.int32)])
        out = int(rng.integers(30, 60))
        tokens = np.concatenate([prompt, rng.integers(0, 50, out).astype(np.int32)])
        if not st.admit(rid, tokens, len(tokens), len(prompt), len(prompt)).admitted:
            break
        decoded = (0 if just_prefilled else int(rng.integers(0, 6))) if turn >= 10 else int(rng.integers(0, out // 2))
        for _ in range(decoded):
            assert st.grow(rid, 1)
        if turn < 10:
            st.release(rid)  # cached (evictable) leaves, some of them sharing prefixes
        else:
            live.append(rid)
        rid += 1
    st.check_invariants()
    return st, live


def per_token(st: RadixStrategy, rids: list[int], k: int) -> list[tuple]:
    """The per-token path: step by step, one grow(rid, 1) each in order, while free + cached
    slots can give each a page (the quiet-run rule), until a step moves pages to the host."""
    rows = []
    for _ in range(k):
        states = st.slot_states(None)
        if states.free + states.cached < len(rids):
            break
        moved = st._host.d2h_tokens if st._host else 0
        for r in rids:
            assert st.grow(r, 1)
        rows.append(tuple(st.slot_states(None)))
        if st._host and st._host.d2h_tokens != moved:
            break
    return rows


def bulk_rows(st: RadixStrategy, rids: list[int], k: int) -> list[tuple]:
    """`decode_steps` as rows: its 6 columns (appended to lists that already hold a row) zipped."""
    cols = [[-1] for _ in range(6)]
    n = st.decode_steps(rids, k, cols)
    assert all(len(c) == n + 1 and c[0] == -1 for c in cols)
    return list(zip(*(c[1:] for c in cols)))


def tree(st: RadixStrategy) -> list[tuple]:
    out, stack = [], [((), st.root)]
    while stack:
        path, node = stack.pop()
        for key in sorted(node.children, key=repr):
            ch = node.children[key]
            pages = ch.pages.tolist() if ch.pages is not None else ("host", st._host_pages[ch].tolist())
            out.append((path, ch.key.tolist(), pages, ch.lock))
            stack.append((path + tuple(ch.key.tolist()), ch))
    return sorted(out, key=repr)


def same(a: RadixStrategy, b: RadixStrategy, rids: list[int]) -> None:
    for r in rids:
        assert a.page_table(r).tolist() == b.page_table(r).tolist(), f"request {r}: page tables differ"
    assert a._free.tolist() == b._free.tolist() and a._fresh == b._fresh
    assert tuple(a.slot_states(None)) == tuple(b.slot_states(None))
    assert tree(a) == tree(b)
    if a._host:
        assert a._host.take_copies() == b._host.take_copies()


# capacity 150/200: the run ends for lack of free + cached slots; 300: it evicts on the way;
# 2000: free pages only; 300 with a host tier: evicting steps move pages to the host
# running 12: more requests than the inline pops take (numpy for one step too)
CASES = [(seed, cap, ev, host, 4) for seed in range(3)
         for cap, host in ((150, 0), (200, 0), (300, 0), (2000, 0), (300, 96))
         for ev in ("lru", "s3fifo", "arc", "slru")]
CASES += [(seed, cap, "lru", host, 12) for seed in range(3) for cap, host in ((400, 0), (500, 0), (4000, 0), (500, 96))]


@pytest.mark.parametrize("seed, capacity, eviction, host, running", CASES)
def test_decode_steps_equal_per_token_grows(seed, capacity, eviction, host, running):
    kw = {"eviction": eviction, "host_tier_tokens": host, "running": running}
    bulk, rids = build(seed, capacity, **kw)
    ref, _ = build(seed, capacity, **kw)
    assert rids, "the scenario keeps requests running"
    k = min(bulk._seqs[r].kv_len - bulk._seqs[r].length for r in rids)
    while k > 0:  # in chunks, as a quiet run asks (it stops where a host move or the free slots end it)
        got, want = bulk_rows(bulk, rids, min(k, 7)), per_token(ref, rids, min(k, 7))
        assert got == want
        bulk.check_invariants()
        same(bulk, ref, rids)
        if not want:
            break
        k -= len(want)
    # the eviction order afterwards: everything evictable, freed in the policy's order
    for r in rids:
        bulk.release(r)
        ref.release(r)
    bulk.evict(capacity)
    ref.evict(capacity)
    same(bulk, ref, [])
    bulk.check_invariants()


def test_decode_steps_runs_the_bulk_path_and_ends_where_free_and_cached_end():
    st, rids = build(0, 2000)
    before = {r: st._seqs[r].length for r in rids}
    rows = [SlotStates(*r) for r in bulk_rows(st, rids, 5)]
    assert len(rows) == 5 and all(st._seqs[r].length == before[r] + 5 for r in rids)
    assert [r.token for r in rows] == [rows[0].token + j * len(rids) for j in range(5)]
    assert [r.free for r in rows] == [rows[0].free - j * len(rids) for j in range(5)]
    small, rids = build(1, 150)
    k = min(small._seqs[r].kv_len - small._seqs[r].length for r in rids)
    rows = [SlotStates(*r) for r in bulk_rows(small, rids, k)]
    last = rows[-1]
    assert last.free + last.cached < len(rids) and len(rows) == 19 < k  # stopped: no page for each
    small.check_invariants()


def test_decode_steps_of_no_request_repeat_the_states():
    st, _ = build(0, 400)
    cols = [[] for _ in range(6)]
    assert st.decode_steps([], 3, cols) == 3
    assert list(zip(*cols)) == [tuple(st.slot_states(None))] * 3


def test_decode_steps_needs_page_size_one():
    st = RadixStrategy(capacity_tokens=64, max_model_len=64, page_size=4)
    with pytest.raises(ValueError, match="page_size 1"):
        st.decode_steps([], 1, [[] for _ in range(6)])


@pytest.mark.parametrize("capacity", [6000, 3000])
def test_decode_steps_long_run_equals_per_token_grows(capacity):
    """A run of 200 steps x 12 requests (2,400 pages: handed out through numpy's transpose); at
    3,000 slots the pool fills with cached leaves first, so the run evicts on the way."""
    def make():
        rng = np.random.default_rng(7)
        st = RadixStrategy(capacity_tokens=capacity, max_model_len=capacity, page_size=1)
        for rid in range(6):  # cached leaves
            toks = rng.integers(0, 50, 150).astype(np.int32)
            assert st.admit(rid, toks, 150, 100, 100).admitted
            st.release(rid)
        rids = list(range(6, 18))
        for rid in rids:
            toks = rng.integers(0, 50, 230).astype(np.int32)
            assert st.admit(rid, toks, 230, 20, 20).admitted
            assert st.grow(rid, 1)  # decoding
        return st, rids
    bulk, rids = make()
    ref, _ = make()
    assert bulk_rows(bulk, rids, 200) == per_token(ref, rids, 200)
    bulk.check_invariants()
    same(bulk, ref, rids)
    if capacity == 3000:
        assert not bulk.root.children or bulk.slot_states(None).cached < 900  # it evicted


@pytest.mark.parametrize("seed", range(8))
def test_decode_steps_first_decodes_equal_per_token_grows(seed):
    """Every request just past its prefill: the first step's grows insert the prompts. Where
    such an insert only adds a leaf below the request's node, `decode_steps` makes it first and
    the request joins the bulk steps; where the tree already holds its first new id (a
    duplicate freed, a node split), it and every later one take the per-token path. Either way
    the same rows, pages, free stack and tree as per-token grows (seeds with both kinds)."""
    bulk, rids = build(seed, 2000, running=6, just_prefilled=True)
    ref, _ = build(seed, 2000, running=6, just_prefilled=True)
    assert all(bulk._seqs[r].length == bulk._seqs[r].num_prompt for r in rids)
    assert bulk_rows(bulk, rids, 5) == per_token(ref, rids, 5)
    bulk.check_invariants()
    same(bulk, ref, rids)


def test_decode_steps_first_decodes_settle_in_order():
    """Two requests whose prompts start alike, just past their prefill: the first one's insert
    adds a leaf (made before the step); the second one's then meets that leaf (a split and a
    freed duplicate), so it stays on the per-token path, after the first in running order."""
    def make():
        st = RadixStrategy(capacity_tokens=64, max_model_len=64, page_size=1)
        a = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.int32)
        b = np.array([1, 2, 3, 9, 9, 6, 7, 8], dtype=np.int32)
        assert st.admit(0, a, 8, 5, 5).admitted and st.admit(1, b, 8, 5, 5).admitted
        return st
    st, ref = make(), make()
    assert st._settle_first_decodes([st._seqs[0], st._seqs[1]], [0, 1]) == [1]
    assert [ch.key.tolist() for ch in st.root.children.values()] == [[1, 2, 3, 4, 5]]
    st = make()
    assert bulk_rows(st, [0, 1], 3) == per_token(ref, [0, 1], 3)
    same(st, ref, [0, 1])
    assert tree(st) == [((), [1, 2, 3], [0, 1, 2], 2), ((1, 2, 3), [4, 5], [3, 4], 1),
                        ((1, 2, 3), [9, 9], [8, 9], 1)]
    st.check_invariants()


@pytest.mark.parametrize("k, exact", [(1, False), (6, False), (1, True), (6, True)])
def test_decode_steps_from_a_deep_free_stack(k, exact):
    """Runs whose pages all come from the free stack's top (returned pages: no fresh id, no
    eviction), dealt straight from the stack: one step (a pop each) or several (request i gets
    the top's i-th page and every len(rids)-th below it), the stack holding more pages than the
    run takes or exactly as many. The same rows, pages, free stack and tree as per-token grows."""
    def make():
        rng = np.random.default_rng(3)
        st = RadixStrategy(capacity_tokens=1200, max_model_len=1200, page_size=1)
        for rid in range(5):  # cached leaves, then all evicted: their 750 pages on the free stack
            toks = rng.integers(0, 50, 150).astype(np.int32)
            assert st.admit(rid, toks, 150, 150, 150).admitted
            st.release(rid)
        st.evict(1200)
        rids = list(range(10, 17))
        for rid in rids:
            toks = rng.integers(0, 50, 60).astype(np.int32)
            assert st.admit(rid, toks, 60, 20, 20).admitted
            assert st.grow(rid, 1)  # decoding
        if exact:  # a request that leaves exactly the run's pages on the stack (ids no one else has)
            n = len(st._free) - k * len(rids)
            assert st.admit(99, np.arange(100, 100 + n, dtype=np.int32), n, n, n).admitted
        return st, rids
    bulk, rids = make()
    ref, _ = make()
    stack, fresh = len(bulk._free), bulk._fresh
    assert stack >= k * len(rids) and (stack == k * len(rids)) == exact
    assert bulk_rows(bulk, rids, k) == per_token(ref, rids, k)
    assert bulk._fresh == fresh and len(bulk._free) == stack - k * len(rids)  # the stack's pages only
    bulk.check_invariants()
    same(bulk, ref, rids)
