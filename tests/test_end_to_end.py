"""The whole pipeline through Hydra: configs compose, real traces replay, results land on disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from kvbench.provenance import git_commit
from kvbench.run import run
from kvbench.schema import register
from kvbench.traces import mooncake, prefix_reuse, traces_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
MOONCAKE = "mooncake-fast25/synthetic_trace.jsonl"
needs_shared_traces = pytest.mark.skipif(not traces_dir().is_dir(), reason="shared traces not found")


def run_with(tmp_path: Path, *overrides: str) -> dict:
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", *overrides])
    return run(cfg, tmp_path)


@pytest.mark.parametrize("strategy", sorted(p.stem for p in (CONFIGS / "strategy").glob("*.yaml")))
def test_default_trace_runs_and_writes_every_output(tmp_path, strategy):
    s = run_with(tmp_path, f"strategy={strategy}", "trace.num_requests=60")
    assert s["finished"] + s["rejected"] == s["num_requests"] == 60
    for key in ["strategy", "engine", "trace", "num_requests", "finished", "rejected", "preemptions",
                "duration_s", "request_throughput", "output_throughput", "total_token_throughput",
                "ttft_p99_s", "tpot_p50_s", "e2e_mean_s", "kv_capacity_tokens", "kv_bytes_per_token",
                "mem_token_states_frac", "mem_reserved_frac", "mem_internal_frag_frac",
                "mem_external_frag_frac", "mem_cached_frac", "mem_free_frac", "waste_frac",
                "peak_running", "mean_running", "prefix_hit_rate", "wall_time_s"]:
        assert key in s, key
    fracs = [s[f"mem_{k}_frac"] for k in ("token_states", "reserved", "internal_frag",
                                           "external_frag", "cached", "free")]
    assert sum(fracs) == pytest.approx(1.0)
    assert s["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2  # llama3_1_8b, bf16
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["finished"] == s["finished"] and on_disk["commit"] == git_commit()
    tl = pd.read_parquet(tmp_path / "timeline.parquet")
    assert (tl[["token", "reserved", "internal", "external", "cached", "free"]].sum(axis=1)
            == s["kv_capacity_tokens"]).all()
    assert len(pd.read_parquet(tmp_path / "requests.parquet")) == 60
    assert (tmp_path / "config.yaml").exists()


@needs_shared_traces
def test_azure_conv_slab_max_wastes_far_more_than_paged(tmp_path):
    common = ["trace=azure_conv", "trace.limit=1500", "trace.rate=20"]  # busy enough to fill the pool
    slab = run_with(tmp_path / "slab", "strategy=slab", *common)
    paged = run_with(tmp_path / "paged", "strategy=paged", *common)
    oracle = run_with(tmp_path / "oracle", "strategy=slab", "strategy.reservation=oracle", *common)
    for s in (slab, paged, oracle):
        assert s["finished"] + s["rejected"] == 1500
    assert paged["waste_frac"] < 0.04  # the vLLM paper: under 4 % for paging
    assert slab["waste_frac"] > 0.6  # Orca-style max reservations: 60-80 % and more
    assert oracle["waste_frac"] < slab["waste_frac"]
    assert paged["mean_running"] > 2 * slab["mean_running"]
    assert paged["request_throughput"] > slab["request_throughput"]


@needs_shared_traces
def test_radix_and_paged_reuse_the_prefixes_of_the_mooncake_trace(tmp_path):
    # a pool that holds the whole slice and a slow rate: hit rates reach what the trace allows
    limit = 600
    common = ["trace=mooncake", f"trace.limit={limit}", "trace.rate=0.5", "max_model_len=131072",
              "kv_capacity_tokens=10000000"]
    best = prefix_reuse(mooncake(MOONCAKE, limit=limit, vocab_size=128256), block_size=16).token_hit_rate
    assert best > 0.08
    radix = run_with(tmp_path / "radix", "strategy=radix", *common)
    paged = run_with(tmp_path / "paged", "strategy=paged", *common)
    nocache = run_with(tmp_path / "nocache", "strategy=paged", "strategy.prefix_caching=false", *common)
    assert radix["prefix_hit_rate"] >= 0.95 * best
    assert paged["prefix_hit_rate"] >= 0.95 * best
    assert nocache["prefix_hit_rate"] == 0.0
    assert radix["rejected"] == paged["rejected"] == nocache["rejected"] == 1  # a 139k-token prompt
    assert radix["rejected_reasons"] == {"max_model_len": 1}


def test_cli_sweep_prints_a_comparison_and_errors_are_one_line(tmp_path):
    # (KVBENCH_COMMIT: the commit a run's summary names where the tree has no git, a GPU machine's copy)
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", "-m", "strategy=slab,radix",
                          "trace.num_requests=30", "progress=false", f"hydra.sweep.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "KVBENCH_COMMIT": "abc1234"})
    assert out.returncode == 0, out.stderr
    assert "2 runs under" in out.stdout and "slab-max" in out.stdout and "radix-1" in out.stdout
    summaries = list(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2 and {json.loads(p.read_text())["commit"] for p in summaries} == {"abc1234"}
    bad = subprocess.run([sys.executable, "-m", "kvbench.cli", "strategy=slab", "kv_capacity_tokens=1000",
                          f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "raise kv_capacity_tokens or lower max_model_len" in bad.stderr


@pytest.mark.parametrize("args, expect", [
    (["strategy=nope"], "unknown strategy 'nope' in 'strategy=nope' (choose from: hybrid_jenga, "),
    (["-m", "trace=synthetic,nope"], "unknown trace 'nope'"),
    (["kv_capacity_tokens=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["trace=burstgpt", "trace.path=/nonexistent/burst.csv"], "trace file not found: '/nonexistent/burst.csv'"),
])
def test_cli_bad_input_is_reported_without_a_traceback(tmp_path, args, expect):
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", *args, f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0
    assert expect in out.stderr and "Traceback" not in out.stderr


def test_rerun_in_the_same_dir_keeps_finished_results_unless_redo(tmp_path):
    first = run_with(tmp_path, "trace.num_requests=20")
    marker = tmp_path / "summary.json"
    written = marker.stat().st_mtime_ns
    assert run_with(tmp_path, "trace.num_requests=20") == first
    assert marker.stat().st_mtime_ns == written  # kept, not run again
    run_with(tmp_path, "trace.num_requests=20", "redo=true")
    assert marker.stat().st_mtime_ns != written
    changed = run_with(tmp_path, "trace.num_requests=21")
    assert changed["num_requests"] == 21
