"""Design 3, Jenga (strategies/hybrid/jenga.py), scripted with exact pages and bytes: the large
page is the lcm of the groups' page bytes and splits into each group's small pages; request-aware
placement keeps a request's small pages of one group in its own large pages, so a finished
request returns whole large pages; level-0 eviction frees whole cached large pages, pages that
left a window first; the sliding-window hit rule; and hypothesis runs of random operations
through the hybrid content model with check_invariants after every call. The zero-hit failure of
vLLM #45238 is scripted in tests/test_hybrid_radix.py (every design on one stream)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_content import HybridDriver
from kvbench.sizes import PoolGeometry
from kvbench.strategies.hybrid.base import NULL_PAGE, POOL
from kvbench.strategies.hybrid.jenga import Jenga
from test_strategy_properties import op, play

# 3 sliding layers (window 8) and 2 full layers; 1 KV head of dim 2, float32: 16 B per layer-token.
# page_size 2: a sliding small page is 2 x 48 = 96 B, a full one 2 x 32 = 64 B; lcm 192 B.
MODEL = {"num_layers": 5, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
         "layers": {"pattern": ["local", "local", "local", "global", "global"],
                    "groups": {"local": {"kind": "sliding", "window": 8}, "global": {"kind": "full"}}}}
LOCAL, GLOBAL = 0, 1  # group indices (and table indices: one table per attention group)


def jenga(capacity=48, model=MODEL, page_size=2, **kw) -> Jenga:
    geo = PoolGeometry.of(model, page_size, capacity // page_size)
    return Jenga(capacity, 256, page_size=page_size, geometry=geo, **kw)


def ids(n, start=100):
    return np.arange(start, start + n, dtype=np.int32)


def test_large_page_is_the_lcm_of_the_groups_page_bytes():
    s = jenga()
    assert s.pool_bytes == 48 * 80  # capacity x bytes per token (48 + 32)
    assert (s.large_bytes, s.num_large) == (192, 20)
    assert s.summary()["small_pages_per_large"] == {"local": 2, "global": 3}
    assert [(t.group, t.page_size, t.space_pages, t.page_bytes) for t in s.tables] == [(LOCAL, 2, 40, 96),
                                                                                         (GLOBAL, 2, 60, 64)]
    states = s.group_slot_states(None)
    assert states[POOL].free == 20 * 192 and states["local"].total == states["global"].total == 0


def test_request_aware_placement_and_whole_large_pages_freed():
    s = jenga(prefix_caching=False)
    assert s.admit(0, ids(8), 7, 6, 6).admitted  # 6 positions: 3 small pages in each group
    # local: large pages 0, 1 (small pages 0..3), takes 0, 1, 2; global: large page 2 (small pages 6, 7, 8)
    assert s.table(0, LOCAL).tolist() == [0, 1, 2] and s.table(0, GLOBAL).tolist() == [6, 7, 8]
    assert s.admit(1, ids(8, 200), 7, 6, 6).admitted  # its own large pages: 3, 4 (local), 5 (global)
    assert s.table(1, LOCAL).tolist() == [6, 7, 8] and s.table(1, GLOBAL).tolist() == [15, 16, 17]
    assert s.grow(0, 1)  # page 3: its own free small page 3 (large 1), not request 1's 9 (large 4)
    assert s.table(0, LOCAL).tolist() == [0, 1, 2, 3] and s.table(0, GLOBAL).tolist() == [6, 7, 8, 18]
    states = s.group_slot_states(None)
    assert states[POOL].free == (20 - 7) * 192
    assert states["local"].free == 96 and states["global"].free == 2 * 64  # 9 (request 1's); 19, 20 (request 0's)
    s.release(0)  # large pages 0, 1, 2, 6 empty together: back to the free pool whole
    s.check_invariants()
    states = s.group_slot_states(None)
    assert states[POOL].free == (20 - 3) * 192
    assert states["local"].free == 96 and states["global"].free == 0
    assert sorted(s._free_large)[:4] == [0, 1, 2, 6]


def test_a_request_steals_then_adopts_the_large_pages_of_a_request_that_left():
    s = jenga(capacity=12, prefix_caching=False)  # 5 large pages
    assert s.admit(0, ids(8), 7, 2, 2).admitted  # local: large 0 (small pages 0, 1); global: large 1 (3, 4, 5)
    assert s.admit(1, ids(8, 200), 7, 2, 2).admitted  # local: large 2 (4, 5); global: large 3 (9, 10, 11)
    assert (s.table(0, LOCAL).tolist(), s.table(0, GLOBAL).tolist()) == ([0], [3])
    assert (s.table(1, LOCAL).tolist(), s.table(1, GLOBAL).tolist()) == ([4], [9])
    # one free large page for two groups: only what the free small pages lack (none): request 2
    # takes free small pages of request 0's large pages (Jenga's last resort before eviction)
    assert s.admit(2, ids(8, 300), 7, 2, 2).admitted
    assert (s.table(2, LOCAL).tolist(), s.table(2, GLOBAL).tolist()) == ([1], [4])
    s.release(0)  # its large pages 0 and 1 keep request 2's pages: free small pages 0 and 3, 5 are nobody's
    assert s.grow(2, 2)  # adopts large page 0 (local 0) and 1 (global 5, then 3 is its own)
    assert (s.table(2, LOCAL).tolist(), s.table(2, GLOBAL).tolist()) == ([1, 0], [4, 5])
    assert s.grow(2, 2)  # local: the free large page 4 (small 8); global: its adopted small page 3
    assert (s.table(2, LOCAL).tolist(), s.table(2, GLOBAL).tolist()) == ([1, 0, 8], [4, 5, 3])
    s.check_invariants()
    s.release(2)  # large pages 0, 1 and 4 empty together
    assert sorted(s._free_large) == [0, 1, 4] and s.group_slot_states(None)[POOL].free == 3 * 192


def test_hit_needs_the_window_pages_and_out_of_window_pages_are_evicted_first():
    """Request a computes 40 positions in chunks of 8: its sliding pages before the window (8)
    leave its table (cached, oldest). b shares a's first 20 ids: a hit of 20 needs the full pages
    [0, 20) and the sliding pages of positions [13, 20). Evicting 6 large pages takes exactly the
    12 sliding pages that left a's window: b's hit is then 0 though every full page is cached,
    and a hit of 38 on a's own prompt (window pages [31, 38) were in a's window) still holds."""
    a = ids(41)
    b = np.concatenate([a[:20], ids(10, 500)])
    s = jenga(capacity=96)  # 40 large pages
    assert s.admit(0, a, 40, 40, 8).admitted
    for _ in range(4):
        assert s.grow(0, 8)
    table = s.table(0, LOCAL)  # computed 32: positions before 25 are out of the window
    assert len(table) == 20 and (table[:12] == NULL_PAGE).all() and (table[12:] != NULL_PAGE).all()
    assert (s.table(0, GLOBAL) != NULL_PAGE).all()
    s.release(0)
    assert s.cached_prefix_len(b, 30) == 20 and s.cached_prefix_len(a, 40) == 38
    cached = s.group_slot_states(None)
    assert (cached["local"].cached, cached["global"].cached) == (20 * 96, 20 * 64)
    assert s.evict(14) == 15  # 6 large pages of 192 B: 1152 B >= 14 x 80 B (15 token-equivalents)
    after = s.group_slot_states(None)
    assert (after["local"].cached, after["global"].cached) == (8 * 96, 20 * 64)
    assert s.cached_prefix_len(b, 30) == 0 and s.cached_prefix_len(a, 40) == 38
    adm = s.admit(1, b, 31, 30, 30)
    assert adm.admitted and adm.cached_tokens == 0
    s.check_invariants()


def test_dropped_pages_refresh_ages_window_pages_with_their_prefix():
    """dropped_pages=refresh: the sliding pages a request dropped out of its window are keyed at
    its release like the rest of its pages (deeper first), so evicting 6 large pages takes the
    tail of a's 40 positions, not the window pages of its head: b's 20-token hit stays."""
    a = ids(41)
    b = np.concatenate([a[:20], ids(10, 500)])
    s = jenga(capacity=96, dropped_pages="refresh")
    assert s.admit(0, a, 40, 40, 8).admitted
    for _ in range(4):
        assert s.grow(0, 8)
    s.release(0)
    assert s.evict(14) == 15
    assert s.cached_prefix_len(b, 30) == 20 and s.cached_prefix_len(a, 40) < 38
    s.check_invariants()
    with pytest.raises(ValueError, match="dropped_pages"):
        jenga(dropped_pages="never")


def test_level_0_evicts_the_least_recent_whole_large_page():
    s = jenga(capacity=24)  # 10 large pages
    s.admit(0, ids(7), 6, 6, 6)  # local large 0, 1; global large 2
    s.release(0)
    s.admit(1, ids(7, 300), 6, 6, 6)  # local large 3, 4; global large 5
    s.release(1)
    before = dict(s._lv0)
    assert set(before) == {0, 1, 2, 3, 4, 5}
    s.evict(1)  # request 0's pages are older; of its large pages, the one whose newest key is oldest:
    # a release keys its pages tail first (deeper pages older, vLLM's order): large 1 (local page 2)
    assert set(s._lv0) == {0, 2, 3, 4, 5} and 1 in s._free_large
    assert s.cached_prefix_len(np.concatenate([ids(6), ids(1, 900)]), 7) == 4  # local page 2 is gone
    assert s.cached_prefix_len(np.concatenate([ids(6, 300), ids(1, 900)]), 7) == 6
    s.check_invariants()


def test_state_snapshot_at_the_last_interval_before_the_prompt_end():
    model = {"num_layers": 2, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
             "layers": {"pattern": ["linear", "global"],
                        "groups": {"linear": {"kind": "state", "state_bytes": 96}, "global": {"kind": "full"}}}}
    s = jenga(capacity=96, model=model, state_interval=8)  # full page 2 x 16 = 32 B, state 96 B: lcm 96
    assert s.large_bytes == 96 and s.summary()["small_pages_per_large"] == {"linear": 1, "global": 3}
    p = ids(21)
    assert s.admit(0, p, 20, 20, 20).admitted
    s.release(0)  # snapshot at 16 (the last multiple of 8 at most 19)
    assert s.cached_prefix_len(np.concatenate([p[:18], ids(5, 700)]), 22) == 16
    assert s.cached_prefix_len(np.concatenate([p[:15], ids(5, 700)]), 19) == 0  # no snapshot at 8
    assert s.group_slot_states(None)["linear"].cached == 96


SHAPES = {
    "sliding": MODEL,
    "chunked": {"num_layers": 4, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
                "layers": {"pattern": ["chunk", "chunk", "chunk", "global"],
                           "groups": {"chunk": {"kind": "chunked", "chunk": 6}, "global": {"kind": "full"}}}},
    "state": {"num_layers": 3, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
              "layers": {"pattern": ["linear", "linear", "global"],
                         "groups": {"linear": {"kind": "state", "state_bytes": 48}, "global": {"kind": "full"}}}},
}


@pytest.mark.parametrize("shape,page_size,dropped", [("sliding", 1, "oldest"), ("sliding", 3, "refresh"),
                                                     ("chunked", 2, "oldest"), ("state", 2, "oldest")])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=50), seed=st.integers(0, 2**16))
def test_random_operations_keep_every_group_exact(shape, page_size, dropped, ops, seed):
    """Random admit / grow / release / evict (hypothesis): every table serves the request's own
    ids inside its window and NULL outside it, check_invariants after every call (per-group
    bytes, large-page counts, free lists, level-0 keys), nothing lost at the end."""
    s = jenga(capacity=96, model=SHAPES[shape], page_size=page_size, state_interval=2 * page_size,
              dropped_pages=dropped)
    play(HybridDriver(s), ops, np.random.default_rng(seed))
