"""LRU's one-pass hit-rate curve (kvbench/traces/stack_distance.py) against the real thing:
PagedStrategy with LRU eviction, served one request at a time with the cache trimmed to C pages
after each request (experiments/eviction_curves.py's `replay`), at many capacities.

Asserted exactly: (1) the depths equal a literal LRU stack (a Python list, pages moved to the
front in release order); (2) hit tokens equal paged's replay with `dedup_touch=True` at every
capacity drawn, and with the default `dedup_touch=False` at every capacity below the curve's
`first_duplicate_depth`; (3) a scripted trace where the default replay departs from the curve
above that depth (the condition is needed, not cautious); (4) the merge-sort-tree count equals
a brute-force count."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbench.request import Request
from kvbench.traces import multi_turn, shared_prefix
from kvbench.traces.belady import block_references, unbounded_hits
from kvbench.traces.stack_distance import NEVER, _count_later_prev, lru_curve, release_order

_spec = importlib.util.spec_from_file_location(
    "eviction_curves", Path(__file__).resolve().parents[1] / "experiments" / "eviction_curves.py")
curves_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curves_mod)


def items_of(reqs):
    return [(np.asarray(r.tokens, dtype=np.int32), r.prompt_len, r.prompt_len + r.output_len - 1) for r in reqs]


def replay(reqs, capacity, ps, dedup_touch=False):
    items = items_of(reqs)
    room = max(-(-kv // ps) for _, _, kv in items) + 1
    return curves_mod.replay(items, "lru", capacity, ps, room, dedup_touch=dedup_touch)


def literal_depths(refs):
    """The LRU stack as a list (most recent first); each request's pages move to the front in
    release order (its last page first, so its first page ends on top)."""
    stack, out = [], np.full(len(refs.node), NEVER, dtype=np.int64)
    for i in range(len(refs.starts) - 1):
        lo, hi = int(refs.starts[i]), int(refs.starts[i + 1])
        for r in range(lo, hi):
            x = int(refs.node[r])
            if x in stack:
                out[r] = stack.index(x) + 1
        for r in range(hi - 1, lo - 1, -1):
            x = int(refs.node[r])
            if x in stack:
                stack.remove(x)
            stack.insert(0, x)
    return out


@st.composite
def traces(draw):
    """Requests over a 3-token alphabet: new prompts, continuations of an earlier request's
    prompt and outputs (a chat's next turn), and exact repeats (page-aligned prompts whose last
    page is cached but not hittable: the duplicates)."""
    ps = draw(st.sampled_from([1, 2, 4]))
    toks = lambda lo, hi: np.asarray(draw(st.lists(st.integers(0, 2), min_size=lo, max_size=hi)), dtype=np.int32)  # noqa: E731
    reqs = []
    for i in range(draw(st.integers(1, 18))):
        kind = draw(st.sampled_from(["new", "next", "repeat"])) if reqs else "new"
        if kind == "new":
            prompt = toks(1, 20)
        else:
            src = reqs[draw(st.integers(0, len(reqs) - 1))]
            if kind == "next":
                prompt = np.concatenate([src.tokens[:src.prompt_len + src.output_len - 1], toks(0, 6)])
            else:
                prompt = src.prompt.copy()
        if len(prompt) == 0:
            prompt = toks(1, 3)
        output = src.output.copy() if kind == "repeat" and draw(st.booleans()) else toks(1, 9)
        reqs.append(Request(i, float(i), prompt, output))
    return ps, reqs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(), st.data())
def test_one_pass_equals_paged_lru_replays(trace, data):
    ps, reqs = trace
    curve = lru_curve(reqs, ps)
    assert np.array_equal(curve.depth, literal_depths(curve.refs))
    distinct = curve.refs.num_blocks
    caps = sorted(set(data.draw(st.lists(st.integers(0, distinct + 2), min_size=1, max_size=6))) | {distinct})
    at = curve.hit_tokens(caps)
    for c, tokens in zip(caps, at):
        assert curve.hits(c).hit_tokens == tokens
        assert replay(reqs, c, ps, dedup_touch=True) == tokens, c
        if curve.exact_for_default_paged(c):
            assert replay(reqs, c, ps) == tokens, c
    # every page the trace ever re-reads fits: LRU serves what an unbounded cache serves
    assert at[-1] == unbounded_hits(curve.refs).hit_tokens


def test_default_paged_departs_above_the_first_duplicate():
    """Page size 2, one output token each. Request 2 repeats request 0's one-page prompt, which it
    may not hit (a server computes the last prompt token): a duplicate of a page cached at depth
    2. The curve (and dedup_touch=True) move that page up; the default keeps its old place, so at
    C = 3 it is evicted before request 1's page and request 5 misses it (2 hit tokens, not 4).
    Below the first duplicate's depth all three agree."""
    prompts = [[1, 2], [1, 0, 0], [1, 2], [0, 0, 1, 1], [0, 0, 1, 1], [1, 2, 2, 0]]
    reqs = [Request(i, float(i), np.asarray(p, dtype=np.int32), np.array([7], dtype=np.int32))
            for i, p in enumerate(prompts)]
    curve = lru_curve(reqs, 2)
    assert curve.first_duplicate_depth == 2
    got = [(int(curve.hit_tokens([c])[0]), replay(reqs, c, 2, dedup_touch=True), replay(reqs, c, 2))
           for c in range(7)]
    assert got == [(0, 0, 0), (2, 2, 2), (2, 2, 2), (4, 4, 2), (4, 4, 4), (4, 4, 4), (4, 4, 4)]


@pytest.mark.parametrize("make, ps", [(lambda: multi_turn(num_chats=10, seed=5, rate=2.0, limit=50), 4),
                                      (lambda: shared_prefix(num_groups=4, questions_per_group=10, seed=2), 16)])
def test_generated_traces_at_eight_capacities(make, ps):
    reqs = sorted(make(), key=lambda r: (r.arrival_s, r.id))
    curve = lru_curve(reqs, ps)
    d = curve.refs.num_blocks
    caps = sorted({max(1, int(round(c))) for c in np.geomspace(0.01 * d, d, 8)})
    assert len(caps) == 8
    got = curve.hit_tokens(caps)
    assert got[0] < got[-1]  # the curve rises: the test compares something
    for c, tokens in zip(caps, got):
        assert replay(reqs, c, ps) == tokens and curve.exact_for_default_paged(c)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=0, max_size=60), st.data())
def test_merge_sort_tree_count_equals_brute_force(points, data):
    pts = sorted((max(a, b) + 1, min(a, b)) for a, b in points)  # (j, prev) with prev < j, sorted by j
    j = np.asarray([a for a, _ in pts], dtype=np.int64)
    prev = np.asarray([b for _, b in pts], dtype=np.int64)
    qs = data.draw(st.lists(st.tuples(st.integers(0, 45), st.integers(0, 45)), max_size=20))
    s = np.asarray([a for a, _ in qs], dtype=np.int64)
    p = np.asarray([b for _, b in qs], dtype=np.int64)
    want = [sum(1 for jj, pp in pts if jj < ss and pp > qq) for ss, qq in qs]
    assert _count_later_prev(j, prev, s, p).tolist() == want


def test_release_order_reverses_each_request():
    reqs = [Request(0, 0.0, np.arange(8, dtype=np.int32), np.array([9], dtype=np.int32)),
            Request(1, 1.0, np.arange(4, dtype=np.int32), np.array([9], dtype=np.int32))]
    refs = block_references(reqs, 2)  # request 0: 4 pages, request 1: 2 pages
    assert release_order(refs).tolist() == [3, 2, 1, 0, 5, 4]
