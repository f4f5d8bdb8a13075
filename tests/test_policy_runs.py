"""experiments/policy_runs.py: the table of a policy experiment reads each run's own files (hit
rate, TTFT max from requests.parquet, prefill tokens from timeline.parquet) and the trace's
unbounded bound; `--belady` runs paged with Belady on an experiment's setting."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from kvbench.run import run
from kvbench.schema import register
from kvbench.traces import shared_prefix, traces_dir
from kvbench.traces.belady import block_references, unbounded_hits

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("policy_runs", REPO / "experiments" / "policy_runs.py")
policy_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(policy_runs)


def test_table_reads_each_run_and_the_bound(tmp_path):
    register()
    over = ["progress=false", "trace=shared_prefix", "trace.num_groups=3", "trace.questions_per_group=6",
            "kv_capacity_tokens=8192", "max_model_len=4096"]
    for policy in ("fcfs", "lpm"):
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=[*over, f"scheduler.policy={policy}"])
        run(cfg, tmp_path / policy)
    df = policy_runs.table([tmp_path, tmp_path / "absent"])
    assert list(df.order) == ["fcfs", "lpm"]
    bound = unbounded_hits(block_references(shared_prefix(num_groups=3, questions_per_group=6, vocab_size=128256,
                                                          max_model_len=4096), 16)).token_hit_rate
    for row in df.to_dict("records"):
        d = tmp_path / row["order"]
        s = json.loads((d / "summary.json").read_text())
        assert row["hit"] == s["prefix_hit_rate"] > 0 and row["bound"] == pytest.approx(bound)
        assert row["hit/bound"] == pytest.approx(s["prefix_hit_rate"] / bound)
        assert row["TTFT max s"] == pd.read_parquet(d / "requests.parquet").ttft_s.max() >= s["ttft_p99_s"]
        assert row["prefill M tok"] * 1e6 == pytest.approx(pd.read_parquet(d / "timeline.parquet").prefill_tokens.sum())
        assert row["prefill M tok"] > 0


@pytest.mark.skipif(not (traces_dir() / "mooncake-fast25/synthetic_trace.jsonl").is_file(),
                    reason="needs the shared Mooncake trace")
def test_belady_runs_on_the_experiment_setting(tmp_path):
    s = policy_runs.run_belady("eviction_gap", tmp_path / "b", ["trace.limit=12"])
    assert s["label"] == "paged-64-belady" and s["num_requests"] == 12 and s["kv_capacity_tokens"] == 262144
