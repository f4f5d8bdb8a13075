"""The hit-rate bound bounds (issue 11): no strategy, at any pool size, serves more prompt tokens
from cache than the unbounded cache of kvbench/traces/belady.py at its page size, request by
request; LRU <= Belady <= unbounded at every capacity; where the pool holds the whole trace and
no request overlaps an earlier one that shares with it, paged and radix hit the bound exactly.

Replays go through the real config path (Hydra compose, sim engine) on small generators and on
slices of the shared traces (skipped where /work/shared/traces, or $KVBENCH_TRACES, is missing).
About 15 s on 2 cores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler
from kvbench.schema import register
from kvbench.traces import traces_dir
from kvbench.traces.belady import (belady_hits, block_references, hit_tokens_per_request, lru_hits,
                                   unbounded_hits)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MOONCAKE = "mooncake-fast25/synthetic_trace.jsonl"
AZURE = {"azure_conv": "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv",
         "azure_code": "azure-llm-inference-2023/AzureLLMInferenceTrace_code.csv"}

# small generators: sharing across requests (shared_prefix), through outputs (multi_turn), none
GENERATORS = {
    "multi_turn": ["trace=multi_turn", "trace.num_chats=10", "trace.rate=2"],
    "multi_turn_fast": ["trace=multi_turn", "trace.num_chats=6", "trace.think_time_s=0.2", "trace.rate=inf"],
    "shared_prefix": ["trace=shared_prefix", "trace.num_groups=3", "trace.questions_per_group=6",
                      "trace.system_len=200", "trace.rate=32"],
    "synthetic": ["trace=synthetic", "trace.num_requests=30", "trace.rate=16"],
}
SHIPPED = {  # slices of the shared traces
    "mooncake": ["trace=mooncake", "trace.limit=60", "trace.rate=0.5", "max_model_len=131072"],
    **{name: [f"trace={name}", "trace.limit=60", "trace.rate=8"] for name in AZURE},
}


def config(strategy: str, overrides: list[str]):
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=["progress=false", f"strategy={strategy}", *overrides])


_TRACES: dict[str, list[Request]] = {}


def trace(name: str) -> list[Request]:
    overrides = GENERATORS.get(name) or SHIPPED[name]
    if name in SHIPPED:
        path = MOONCAKE if name == "mooncake" else AZURE[name]
        if not (traces_dir() / path).is_file():
            pytest.skip(f"shared trace {traces_dir() / path} not found (set KVBENCH_TRACES)")
    if name not in _TRACES:
        _TRACES[name] = instantiate(config("paged", overrides).trace)
    return _TRACES[name]


def served_hits(name: str, strategy: str, page_size: int, capacity: int) -> dict[int, int]:
    """Request id -> prompt tokens it was served from cache at its first admission."""
    overrides = (GENERATORS.get(name) or SHIPPED[name]) + [f"strategy.page_size={page_size}",
                                                           f"kv_capacity_tokens={capacity}"]
    cfg = config(strategy, overrides)
    pool = instantiate(cfg.strategy, capacity_tokens=cfg.kv_capacity_tokens, max_model_len=cfg.max_model_len)
    result = replay(trace(name), Scheduler(pool, **cfg.scheduler), instantiate(cfg.engine), progress=False)
    return {s.request.id: int(s.cached_tokens) for s in result.finished}


def assert_within_bound(name: str, strategy: str, page_size: int, capacity: int) -> tuple[int, int]:
    """Every finished request's hit <= its unbounded bound; returns (served, bound) in tokens."""
    reqs = trace(name)
    bound = hit_tokens_per_request(block_references(reqs, page_size))  # [N] in arrival order = id order
    got = served_hits(name, strategy, page_size, capacity)
    over = {i: (h, int(bound[i])) for i, h in got.items() if h > bound[i]}
    assert not over, (f"{strategy}-{page_size} on {name} with a pool of {capacity} tokens served more than "
                      f"the unbounded cache allows (request: (served, bound)): {dict(list(over.items())[:5])}")
    return sum(got.values()), int(sum(bound[i] for i in got))


# ---- what a finished request leaves behind: its prompt and output K/V -------------------------
def req(i: int, arrival: float, prompt: list[int], output: list[int]) -> Request:
    return Request(i, arrival, np.array(prompt, dtype=np.int32), np.array(output, dtype=np.int32))


def test_the_bound_counts_cached_output_and_leaves_the_last_prompt_token_to_compute():
    # r0 holds K/V of 1 2 3 4 5 (its last output token, 6, never gets K/V); r1's prompt repeats
    # r0's prompt and output: with 1-token blocks it can hit 1..5, with 2-token blocks [1 2][3 4]
    reqs = [req(0, 0.0, [1, 2, 3], [4, 5, 6]), req(1, 10.0, [1, 2, 3, 4, 5, 7], [8])]
    assert hit_tokens_per_request(block_references(reqs, 1)).tolist() == [0, 5]
    assert hit_tokens_per_request(block_references(reqs, 2)).tolist() == [0, 4]
    assert hit_tokens_per_request(block_references(reqs, 1, outputs=False)).tolist() == [0, 3]
    # the same prompt again: everything but its last token can come from cache
    again = reqs + [req(2, 20.0, [1, 2, 3, 4, 5, 7], [9])]
    assert hit_tokens_per_request(block_references(again, 1)).tolist() == [0, 5, 5]
    refs = block_references(again, 1)
    assert unbounded_hits(refs).hit_tokens == belady_hits(refs, refs.num_blocks).hit_tokens == 10
    assert belady_hits(refs, 0).hit_tokens == lru_hits(refs, 0).hit_tokens == 0


def test_a_block_an_output_brings_back_for_free_is_not_worth_keeping():
    # blocks of 2, room for 2: r0 = A; r1 = C + output block D; r2 = the same as r1; r3 = A.
    # D's next reference is r2's own output (r2 computes it anyway): keeping D for it would push
    # A out before r3. Belady keeps A and C: r2 hits C, r3 hits A, as the unbounded cache does.
    reqs = [req(0, 0.0, [1, 2, 3], [1]), req(1, 1.0, [5, 6, 7], [8, 9, 0]),
            req(2, 2.0, [5, 6, 7], [8, 9, 0]), req(3, 3.0, [1, 2, 3], [1])]
    refs = block_references(reqs, 2)
    assert refs.node.tolist() == [1, 2, 3, 2, 3, 1]  # A C D C D A
    assert refs.counted.tolist() == [True, True, False, True, False, True]
    assert belady_hits(refs, 2).hit_tokens == unbounded_hits(refs).hit_tokens == 4
    assert lru_hits(refs, 2).hit_tokens == 2  # LRU keeps D and C: r3 misses A


# ---- no strategy exceeds the bound ------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(GENERATORS)), strategy=st.sampled_from(["paged", "radix"]),
       page_size=st.sampled_from([1, 4, 16, 64]), capacity=st.sampled_from([4096, 6144, 16384, 1 << 20]))
def test_no_strategy_at_any_pool_size_exceeds_the_unbounded_bound(name, strategy, page_size, capacity):
    assert_within_bound(name, strategy, page_size, capacity)


@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("strategy", ["paged", "radix"])
def test_no_strategy_exceeds_the_bound_on_the_shared_traces(name, strategy):
    small = 40000 if name == "mooncake" else 8192  # evicts and preempts
    for capacity in (small, 1 << 22):
        assert_within_bound(name, strategy, 16, capacity)


@pytest.mark.parametrize("strategy", ["paged", "radix"])
def test_the_reported_hit_rate_is_the_served_tokens_and_within_the_bound(tmp_path, strategy):
    # what the figures draw: summary.json's prefix_hit_rate, through the real run path
    from kvbench.run import run

    cfg = config(strategy, GENERATORS["multi_turn"] + ["strategy.page_size=16", "kv_capacity_tokens=6144"])
    summary = run(cfg, tmp_path / "run")
    reqs = trace("multi_turn")
    served = served_hits("multi_turn", strategy, 16, 6144)
    prompts = sum(reqs[i].prompt_len for i in served)
    assert summary["finished"] == len(served)
    assert summary["prefix_hit_rate"] == pytest.approx(sum(served.values()) / prompts, rel=1e-12)
    bound = hit_tokens_per_request(block_references(reqs, 16))
    assert 0.3 < summary["prefix_hit_rate"] <= sum(bound[i] for i in served) / prompts


def test_prefix_caching_off_hits_nothing():
    assert served_hits("multi_turn", "paged_nocache", 16, 1 << 20) == dict.fromkeys(served_hits(
        "multi_turn", "paged_nocache", 16, 1 << 20), 0)


# ---- Belady lies between LRU and the unbounded cache -----------------------------------------
@pytest.mark.parametrize("name", sorted(GENERATORS) + sorted(SHIPPED))
def test_belady_lies_between_lru_and_the_unbounded_cache(name):
    refs = block_references(trace(name), 16)
    unb = unbounded_hits(refs)
    top = refs.num_blocks
    previous = -1
    for c in sorted({0, 1, 8, 64, top // 8, top // 2, top}):
        b, lr = belady_hits(refs, c), lru_hits(refs, c)
        assert lr.hit_tokens <= b.hit_tokens <= unb.hit_tokens, (name, c)
        assert b.hit_tokens >= previous, f"{name}: Belady lost hits when the cache grew to {c} blocks"
        previous = b.hit_tokens
    assert belady_hits(refs, top).hit_tokens == lru_hits(refs, top).hit_tokens == unb.hit_tokens


# ---- exactly the bound where nothing stands in the way ---------------------------------------
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("strategy", ["paged", "radix"])
def test_a_pool_larger_than_the_trace_hits_the_bound_exactly(strategy, page_size):
    # each turn arrives long after the previous one ended: every byte of history is cached
    overrides = ["trace=multi_turn", "trace.num_chats=6", "trace.think_time_s=600", "trace.rate=0.01"]
    GENERATORS["multi_turn_slow"] = overrides
    served, bound = assert_within_bound("multi_turn_slow", strategy, page_size, 1 << 22)
    assert served == bound > 0.5 * sum(r.prompt_len for r in trace("multi_turn_slow"))


@pytest.mark.parametrize("strategy", ["paged", "radix"])
def test_the_mooncake_trace_with_a_pool_larger_than_it_hits_the_bound_exactly(strategy):
    served, bound = assert_within_bound("mooncake", strategy, 16, 1 << 24)
    assert served == bound > 0
