"""Opt-in long random run of the content model (tests/content_model.py) on every strategy yaml at
every page size its kind allows: many short random call sequences, each on a fresh strategy,
every call checked (content of every cached prefix and every position read, nothing changed by a
call that answers no, check_invariants()).

    KVBENCH_LONG_FUZZ=1 python -m pytest -q tests/test_strategy_fuzz_long.py
    KVBENCH_LONG_FUZZ=1 KVBENCH_LONG_FUZZ_SEQS=20000 python -m pytest -q tests/test_strategy_fuzz_long.py -k radix

KVBENCH_LONG_FUZZ_SEQS sequences per case (default 5000) of 1 to 60 calls, half on a 48-slot
pool (max_model_len 40: refusals and evictions at every step), half on 192 slots (max_model_len
96). A failure names the case and the seed; `random_run(build(name, capacity, max_len, **opts),
default_rng(seed), 1 + seed % 60)` replays it. Skipped unless KVBENCH_LONG_FUZZ=1 (minutes per case).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from content_model import random_run
from strategy_cases import build, case_id, page_size_cases

pytestmark = pytest.mark.skipif(os.environ.get("KVBENCH_LONG_FUZZ") != "1",
                                reason="long random run: set KVBENCH_LONG_FUZZ=1")

POOLS = ((48, 40), (192, 96))  # (capacity tokens, max_model_len)


@pytest.mark.parametrize("case", page_size_cases(), ids=case_id)
def test_long_random_runs_serve_the_right_content(case):
    name, opts = case
    seqs = int(os.environ.get("KVBENCH_LONG_FUZZ_SEQS", "5000"))
    ops = refusals = hits = 0
    for seed in range(seqs):
        capacity, max_len = POOLS[seed % 2]
        n = 1 + seed % 60
        try:
            d = random_run(build(name, capacity, max_len, **opts), np.random.default_rng(seed), n)
        except AssertionError as e:
            raise AssertionError(f"{case_id(case)} seed {seed} ({n} calls, pool {capacity}): {e}") from e
        ops, refusals, hits = ops + n, refusals + d.refusals, hits + d.hits
    print(f"{case_id(case)}: {seqs} sequences, {ops} calls, {refusals} answered no, {hits} cached positions served")
    assert ops and (hits or not build(name, 192, 96, **opts).caches_prefixes)
