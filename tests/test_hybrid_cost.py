"""The sim's K/V read term per layer group (issue 16): a sliding-window layer reads at most its
window, a chunked layer its query's chunk, a state layer nothing; the count stays in positions
of the whole model's K/V; single-group models count as before; windowed models never
fast-forward, so stepping and fast-forward agree."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench.batch import KVReadGroups, ScheduledSeq, StepBatch
from kvbench.engines.sim import SimEngine
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.run import run
from kvbench.scheduler import Scheduler
from kvbench.schema import register
from kvbench.sizes import LayerGroup, layer_groups
from kvbench.strategies.paged import PagedStrategy

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "configs" / "model"


def model(name: str):
    return OmegaConf.load(MODELS / f"{name}.yaml")


def request(rid: int, prompt: int, output: int, arrival: float = 0.0) -> Request:
    rng = np.random.default_rng(rid)
    return Request(rid, arrival, rng.integers(0, 30000, prompt, dtype=np.int32),
                   rng.integers(0, 30000, output, dtype=np.int32))


def batch(seqs, groups):
    return StepBatch(seqs, 16, 64, False, [], kv_read_groups=groups)


# ---- the count --------------------------------------------------------------------------------
def test_gemma_like_batch_reads_the_window_in_sliding_layers():
    groups = KVReadGroups.of(layer_groups(model("gemma3_1b_like")))
    # 22 sliding layers (window 512) and 4 full, 1 KV head x 256 in bf16: 22528 + 4096 bytes per token
    assert groups == KVReadGroups(26624, 4096, ((22528, 512, 0),))
    past = ScheduledSeq(request(0, 1000, 2000), 2000, 1, None)  # a decode at context 2001: past the window
    inside = ScheduledSeq(request(1, 300, 10), 0, 300, None)  # a whole 300-token prompt: inside it
    b = batch([past, inside], groups)
    assert (b.decode_tokens, b.prefill_tokens) == (1, 300)
    # full 2/13 x (2001 + 300) + sliding 11/13 x (512 + 300) = 13534 / 13 = 1041.08 -> 1041
    assert b.kv_read_tokens == 1041
    assert batch([past], groups).kv_read_tokens == 741  # (2 x 2001 + 11 x 512) / 13 = 9634 / 13 = 741.08
    assert batch([inside], groups).kv_read_tokens == 300  # inside the window every layer reads all
    assert batch([past, inside], None).kv_read_tokens == 2301  # the plain count: every layer, whole context


def test_single_group_and_full_plus_state_models_count_as_before():
    for name in ("llama3_1_8b", "tiny", "hybrid_like"):  # (hybrid_like: state layers and full ones)
        assert KVReadGroups.of(layer_groups(model(name))) is None, name
    seqs = [ScheduledSeq(request(0, 40, 10), 40, 1, None), ScheduledSeq(request(1, 90, 5), 16, 64, None)]
    assert StepBatch(seqs, 16, 64, False, []).kv_read_tokens == 41 + 80


def test_chunked_layers_read_the_query_chunk_and_round_half_up():
    groups = KVReadGroups.of((LayerGroup("chunked", 3, 8, 128, "bfloat16", chunk=8192),
                              LayerGroup("full", 1, 8, 128, "bfloat16")))
    assert groups.windowed == ((3 * 4096, 0, 8192),) and groups.full_bytes == 4096
    # contexts 8192 (the chunk's last query reads all of it) and 8193 (a new chunk: itself only):
    # 1/4 x (8192 + 8193) + 3/4 x (8192 + 1) = 10241 exactly
    assert groups.read([8192, 8193]) == 10241
    assert groups.read([10000]) == 2500 + 1356  # (10000 - 1) % 8192 + 1 = 1808 chunk positions
    assert groups.read([2]) == 2 and groups.read([]) == 0
    half = KVReadGroups(4, 2, ((2, 1, 0),))  # half the bytes read 1 position: c / 2 + 1 / 2
    assert [half.read([c]) for c in (1, 2, 3, 4)] == [1, 2, 2, 3]  # 1, 1.5 -> 2, 2, 2.5 -> 3


# ---- fast-forward -----------------------------------------------------------------------------
def replayed(groups, fast: bool):
    reqs = [request(i, 200 + 97 * i % 900, 100 + 31 * i % 400, 0.02 * i) for i in range(40)]
    engine = SimEngine(0.006, 3e-5, 5e-5, 4.4e-8, fast_forward=fast)
    steps = []
    step = engine.step
    engine.step = lambda b: steps.append(1) or step(b)
    st = PagedStrategy(8192, 4096, page_size=16)
    result = replay(reqs, Scheduler(st, 8, 512, kv_read_groups=groups), engine, progress=False)
    st.check_invariants()
    return result.recorder.timeline(), result.recorder.requests(), len(steps)


def test_windowed_model_does_not_fast_forward_and_matches_stepping():
    groups = KVReadGroups.of(layer_groups(model("gemma3_1b_like")))
    t0, r0, n0 = replayed(groups, fast=False)
    t1, r1, n1 = replayed(groups, fast=True)
    assert n1 == n0 == len(t0), "a windowed model's quiet steps are stepped"
    pd.testing.assert_frame_equal(t1, t0)
    pd.testing.assert_frame_equal(r1, r0)
    plain, _, n_plain = replayed(None, fast=True)  # the same trace priced as all full attention
    assert n_plain < len(plain), "(the check above would pass trivially if nothing fast-forwarded)"
    assert t0.kv_read_tokens.sum() < plain.kv_read_tokens.sum()
    assert t0.t_s.iloc[-1] + t0.dt_s.iloc[-1] < plain.t_s.iloc[-1] + plain.dt_s.iloc[-1]


def test_run_passes_the_groups_and_turns_fast_forward_off(tmp_path):
    register()
    timelines = {}
    for fast in (True, False):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=["progress=false", "strategy=paged", "model=gemma3_1b_like",
                                                "trace=synthetic", "trace.num_requests=30",
                                                "trace.prompt_len.mean=2048", "kv_capacity_tokens=16384",
                                                "max_model_len=4096", f"engine.fast_forward={str(fast).lower()}"])
        summary = run(cfg, tmp_path / str(fast))
        timelines[fast] = pd.read_parquet(tmp_path / str(fast) / "timeline.parquet")
        assert summary["finished"] > 20 and summary["finished"] + summary["rejected"] == 30
    pd.testing.assert_frame_equal(timelines[True], timelines[False])
    t = timelines[True]
    # every context is <= max_model_len = 4096: a request reads at most 4096 x 2/13 + 512 x 11/13 =
    # 1063.4 positions (the plain count would reach 4096 per request with these 2k-token prompts)
    assert (t.kv_read_tokens <= np.ceil(t.running * 13824 / 13 + 0.5)).all()
    assert (t.kv_read_tokens > 0).all()
