"""Belady as a runnable policy of paged, on a generated trace served one request at a time
(experiments/eviction_curves.py's replay: the cache trimmed to C pages after each request).

What is asserted, precisely: on the same request stream, with the same admission (arrival
order, one request at a time, every computed full page offered to the cache) and the same cache
size C, (1) paged with Belady serves exactly the prompt tokens the trace's bound "MIN with
bypass" allows (kvbench/traces/belady.py: the optimum over all policies, clairvoyant or not),
and (2) no online policy serves more. With requests running concurrently the pool also holds
their pages and Belady is not provably optimal there (a page's next use may come while it is
pinned): the experiment's replay is where the property holds."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kvbench.strategies.eviction.base import POLICIES
from kvbench.strategies.eviction.belady import Belady, paged_future
from kvbench.traces import multi_turn
from kvbench.traces.belady import belady_hits, block_references

_spec = importlib.util.spec_from_file_location(
    "eviction_curves", Path(__file__).resolve().parents[1] / "experiments" / "eviction_curves.py")
curves_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curves_mod)

PS = 4


@pytest.fixture(scope="module")
def trace():
    reqs = sorted(multi_turn(num_chats=12, seed=3, rate=2.0, limit=60), key=lambda r: (r.arrival_s, r.id))
    items = [(np.asarray(r.tokens, dtype=np.int32), r.prompt_len, r.prompt_len + r.output_len - 1) for r in reqs]
    future = paged_future([SimpleNamespace(id=i, tokens=t, prompt_len=p) for i, (t, p, _) in enumerate(items)], PS)
    room = max(-(-kv // PS) for _, _, kv in items) + 1
    return reqs, items, future, room


@pytest.mark.parametrize("capacity", [8, 40, 160, 640])
def test_runnable_belady_meets_the_bound_and_no_policy_beats_it(trace, capacity):
    reqs, items, future, room = trace
    bound = belady_hits(block_references(reqs, PS), capacity).hit_tokens
    best = curves_mod.replay(items, Belady(future), capacity, PS, room)
    assert best == bound
    for name in POLICIES:
        if name != "belady":
            assert curves_mod.replay(items, name, capacity, PS, room) <= best, name
