"""Design 4, a radix tree over hybrid layer groups (strategies/hybrid/hybrid_radix.py), scripted
with exact pages and bytes: window locks follow the request's window, its own pages that leave
the window are freed at once, the window lane evicts least recent nodes (parents first) and
tombstones them while their full K/V stay, and the hit rule then refuses the prefix; state
snapshots at releases and at branching points. Then the zero-hit failure users report (vLLM
#45238: a 100-token shift of a shared prefix turns every hit into none on a model with state
layers) replayed on one scripted stream through designs 1-4, and hypothesis runs of random
operations through the hybrid content model."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_content import HybridDriver
from kvbench.sizes import PoolGeometry
from kvbench.strategies.hybrid.base import NULL_PAGE
from kvbench.strategies.hybrid.hybrid_radix import HybridRadix
from kvbench.strategies.hybrid.jenga import Jenga
from test_hybrid_jenga import SHAPES
from test_strategy_properties import op, play

# 3 sliding layers (window 8), 2 full layers; 16 B per layer-token (48 + 32 B per token)
MODEL = {"num_layers": 5, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
         "layers": {"pattern": ["local", "local", "local", "global", "global"],
                    "groups": {"local": {"kind": "sliding", "window": 8}, "global": {"kind": "full"}}}}
# one recurrent layer (a 256 B state) and one full layer (16 B per token)
STATE_MODEL = {"num_layers": 2, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
               "layers": {"pattern": ["linear", "global"],
                          "groups": {"linear": {"kind": "state", "state_bytes": 256}, "global": {"kind": "full"}}}}
LOCAL, GLOBAL = 0, 1  # table indices (group order)


def radix(capacity=56, model=MODEL, page_size=2, **kw) -> HybridRadix:
    geo = PoolGeometry.of(model, page_size, capacity // page_size)
    return HybridRadix(capacity, 4096, page_size=page_size, geometry=geo, **kw)


def ids(n, start=100):
    return np.arange(start, start + n, dtype=np.int32)


def test_lanes_split_the_pool_bytes_by_sglang_ratios():
    s = radix(swa_full_tokens_ratio=0.5)  # 56 x 80 B = 4480 B; a full-lane token costs 32 + 0.5 x 48 = 56 B
    assert s.summary()["lane_pages"] == [40, 20]  # 80 full tokens, 40 window tokens, pages of 2
    assert [(t.group, t.space, t.space_pages, t.page_bytes) for t in s.tables] == [(LOCAL, 1, 20, 96),
                                                                                   (GLOBAL, 0, 40, 64)]
    st = radix(capacity=64, model=STATE_MODEL, page_size=16)  # 1024 B: 16 + 0.9 x 16 B per full token
    assert st.summary()["lane_pages"] == [2] and st.summary()["state_slots"] == {"linear": 1}


def test_window_locks_follow_the_window_and_the_window_lane_evicts_parents_first():
    """a computes 40 positions in chunks of 8 (each chunk inserted: nodes [0,8) .. [24,32)); at
    computed 32 its window (8) starts at 25: only node [24, 32) stays locked in the window lane.
    b (unrelated, 24 positions) needs 12 window pages of the 20: the window lane tombstones a's
    three least recent nodes, root first, their full K/V stay. c shares a's first 20 ids: a hit
    of 20 needs window positions [13, 20), tombstoned: it hits 0; a hit of 38 on a's prompt holds."""
    a = ids(41)
    c = np.concatenate([a[:20], ids(10, 500)])
    s = radix(swa_full_tokens_ratio=0.5)
    assert s.admit(0, a, 40, 40, 8).admitted
    for _ in range(4):
        assert s.grow(0, 8)
    assert s._prot == [32, 8] and s._evictable == [0, 24]  # (tokens: full lane, window lane)
    table = s.table(0, LOCAL)
    assert len(table) == 20 and (table[:12] == NULL_PAGE).all() and (table[12:] != NULL_PAGE).all()
    s.release(0)
    assert s.cached_prefix_len(c, 30) == 20 and s.cached_prefix_len(a, 40) == 38
    assert s.admit(1, ids(25, 900), 24, 24, 24).admitted  # 12 pages: the window lane had none free
    s.check_invariants()
    held = [(n.end, n.pages[1] is not None) for n in _path(s, a[:40])]
    assert held == [(8, False), (16, False), (24, False), (32, True), (40, True)]
    assert s.cached_prefix_len(c, 30) == 0 and s.cached_prefix_len(a, 40) == 38
    states = s.group_slot_states(None)
    assert states["global"].cached == 40 * 32  # a's full K/V all kept


def _path(s, tokens):
    out = []
    for node, _ in s._match(tokens):
        out.append(node)
    return out


def test_own_pages_leave_the_window_at_once_and_become_a_tombstone_at_release():
    s = radix(capacity=120)
    p = ids(30)
    assert s.admit(0, p, 29, 4, 4).admitted  # prompt 4, then 25 decode steps
    for _ in range(25):
        assert s.grow(0, 1)
    # computed 28: window from 21; its decode pages [4, 20) are freed (tree holds [0, 4))
    assert s.table(0, LOCAL).tolist()[:10] == [NULL_PAGE] * 10
    s.check_invariants()
    s.release(0)  # inserts [4, 28): [4, 20) a tombstone in the window lane, [20, 28) held
    held = [(n.end, n.pages[1] is not None) for n in _path(s, p[:28])]
    assert held == [(4, True), (20, False), (28, True)]
    assert s.cached_prefix_len(p, 29) == 28 and s.cached_prefix_len(np.concatenate([p[:18], ids(4, 700)]), 21) == 4


def test_state_snapshots_at_release_and_at_the_branching_point():
    s = radix(capacity=4096, model=STATE_MODEL, page_size=16)
    shared = ids(100)
    a = np.concatenate([shared, ids(40, 1000)])
    b = np.concatenate([shared, ids(40, 2000)])
    c = np.concatenate([shared, ids(40, 3000)])
    assert s.admit(0, a, 140, 140, 256).cached_tokens == 0
    s.release(0)  # snapshot at 128 (its last whole page)
    assert s.cached_prefix_len(a, 141) == 128 and s.cached_prefix_len(b, 141) == 0  # full K/V match to 96
    assert s.admit(1, b, 140, 140, 64).cached_tokens == 0  # no snapshot at 96: it will checkpoint there
    assert s._seqs[1].branch == 96
    assert s.grow(1, 64) and s.grow(1, 12)  # its prefill passes 96: the tree splits there, snapshot kept
    assert s.cached_prefix_len(c, 141) == 96
    s.release(1)
    adm = s.admit(2, c, 140, 140, 256)
    assert adm.cached_tokens == 96
    s.check_invariants()
    linear = s.group_slot_states(None)["linear"]  # snapshots at 96, a's 128, b's 128; c's own state
    assert (linear.cached, linear.token) == (3 * 256, 256)


def serve(s, prompts, chunk=2048) -> list[int]:
    """Each prompt alone (concurrency 1, one output token), in order: cached tokens of each."""
    hits = []
    for rid, p in enumerate(prompts):
        n = len(p)
        adm = s.admit(rid, p, n, n, chunk)
        assert adm.admitted
        hits.append(adm.cached_tokens)
        done = adm.cached_tokens + min(chunk, n - adm.cached_tokens)
        while done < n:
            step = min(chunk, n - done)
            assert s.grow(rid, step)
            done += step
        s.release(rid)
    return hits


def shifted_stream(shared: int, unique: int, n: int = 64) -> list[np.ndarray]:
    prefix = ids(shared, 10_000)
    return [np.concatenate([prefix, ids(unique, 100_000 + 1000 * i)]) for i in range(n)]


def _designs():
    out = {"jenga": lambda geo: Jenga(8192, 8192, page_size=16, geometry=geo, state_interval=528),
           "radix": lambda geo: HybridRadix(8192, 8192, page_size=16, geometry=geo)}
    try:
        from kvbench.strategies.hybrid.separate import SeparatePools
        from kvbench.strategies.hybrid.unified import UnifiedPool
    except ImportError:  # (designs 1 and 2 land with the contract: this test then covers them)
        return out
    # (split: TensorRT-LLM's window rule gives a state group its bytes per request against full
    # attention's max_model_len x bytes per token: less than one state here)
    out["separate"] = lambda geo: SeparatePools(8192, 8192, page_size=16, geometry=geo, split=[0.25, 0.75])
    out["unified"] = lambda geo: UnifiedPool(8192, 8192, page_size=16, geometry=geo)
    return out


@pytest.mark.parametrize("design", sorted(_designs()))
def test_a_shifted_shared_prefix_turns_every_hit_into_none_for_a_single_checkpoint(design):
    """vLLM #45238 on a scripted stream: 64 requests, each a shared prefix and a unique suffix,
    alone in turn. A design that keeps one state snapshot per request at the last multiple of the
    checkpoint interval (528) before its prompt ends (vLLM's align mode; design 3 here) hits 1584
    tokens on 63 of 64 requests with a 1600-token shared prefix, and nothing on any with a
    1500-token one: 1584 falls in the unique part. Designs 1 and 2 keep no snapshot: nothing in
    both. Design 4 checkpoints where a request's full K/V diverge from the tree (SGLang's
    branching point): from the third request on, every request hits the whole shared prefix."""
    geo = PoolGeometry.of(STATE_MODEL, 16, 8192 // 16)
    make = _designs()[design]
    expect = {"jenga": ([0] + [1584] * 63, [0] * 64), "radix": ([0, 0] + [1600] * 62, [0, 0] + [1488] * 62),
              "separate": ([0] * 64, [0] * 64), "unified": ([0] * 64, [0] * 64)}[design]
    for stream, want in zip((shifted_stream(1600, 500), shifted_stream(1500, 600)), expect):
        s = make(geo)
        assert serve(s, stream) == want
        s.check_invariants()


@pytest.mark.parametrize("shape,page_size", [("sliding", 1), ("sliding", 3), ("chunked", 2), ("state", 2)])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=50), seed=st.integers(0, 2**16))
def test_random_operations_keep_every_lane_exact(shape, page_size, ops, seed):
    """Random admit / grow / release / evict (hypothesis): every table serves the request's own
    ids inside its window and NULL outside it; check_invariants after every call (locks per lane
    recounted from the running requests, LRUs hold exactly the evictable nodes, pages and state
    slots conserved, byte states summing to the pool); nothing lost at the end."""
    s = radix(capacity=96, model=SHAPES[shape], page_size=page_size, swa_full_tokens_ratio=0.6)
    play(HybridDriver(s), ops, np.random.default_rng(seed))
