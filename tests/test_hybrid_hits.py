"""The per-kind hit rule (kvbench/strategies/hybrid/hits.py): what each kind reads, and the longest
valid hit against a brute force over every candidate point (hypothesis)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvbench.sizes import LayerGroup
from kvbench.strategies.hybrid import hits

FULL = LayerGroup("full", 1, 1, 1, "float32")
SLIDING = LayerGroup("sliding", 1, 1, 1, "float32", window=5)
CHUNKED = LayerGroup("chunked", 1, 1, 1, "float32", chunk=8)
STATE = LayerGroup("state", 1, 1, 1, "float32", state_bytes=64)


def test_what_each_kind_still_reads():
    assert [hits.first_needed(FULL, p) for p in (0, 3, 100)] == [0, 0, 0]
    # a query at p reads [p - 4, p]: the window of 5 includes itself
    assert [hits.first_needed(SLIDING, p) for p in (0, 3, 4, 5, 100)] == [0, 0, 0, 1, 96]
    assert [hits.first_needed(CHUNKED, p) for p in (0, 7, 8, 17)] == [0, 0, 8, 16]
    assert hits.first_needed(STATE, 9) == 9 and hits.needs_snapshot(STATE) and not hits.needs_snapshot(FULL)


def test_hit_spans_and_their_pages():
    assert hits.hit_span(FULL, 12) == (0, 12)
    assert hits.hit_span(SLIDING, 12) == (8, 12)  # the last window - 1 tokens before the hit point
    assert hits.hit_span(CHUNKED, 12) == (8, 12)
    assert hits.hit_span(CHUNKED, 16) == (16, 16)  # a hit at a chunk boundary needs nothing of it
    assert list(hits.pages_needed(SLIDING, 12, 4)) == [2]
    assert list(hits.pages_needed(SLIDING, 12, 3)) == [2, 3]
    assert list(hits.pages_needed(CHUNKED, 16, 4)) == []


def test_state_layers_hit_only_at_a_snapshot():
    tables = [(FULL, 2), (STATE, 0)]
    everything = lambda t, j: True  # noqa: E731
    assert hits.longest_hit(tables, everything, 11, 2) == 0  # no snapshots kept: nothing
    assert hits.longest_hit(tables, everything, 11, 2, has_snapshot=lambda p: p in (4, 6)) == 6


KINDS = st.sampled_from([FULL, SLIDING, CHUNKED, LayerGroup("sliding", 1, 1, 1, "float32", window=2)])


@given(tables=st.lists(st.tuples(KINDS, st.sampled_from([1, 2, 3, 4])), min_size=1, max_size=4),
       missing=st.sets(st.tuples(st.integers(0, 3), st.integers(0, 20)), max_size=12),
       max_point=st.integers(0, 40))
def test_longest_hit_is_the_largest_point_where_every_table_holds_its_pages(tables, missing, max_point):
    from math import lcm

    step = lcm(*(ps for _, ps in tables))
    present = lambda t, j: (t, j) not in missing  # noqa: E731
    asked = []
    got = hits.longest_hit(tables, lambda t, j: asked.append((t, j)) or present(t, j), max_point, step)
    valid = [p for p in range(0, max_point + 1, step)
             if p == 0 or all(present(t, j) for t, (g, ps) in enumerate(tables) for j in hits.pages_needed(g, p, ps))]
    assert got == max(valid)
    assert len(asked) == len(set(asked))  # each page asked once
