"""Experiments, launchers and trace analysis: every experiment and launcher config composes, a
small parallel sweep runs, an interrupted sweep resumes, and the hit-rate bounds are exact."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvbench.request import Request
from kvbench.run import strategy_sizes
from kvbench.schema import register
from kvbench.traces import prefix_reuse, shared_prefix
from kvbench.traces.belady import belady_hits, block_references, hit_rate_bounds, lru_hits, unbounded_hits

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
LAUNCHERS = {"parallel": "JoblibLauncher", "slurm": "SlurmLauncher", "ray_cluster": "RayLauncher"}
TINY = ["trace=synthetic", "trace.num_requests=30", "progress=false"]


def kvbench(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbench.cli", *args], capture_output=True, text=True, cwd=cwd)


def compose_hydra(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


# ---- experiments -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_every_experiment_composes_and_builds_its_strategy(name):
    cfg = compose_hydra(f"experiment={name}")
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params, f"experiment {name} sweeps nothing"
    assert str(cfg.hydra.sweep.dir).startswith("results/multirun/"), "a fixed sweep dir makes re-runs resume"
    args = [f"{k}={v}" for k, v in params.items()]
    jobs = [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
            for job in batch]
    assert len(jobs) <= 60, "keep experiments to a few minutes on 2 cores"
    for job in jobs:
        job_cfg = compose_hydra(f"experiment={name}", *job)
        sizes = strategy_sizes(job_cfg, job_cfg.kv_capacity_tokens)  # (geometry= for a hybrid pool design)
        strategy = instantiate(job_cfg.strategy, _partial_=True)(capacity_tokens=job_cfg.kv_capacity_tokens,
                                                                 max_model_len=job_cfg.max_model_len, **sizes)
        assert strategy.capacity > 0


# ---- launchers -------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_config_composes_without_running(launcher):
    job = kvbench(f"hydra/launcher={launcher}", "strategy=radix", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert "RadixStrategy" in job.stdout
    hydra_cfg = kvbench(f"hydra/launcher={launcher}", "--cfg", "hydra")
    assert hydra_cfg.returncode == 0, hydra_cfg.stderr
    assert LAUNCHERS[launcher] in hydra_cfg.stdout


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
                    reason="hydra-joblib-launcher not installed")
def test_small_parallel_sweep_runs_every_job(tmp_path):
    out = kvbench("-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "strategy=slab,paged,radix",
                  *TINY, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.parent.name for p in tmp_path.glob("*/summary.json")) == [
        "0_slab-max_synthetic", "1_paged-16_synthetic", "2_radix-1_synthetic"]


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
                    reason="hydra-joblib-launcher not installed")
def test_a_failed_job_in_a_parallel_sweep_is_recorded_and_the_sweep_exits_2(tmp_path):
    out = kvbench("-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "strategy=slab,paged",
                  "max_model_len=200000", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    why = (tmp_path / "0_slab-max_synthetic" / "error.txt").read_text()
    assert "raise kv_capacity_tokens or lower max_model_len" in why
    assert (tmp_path / "1_paged-16_synthetic" / "summary.json").exists()
    assert out.stderr.strip().splitlines()[-1].startswith("kvbench: error: 1 of 2 runs failed")


def test_interrupted_sweep_resumes_only_the_missing_runs(tmp_path):
    args = ["-m", "strategy=slab,paged", *TINY, f"hydra.sweep.dir={tmp_path}"]
    assert kvbench(*args).returncode == 0
    kept = tmp_path / "0_slab-max_synthetic" / "summary.json"
    before = kept.stat().st_mtime_ns
    (tmp_path / "1_paged-16_synthetic" / "summary.json").unlink()  # as if killed mid-run
    again = kvbench(*args)
    assert again.returncode == 0, again.stderr
    assert "kept the earlier results" in again.stdout
    assert kept.stat().st_mtime_ns == before
    assert (tmp_path / "1_paged-16_synthetic" / "summary.json").exists()
    redo = kvbench(*args, "redo=true")
    assert redo.returncode == 0 and kept.stat().st_mtime_ns != before


def test_an_experiment_reports_into_its_sweep_folder_unless_published(tmp_path):
    """Running a documented experiment leaves results/ alone; publish=true writes it there."""
    one = ["experiment=page_size", "strategy=paged", "strategy.page_size=16", "trace=shared_prefix",
           "trace.num_groups=2", "trace.questions_per_group=3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    out = kvbench("-m", *one, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "sweep" / "report" / "index.html").exists() and not (tmp_path / "results").exists()
    published = kvbench("-m", *one, "publish=true", cwd=tmp_path)
    assert published.returncode == 0, published.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "results" / "page_size").glob("index.*")) == ["index.html", "index.md"]
    assert "kept the earlier results" in published.stdout  # publishing does not change the run's config


# ---- hit-rate bounds (kvbench/traces/belady.py) ----------------------------------------------
def req(i: int, ids: list[int]) -> Request:
    return Request(i, float(i), np.array(ids, dtype=np.int32), np.array([0], dtype=np.int32))


def test_belady_beats_lru_on_a_hand_made_trace():
    # blocks of 1 token, capacity 2:  r0 = a ab   r1 = c   r2 = a ab   r3 = c
    #   unbounded: r2 hits a, ab; r3 hits c                                    -> 3 of 6
    #   LRU: r1 evicts ab (oldest leaf); r2 hits a only, evicts c; r3 misses   -> 1 of 6
    #   Belady: at c, the furthest next use is c's own: it is not kept; r2 hits a, ab -> 2 of 6
    reqs = [req(0, [1, 2]), req(1, [3]), req(2, [1, 2]), req(3, [3])]
    refs = block_references(reqs, block_size=1, last_token_computed=False)  # every prompt token may hit
    assert refs.node.tolist() == [1, 2, 3, 1, 2, 3] and refs.num_blocks == 3
    assert unbounded_hits(refs).hit_blocks == 3
    assert lru_hits(refs, 2).hit_blocks == 1
    assert belady_hits(refs, 2).hit_blocks == 2
    assert belady_hits(refs, 3).hit_blocks == lru_hits(refs, 3).hit_blocks == 3
    assert belady_hits(refs, 0).hit_blocks == lru_hits(refs, 0).hit_blocks == 0


def test_a_block_hits_only_after_its_whole_prefix():
    # r0 = [1 2][3 4]; r1 = [9 9][3 4]: same second block ids, different prefix -> no hit
    # r2 = [1 2][3]: a partial last block is a block of its own -> hits [1 2] only
    reqs = [req(0, [1, 2, 3, 4]), req(1, [9, 9, 3, 4]), req(2, [1, 2, 3])]
    hits = unbounded_hits(block_references(reqs, block_size=2, last_token_computed=False))
    assert (hits.hit_blocks, hits.blocks, hits.hit_tokens, hits.prompt_tokens) == (1, 6, 2, 11)


def test_bounds_are_ordered_and_the_unbounded_one_is_prefix_reuse():
    reqs = shared_prefix(num_groups=6, questions_per_group=5, system_len=64, rate=float("inf"), seed=3)
    reuse = prefix_reuse(reqs, block_size=16)
    rows = hit_rate_bounds(reqs, 16, [4, 8, 16, 64, 10_000])
    unb = rows[0]
    assert (unb.hit_blocks, unb.hit_tokens) == (reuse.hit_blocks, reuse.hit_tokens)
    belady, lru = rows[1::2], rows[2::2]
    for b, lr in zip(belady, lru):
        assert 0 <= lr.hit_blocks <= b.hit_blocks <= unb.hit_blocks
    assert [b.hit_blocks for b in belady] == sorted(b.hit_blocks for b in belady)  # more room, more hits
    assert belady[-1].hit_blocks == lru[-1].hit_blocks == unb.hit_blocks  # room for every block
    assert belady[1].hit_blocks > lru[1].hit_blocks  # 8 blocks < 6 groups x 4 prompt blocks: LRU thrashes


def test_trace_stats_script_writes_its_table_and_figure(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "trace_stats.py"), "--traces", "shared_prefix",
                          "--capacities", "8", "64", "--out", str(tmp_path), "trace.num_groups=3",
                          "trace.questions_per_group=4"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "hit_rate_bounds.csv").read_text().splitlines()
    assert len(table) == 1 + 1 + 2 * 2  # header, unbounded, (belady, lru) x 2 capacities
    assert (tmp_path / "hit_rate_vs_capacity.png").stat().st_size > 5000


def test_first_launch_splits_each_graph_shapes_first_step_from_later_ones(tmp_path):
    """experiments/first_launch.py: a step with prefill is "first" when no earlier step had its
    (token bucket, decode-row bucket); medians of first and later steps, and each over the median
    decode-only step of the same batch size."""
    import json

    import pandas as pd
    spec = importlib.util.spec_from_file_location("first_launch", REPO / "experiments" / "first_launch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # decode-only steps of 4 rows take 1 ms; 40-token prefills beside 4 decodes 3 ms the first
    # time and 2 ms after; 41 tokens is the same token bucket (a later step), 200 tokens another
    prefill = [(40, 3e-3), (40, 2e-3), (41, 2e-3), (200, 5e-3), (200, 4e-3)]
    t = pd.DataFrame({"prefill_tokens": [0, 0, *(p for p, _ in prefill)], "decode_tokens": 4,
                      "dt_s": [1e-3, 1e-3, *(d for _, d in prefill)]})
    t.to_parquet(tmp_path / "timeline.parquet")
    (tmp_path / "summary.json").write_text(json.dumps({"graph_warmup": "decode", "cuda_graph_captures_in_replay": 2}))
    got = {r["prefill tokens"]: r for r in mod.rows(tmp_path)}
    assert set(got) == {"1-64", "65-256"}
    assert got["1-64"]["steps first / later"] == "1 / 2" and got["1-64"]["ms first / later"] == "3.00 / 2.00"
    assert got["1-64"]["x decode step first / later"] == "3.00 / 2.00"
    assert got["65-256"]["steps first / later"] == "1 / 1" and got["65-256"]["ms first / later"] == "5.00 / 4.00"


def test_window_decode_bench_extend_rows_per_page_layout(tmp_path):
    """experiments/window_decode_bench.py --extend-pages (the interpreter's tiny shapes): one extend
    and one decode row per page layout (16 shuffled, 1 shuffled, 1 in order), each extend checked
    against the torch reference over the same K/V; a layout it cannot parse is one line, exit 2."""
    import pandas as pd
    script = [sys.executable, str(REPO / "experiments" / "window_decode_bench.py"), "--out", str(tmp_path), "--smoke",
              "--extend", "--no-decode", "--extend-splits", "auto"]
    out = subprocess.run(script + ["--extend-pages", "16,1,1seq"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "extend_prefix.csv", dtype={"page": str})
    ext = rows[rows.kernel.str.startswith("extend")]
    assert ext.page.tolist() == ["16", "1", "1seq"] and (ext.correct == "ok").all()
    assert rows[rows.kernel == "decode-same-context"].page.tolist() == ["16", "1", "1seq"]
    bad = subprocess.run(script + ["--extend-pages", "16,0"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--extend-pages" in bad.stderr


def test_refit_with_pairs_replays_a_shipped_model_on_runs_it_did_not_fit(tmp_path):
    """experiments/refit_with_pairs.py --models: each run is also replayed with a named engine
    config. Replayed with the engine the runs were made with, every decision and metric comes
    back exactly (errors 0), and the rows say the model was not fitted on them; a name with no
    yaml gives one line and exit 2."""
    import pandas as pd
    sweep = tmp_path / "ps_mt"
    out = kvbench("-m", "strategy=paged,radix", "engine=sim_h200_llama3_2_1b_multi_turn", "model=llama3_2_1b",
                  "trace=multi_turn", "trace.num_chats=6", "trace.rate=4", "progress=false", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-2000:]
    script = [sys.executable, str(REPO / "experiments" / "refit_with_pairs.py"), str(tmp_path)]
    got = subprocess.run([*script, "--out", str(tmp_path / "fit"), "--mixed-own", "--models",
                          "sim_h200_llama3_2_1b_multi_turn"], capture_output=True, text=True, cwd=REPO)
    assert got.returncode == 0, got.stderr[-2000:]
    df = pd.read_csv(tmp_path / "fit" / "fidelity_one_model.csv")
    mine = df[df.fit == "model sim_h200_llama3_2_1b_multi_turn"]
    assert len(mine) == 2 and mine.same_decisions.all() and not mine.fitted_on_it.any()
    assert (mine[["throughput_err", "ttft_mean_err", "tpot_mean_err"]].to_numpy() == 0).all()
    assert df[df.fit == "one_metrics"].fitted_on_it.all()
    assert "model sim_h200_llama3_2_1b_multi_turn" in (tmp_path / "fit" / "fidelity_one_model.md").read_text()
    bad = subprocess.run([*script, "--out", str(tmp_path / "bad"), "--models", "no_such_engine"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "refit_with_pairs: error: --models 'no_such_engine': no configs/engine/no_such_engine.yaml"]
    assert not (tmp_path / "bad").exists()
