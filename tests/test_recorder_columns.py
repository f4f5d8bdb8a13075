"""The recorder's column storage (issue 13): a quiet run's rows a call per column, its token gaps
but the last computed later from the rows held (`Recorder._fill_gaps`). Every inter-token gap,
row and request must be those of the step-by-step replay, to the last bit, in memory or streamed
to a file in tiny row groups, whenever the gaps are filled."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import kvbench.metrics as metrics
from kvbench.metrics import TIMELINE_DTYPES, Recorder
from kvbench.replay import replay
from kvbench.run import strategy_sizes
from kvbench.scheduler import Scheduler
from kvbench.schema import register
from kvbench.timeline_file import TimelineFile

REPO = Path(__file__).resolve().parents[1]


def _replay(strategy: str, fast: bool, recorder=None):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", f"strategy={strategy}", "trace=synthetic",
                                            "trace.num_requests=150", "kv_capacity_tokens=32768"])
    engine = instantiate(cfg.engine, fast_forward=fast)
    sizes = strategy_sizes(cfg, cfg.kv_capacity_tokens)
    st = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=cfg.kv_capacity_tokens,
                                                   max_model_len=cfg.max_model_len, **sizes)
    rec = recorder(st.capacity) if recorder is not None else None
    return replay(instantiate(cfg.trace), Scheduler(st, **cfg.scheduler), engine, progress=False,
                  recorder=rec).recorder


@pytest.mark.parametrize("strategy", ["slab", "paged_nocache"])
def test_quiet_runs_give_every_gap_row_and_request_of_the_step_by_step_replay(strategy, tmp_path, monkeypatch):
    slow = _replay(strategy, fast=False)
    gaps, timeline, requests = slow.itl(), slow.timeline(), slow.requests()
    assert len(gaps) > 1000 and len(np.unique(gaps)) > 100  # many distinct gaps: a misplaced one shows
    fast = _replay(strategy, fast=True)
    assert len(fast._gap_fill) > 10  # quiet runs' gaps not computed yet
    assert fast.itl().tobytes() == gaps.tobytes()
    assert fast._gap_fill == []  # filled when the gaps were read
    assert fast.timeline().equals(timeline) and fast.requests().equals(requests)
    # gaps filled after every run, and rows streamed in groups of 5 (filled before each flush)
    monkeypatch.setattr(metrics, "_GAP_FILL", 1)
    sink = TimelineFile(tmp_path / "t.rows", TIMELINE_DTYPES)
    streamed = _replay(strategy, fast=True, recorder=lambda c: Recorder(c, sink=sink, chunk_rows=5))
    assert streamed.itl().tobytes() == gaps.tobytes()
    assert streamed.timeline().equals(timeline) and streamed.num_steps == len(timeline)
    assert streamed.last_states() == slow.last_states()
