"""Hybrid pool designs 1 (separate pools) and 2 (one pool of equal-byte pages), scripted with
exact pages and bytes: sliding-window pages leave the table as decoding goes on (and stay
cached), the hit rule (every group holds what it needs at the hit point) with the zero-hit
failure of a window whose pages were evicted, state layers hit nothing, design 1's fixed split
and the memory it strands. Random operations on every design and shape run in the shared tests
(tests/test_strategy_properties.py through tests/hybrid_content.py); here hypothesis drives longer
runs on the shape with two windows and two sizes of token."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from content_model import Driver, random_run
from kvbench.sizes import PoolGeometry
from kvbench.strategies.hybrid.base import NULL_PAGE, POOL, GroupSlotStates
from kvbench.strategies.hybrid.separate import SeparatePools
from kvbench.strategies.hybrid.unified import UnifiedPool, kv_cache_group_size
from strategy_cases import build
from test_strategy_properties import op, play

# 2 sliding layers (window 5) and 1 full layer; 1 KV head of dim 2, float32: 16 B per layer-token
MODEL = {"num_layers": 3, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
         "layers": {"pattern": ["local", "local", "global"],
                    "groups": {"local": {"kind": "sliding", "window": 5}, "global": {"kind": "full"}}}}
STATE_MODEL = {"num_layers": 2, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
               "layers": {"pattern": ["linear", "global"],
                          "groups": {"linear": {"kind": "state", "state_bytes": 40}, "global": {"kind": "full"}}}}


def geometry(model=MODEL, page_size=2, capacity=24):
    return PoolGeometry.of(model, page_size, capacity // page_size)


def unified(capacity=24, model=MODEL, **kw):
    return UnifiedPool(capacity, 64, page_size=2, geometry=geometry(model, 2, capacity), **kw)


def ids(n, start=100):
    return np.arange(start, start + n, dtype=np.int32)


def test_vllm_group_size_rule():
    assert kv_cache_group_size([22, 4]) == 4  # gemma-3-1b: 6 sliding tables (the last half padding), 1 full
    assert kv_cache_group_size([12, 12]) == 12  # gpt-oss
    assert kv_cache_group_size([5, 4]) == 5  # 5 < 1.5 x 4: one group each, the 4 padded to 5
    assert kv_cache_group_size([2, 1]) == 1


def test_unified_pool_layout_of_the_shipped_gemma_shape():
    gemma = {"num_layers": 26, "num_kv_heads": 1, "head_dim": 256, "dtype": "bfloat16",
             "layers": {"pattern": ["local"] * 5 + ["global"],
                        "groups": {"local": {"kind": "sliding", "window": 512}, "global": {"kind": "full"}}}}
    s = UnifiedPool(131072, 16384, page_size=16, geometry=PoolGeometry.of(gemma, 16, 8192))
    # 22 sliding layers in tables of 4 (5 x 4 + 2), 4 full layers in one table; pages of 16 x 4 x 1024 B
    assert [(t.layers, t.page_size) for t in s.tables] == [(4, 16)] * 5 + [(2, 16), (4, 16)]
    assert s.tables[0].page_bytes == 16 * 4 * 1024 and s.tables[0].space_pages == 131072 * 26624 // 65536
    states = s.group_slot_states(None)
    assert states[POOL].free == s.pool_bytes and s.slot_states(None).free == 131072


def test_sliding_pages_leave_the_table_as_decoding_goes_on_and_stay_cached():
    s = unified()  # gs = 1: tables 0, 1 (one sliding layer each), 2 (full); pages of 2 tokens x 16 B
    assert [(t.group, t.layers, t.page_size, t.space_pages, t.page_bytes) for t in s.tables] == [
        (0, 1, 2, 36, 32), (0, 1, 2, 36, 32), (1, 1, 2, 36, 32)]
    tokens = ids(20)
    assert s.admit(0, tokens, 19, 12, 12) == (True, 0)
    assert [s.table(0, t).tolist() for t in range(3)] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11],
                                                          [12, 13, 14, 15, 16, 17]]
    assert s.grow(0, 1)  # 12 computed: the sliding layers read from position 12 - 5 + 1 = 8 on
    assert [s.table(0, t).tolist() for t in range(3)] == [[-1, -1, -1, -1, 4, 5, 18], [-1, -1, -1, -1, 10, 11, 19],
                                                          [12, 13, 14, 15, 16, 17, 20]]
    assert s.page_table(0).tolist() == s.table(0, 2).tolist()  # the kernels' table of the full layer
    g = s.group_slot_states(None)
    # sliding: 2 tables x (3 pages held: 5 positions written, 1 reserved (final length 19 > 14)); 4 pages each cached
    assert g["local"] == GroupSlotStates(token=2 * 5 * 16, reserved=2 * 16, cached=8 * 32)
    assert g["global"] == GroupSlotStates(token=13 * 16, reserved=16)
    assert g[POOL] == GroupSlotStates(free=(36 - 21) * 32)
    assert s.slot_states(None) == (8, 1, 0, 0, 5, 10)  # units of 48 B (largest remainder), sum 24
    s.check_invariants()


def test_a_hit_needs_the_window_of_every_sliding_layer():
    s = unified()
    tokens = ids(20)
    s.admit(0, tokens, 19, 12, 12)
    s.grow(0, 1)  # request 0 drops sliding pages 0..3 (cached: they keep their hashes)
    # request 1 shares 12 ids: the full layer holds 10 of them (whole pages, one left to compute);
    # at point 10 the sliding layers need positions 6..9 = pages 3 (cached) and 4 (held by 0)
    other = np.concatenate([tokens[:12], ids(8, 900)])
    assert s.cached_prefix_len(other, 12) == 10
    adm = s.admit(1, other, 19, 12, 12)
    assert adm == (True, 10)
    assert [s.table(1, t).tolist() for t in range(3)] == [[-1, -1, -1, 3, 4, 21], [-1, -1, -1, 9, 10, 22],
                                                          [12, 13, 14, 15, 16, 23]]
    s.check_invariants()


def test_zero_hits_when_the_window_was_evicted_although_the_full_layers_hold_the_prefix():
    """The failure users report on hybrid models (vLLM #45238): the full-attention layers still
    hold the whole shared prefix, but the sliding layers' pages near the hit point are gone, so no
    hit point is valid and the request recomputes everything."""
    s = unified()
    tokens = ids(20)
    s.admit(0, tokens, 19, 12, 12)
    s.grow(0, 1)
    s.evict(24)  # every cached page: the sliding pages 0..3 of both sliding tables
    assert s.group_slot_states(None)["local"].cached == 0
    assert s.table(0, 2).tolist()[:5] == [12, 13, 14, 15, 16]  # the full layer holds positions 0..9 ...
    assert s.cached_prefix_len(np.concatenate([tokens[:12], ids(8, 900)]), 12) == 0  # ... yet no hit
    s.check_invariants()


def test_a_model_with_state_layers_hits_nothing_without_snapshots():
    for s in (unified(model=STATE_MODEL),
              SeparatePools(24, 64, page_size=2, geometry=geometry(STATE_MODEL), split=[0.5, 0.5])):
        tokens = ids(20)
        assert s.admit(0, tokens, 19, 12, 12).admitted
        s.grow(0, 1)
        s.release(0)
        assert s.group_slot_states(None)["global"].cached > 0  # the full layer's pages are cached ...
        assert s.cached_prefix_len(tokens, 12) == 0  # ... but no state snapshot at any point: no hit
        assert s.admit(1, tokens, 19, 12, 12) == (True, 0)
        assert s.group_slot_states(None)["linear"].token == 40  # one state per running request
        s.check_invariants()


def test_separate_pools_split_and_strand_memory():
    s = SeparatePools(24, 64, page_size=2, geometry=geometry(), split=[0.5, 0.5])
    # 1152 B: 576 B to the sliding pool (pages of 2 tokens x 32 B), 576 B to the full one (2 x 16 B)
    assert [(t.space_pages, t.page_bytes) for t in s.tables] == [(9, 64), (18, 32)]
    assert s.never_fits(18) is None and "9" in s.never_fits(19)  # 10 sliding pages > 9 (windows counted whole)
    s.admit(0, ids(20), 19, 12, 12)
    s.grow(0, 1)  # sliding pool: 3 pages held, 3 cached, 3 free; full pool: 7 held, 11 free
    assert s.table(0, 0).tolist() == [-1, -1, -1, -1, 4, 5, 6]
    g = s.group_slot_states(17)  # the waiting request needs 9 sliding pages: 6 are free or cached
    assert g["local"] == GroupSlotStates(token=5 * 32, reserved=32, cached=4 * 64, free=2 * 64)
    assert g["global"] == GroupSlotStates(token=13 * 16, reserved=16, external=11 * 32)  # stranded by the split
    assert s.group_slot_states(None)["global"].free == 11 * 32
    s.check_invariants()


def test_separate_window_split_follows_tensorrt_llm():
    s = SeparatePools(4096, 1024, page_size=16, geometry=geometry(MODEL, 16, 4096))
    # TensorRT-LLM: share ~ window x bytes per token; full attention's window is max_model_len
    assert s.weights() == pytest.approx([5 * 32 / (5 * 32 + 1024 * 16), 1024 * 16 / (5 * 32 + 1024 * 16)])
    # the sliding share (1 %) is below one request of max_model_len: it gets that floor
    nbytes = s.pool_bytes_per_group()
    assert nbytes[0] == 64 * 16 * 32 and nbytes[1] == int((s.pool_bytes - nbytes[0]))


@pytest.mark.parametrize("design", ["hybrid_separate", "hybrid_unified"])
@pytest.mark.parametrize("model", ["sliding", "mixed", "chunked"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=60), seed=st.integers(0, 2**16))
def test_random_operations_keep_every_group_exact(design, model, ops, seed):
    """The content of every table (window pages never referenced, hits serve the request's own
    ids in every group's needed span) and check_invariants() (per-group bytes recounted, summing
    to the pool) after every call: tests/hybrid_content.py."""
    play(Driver(build(design, 96, 64, model=model, page_size=2)), ops, np.random.default_rng(seed))


def test_hits_and_dropped_pages_happen_in_the_random_runs():
    """The random generator of the shared tests reaches what the checks are about."""
    s = build("hybrid_unified", 192, 96, page_size=2)
    dropped = []
    trim = s._trim

    def counting_trim(req, drops):  # pages dropped from a table (NULL_PAGE entries that appear)
        before = sum(row.count(NULL_PAGE) for row in req.pages)
        trim(req, drops)
        dropped.append(sum(row.count(NULL_PAGE) for row in req.pages) - before)

    s._trim = counting_trim
    d = random_run(s, np.random.default_rng(3), 200, check_no_mutation=False)  # (the wrapper is not picklable)
    assert d.hits > 0 and d.refusals > 0 and sum(dropped) > 0
