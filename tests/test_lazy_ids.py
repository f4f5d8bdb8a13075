"""Ids drawn again on demand (traces/tokens.py: RandomRows; Request.forget) and the per-process
trace cache of kvbench/run.py: the same ids as an eager draw, bit for bit, in any reading order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench.request import Request
from kvbench.run import load_trace
from kvbench.schema import register
from kvbench.traces.synthetic import synthetic
from kvbench.traces.tokens import RandomRows, random_pieces, stream

REPO = Path(__file__).resolve().parents[1]


def test_random_rows_give_the_eager_pieces_in_any_order():
    lengths = np.random.default_rng(5).integers(0, 40, size=101)  # zeros included (rows left unbuilt)
    eager = random_pieces(stream(7, 0), lengths, 1000)
    rows = RandomRows(stream(7, 0), lengths, 1000, block=8, cache=2)  # blocks drawn again and again
    order = np.random.default_rng(1).permutation(len(lengths)).tolist()
    for i in order + order[::-1]:
        assert np.array_equal(rows[i], eager[i]), i
        assert rows[i].dtype == np.int32
    assert len(rows._cache) <= 2


def test_forget_draws_the_same_ids_again():
    reqs = synthetic(num_requests=40, seed=3, max_model_len=600)
    first = [r.tokens.copy() for r in reqs]
    for r in reqs:
        r.forget()
        assert r._tokens is None  # dropped: the next read draws them again
    for r, ids in zip(reversed(reqs), reversed(first)):
        assert np.array_equal(r.tokens, ids)
    given = Request(0, 0.0, np.arange(3, dtype=np.int32), np.arange(2, dtype=np.int32))
    given.forget()  # ids given, not drawn: nothing to rebuild them from, so they stay
    assert np.array_equal(given.tokens, [0, 1, 2, 0, 1])


def _cfg(*overrides):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["trace=synthetic", "trace.num_requests=20", *overrides])


def test_a_process_loads_a_trace_once_for_the_sim_only():
    a, b = load_trace(_cfg("strategy=paged")), load_trace(_cfg("strategy=slab"))
    assert a is b  # same trace config, sim engine: one list
    c = load_trace(_cfg("trace.seed=1"))
    assert c is not a and [r.prompt_len for r in c] != [r.prompt_len for r in a]
    cfg = _cfg()
    OmegaConf.update(cfg, "engine", {"_target_": "kvbench.engines.torch_engine.TorchEngine"}, merge=False)
    assert load_trace(cfg) is not load_trace(cfg)  # an engine that may write ids gets its own
