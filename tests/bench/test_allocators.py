"""Allocator operations at realistic sizes, for each strategy (pytest-benchmark; `-m bench`).

One round = one operation (admit, release, fork), one decode of DECODE tokens (grow by one
token, amortized: page allocations and hash-table inserts included where they fall), or one
prompt prefilled one token per step (per position: what caching each chunk costs). Setup
(excluded from the time) puts the pool back into the same state before every round. Medians are
what the comparison uses: a garbage collection inside a round makes an outlier, not a median.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from bench_workload import OUTPUT, PROMPT, Pool, build_strategy

# wall time: one reading of process_time costs ~1.1 us on this VM, too much for 1-us operations;
# medians of 100-200 short rounds stayed within 14 % across runs even under heavy load
pytestmark = [pytest.mark.bench, pytest.mark.benchmark(timer=time.perf_counter)]
STRATEGIES = ["slab", "paged", "paged_nocache", "radix"]
DECODE = 254  # grows of one token per round: 513 → 767 = kv_len of a 512 + 256 request
LONG = 4096  # prompt tokens of the radix match + insert and paged lookup rounds


def per_op(benchmark, ops: int, unit: str = "us") -> None:
    """Record the median time of one of the round's `ops` operations (docs/benchmarks.md)."""
    benchmark.extra_info["ops_per_round"] = ops
    benchmark.extra_info[f"median_per_op_{unit}"] = benchmark.stats.stats.median / ops * 1e6


@pytest.mark.parametrize("name", STRATEGIES)
def test_admit(benchmark, name):
    pool, last = Pool(build_strategy(name)), []

    def setup():
        while last:
            pool.s.release(last.pop())
        rid, args = pool.admit(PROMPT, OUTPUT)
        last.append(rid)
        return args, {}

    adm = benchmark.pedantic(pool.s.admit, setup=setup, rounds=200, warmup_rounds=10)
    assert adm.admitted


@pytest.mark.parametrize("name", STRATEGIES)
def test_grow_one_token(benchmark, name):
    pool, last = Pool(build_strategy(name)), []

    def setup():
        while last:
            pool.s.release(last.pop())
        last.append(pool.start(PROMPT, OUTPUT))
        return (last[0],), {}

    def decode(rid):
        grow = pool.s.grow
        for _ in range(DECODE):
            grow(rid, 1)

    benchmark.pedantic(decode, setup=setup, rounds=100, warmup_rounds=5)
    per_op(benchmark, DECODE)
    pool.s.check_invariants()


@pytest.mark.parametrize("name", STRATEGIES)
def test_release(benchmark, name):
    pool = Pool(build_strategy(name))

    def setup():
        rid = pool.start(PROMPT, OUTPUT)
        pool.decode(rid, 128)
        return (rid,), {}

    benchmark.pedantic(pool.s.release, setup=setup, rounds=200, warmup_rounds=10)
    pool.s.check_invariants()


@pytest.mark.parametrize("name", STRATEGIES)
def test_fork(benchmark, name):
    pool, last = Pool(build_strategy(name)), []

    def setup():
        while last:
            pool.s.release(last.pop())
        parent = pool.start(PROMPT, OUTPUT)
        pool.decode(parent, 64)  # 577 positions: the last page is partly filled
        _, tokens, kv_len, _, _ = pool.args[parent]
        child = parent + 1_000_000  # parallel sampling: same ids so far, its own buffer
        last.extend([child, parent])
        return (parent, child, tokens.copy(), kv_len), {}

    assert benchmark.pedantic(pool.s.fork, setup=setup, rounds=200, warmup_rounds=10)
    pool.s.check_invariants()


def _shared_prefix_pool(name: str, sys_len: int) -> tuple[Pool, list[np.ndarray]]:
    """16 running requests over 4 system prompts of `sys_len` tokens (their paths are locked in
    the radix tree, their pages hashed in the paged table)."""
    pool = Pool(build_strategy(name), background=0, seed=1)
    prompts = [pool.tokens(sys_len) for _ in range(4)]
    for i in range(16):
        rid = pool.start(sys_len + 512, 64, prefix=prompts[i % 4])
        pool.background.append(rid)
    return pool, prompts


@pytest.mark.parametrize("hit", [0, 50], ids=["miss", "half-cached"])
def test_radix_match_and_insert_long_prompt(benchmark, hit):
    """admit (match the cached prefix, take pages) + the first grow (insert the 4096 prompt ids)."""
    pool, prompts = _shared_prefix_pool("radix", LONG * hit // 100 or 1024)
    prefix = prompts[0] if hit else None
    last = []

    def setup():
        while last:
            pool.s.release(last.pop())
        pool.s.evict(pool.s.capacity)  # drop the previous round's leaf (running paths stay locked)
        rid, args = pool.admit(LONG, 64, prefix=prefix)
        last.append(rid)
        return (args,), {}

    def match_and_insert(args):
        cached = pool.s.admit(*args).cached_tokens
        assert cached == len(prefix) if hit else cached < 16  # fresh ids may share a token by chance
        assert pool.s.grow(args[0], 1)

    benchmark.pedantic(match_and_insert, setup=setup, rounds=100, warmup_rounds=5)
    per_op(benchmark, LONG // 16)  # per 16 prompt tokens
    pool.s.check_invariants()


@pytest.mark.parametrize("hit", [0, 50], ids=["miss", "half-cached"])
def test_paged_prefix_hash_lookup(benchmark, hit):
    """admit of a 4096-token prompt: page hashes up to the first miss, table probes, id checks."""
    pool, prompts = _shared_prefix_pool("paged", LONG * hit // 100 or 1024)
    prefix = prompts[0] if hit else None
    last = []

    def setup():
        while last:
            pool.s.release(last.pop())
        rid, args = pool.admit(LONG, 64, prefix=prefix)
        last.append(rid)
        return args, {}

    adm = benchmark.pedantic(pool.s.admit, setup=setup, rounds=200, warmup_rounds=10)
    assert adm.cached_tokens == (len(prefix) if hit else 0)  # (a chance hit needs 16 equal ids)
    pool.s.check_invariants()


@pytest.mark.parametrize("name", ["paged", "radix"])
def test_prefill_in_chunks_of_one_token(benchmark, name):
    """A 2048-token prompt computed one position per step (max_num_batched_tokens=1): admit,
    then grows of one token, each caching the chunk before it. Per position; it stays flat
    whatever the chunk size (radix inserts from the request's deepest node: linear in tokens)."""
    pool, last, prompt = Pool(build_strategy(name), background=0, seed=2), [], 2048

    def setup():
        while last:
            pool.s.release(last.pop())
        pool.s.evict(pool.s.capacity)
        rid, args = pool.admit(prompt, 8)
        last.append(rid)
        return (args[:4] + (1,),), {}

    def prefill(args):
        s, rid = pool.s, args[0]
        assert s.admit(*args).admitted
        for _ in range(prompt - 1):
            s.grow(rid, 1)

    benchmark.pedantic(prefill, setup=setup, rounds=5, warmup_rounds=1)
    per_op(benchmark, prompt)
    pool.s.check_invariants()
