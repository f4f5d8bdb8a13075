"""End to end in the simulation: the Gemma-3-like shape through both hybrid designs under memory
pressure loses no request, writes groups_timeline.parquet whose per-step bytes sum to the pool,
and reports per-group states; a bad `layers:` description stops at config time with one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from kvbench.run import run
from kvbench.schema import ConfigError, register, validate
from kvbench.strategies.hybrid.base import GROUP_STATES

REPO = Path(__file__).resolve().parents[1]


def composed(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


@pytest.mark.parametrize("design", ["hybrid_unified", "hybrid_separate"])
def test_gemma_like_run_loses_no_request_and_reports_every_group(tmp_path, design):
    # 2048 token-equivalents (52 MiB) for 40 multi-turn requests: preemptions, hits, windows
    s = run(composed("model=gemma3_1b_like", f"strategy={design}", "trace=multi_turn", "trace.limit=40",
                     "kv_capacity_tokens=2048", "max_model_len=2048"), tmp_path)
    req = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(req) == s["num_requests"] == 40 and s["finished"] + s["rejected"] == 40
    assert set(req.status) <= {"finished", "rejected"} and (req[req.status == "rejected"].reason != "").all()
    assert s["finished"] > 30 and s["prefix_hit_rate"] > 0
    assert s["groups"] == ["local", "global"] and s["kv_capacity_bytes"] == 2048 * 26624 == s["pool_bytes"]
    groups = pd.read_parquet(tmp_path / "groups_timeline.parquet")
    timeline = pd.read_parquet(tmp_path / "timeline.parquet")
    assert groups.step.nunique() == len(timeline) == s["num_steps"]
    per_step = groups.groupby("step")[list(GROUP_STATES)].sum().sum(axis=1)
    assert (per_step == s["pool_bytes"]).all()
    fracs = sum(s[f"mem_group_{g}_{state}_frac"] for g in ("local", "global", "pool") for state in GROUP_STATES)
    assert fracs == pytest.approx(1.0)
    # the summed six states (token-equivalents) sum to the capacity at every step
    six = timeline[["token", "reserved", "internal", "external", "cached", "free"]].sum(axis=1)
    assert (six == 2048).all()
    # the sliding group holds at most its windows' pages: its token bytes stay under the full group's x 22/4
    local = groups[groups.group == "local"].token.to_numpy()
    full = groups[groups.group == "global"].token.to_numpy()
    assert (local <= full * 22 // 4).all() and (local < full * 22 // 4).any()
    if design == "hybrid_separate":
        assert s["space_pages"][0] * 16 * 22 * 1024 + s["space_pages"][1] * 16 * 4 * 1024 <= s["pool_bytes"]


def test_a_single_group_model_runs_a_hybrid_design_as_plain_paging(tmp_path):
    s = run(composed("model=llama3_2_1b", "strategy=hybrid_unified", "trace=multi_turn", "trace.limit=10",
                     "kv_capacity_tokens=4096"), tmp_path)
    p = run(composed("model=llama3_2_1b", "strategy=paged", "trace=multi_turn", "trace.limit=10",
                     "kv_capacity_tokens=4096"), tmp_path / "paged")
    for key in ("finished", "preemptions", "prefix_hit_rate", "num_steps", "duration_s", "mem_token_states_frac",
                "mem_cached_frac", "mem_free_frac"):
        assert s[key] == p[key], key


LOCAL = "model.layers.groups.local: layer group 'local': "
BAD_LAYERS = [
    ("model.layers.groups.local.window=0", LOCAL + "kind sliding needs window >= 1, got 0"),
    ("model.layers.groups.local.kind=banded", LOCAL + "kind='banded' must be one of full, sliding, chunked, state"),
    ("model.layers.pattern=[local,glob]", "model.layers.pattern: 'glob' is not a group of model.layers.groups "
                                          "(local, global)"),
    ("+model.layers.groups.global.chunk=8", "model.layers.groups.global: layer group 'global': chunk=8 is for kind "
                                            "chunked only"),
    ("model.layers.groups.local.window=1.5", "model.layers.groups.local.window=1.5: must be an integer"),
]


@pytest.mark.parametrize("override, message", BAD_LAYERS)
def test_a_bad_layers_description_is_one_config_error(override, message):
    with pytest.raises(ConfigError) as err:
        validate(composed("model=gemma3_1b_like", override))
    assert str(err.value) == message


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", "model=gemma3_1b_like",
                          "model.layers.groups.local.window=0", f"hydra.run.dir={tmp_path}", "progress=false"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "kvbench: error: model.layers.groups.local: layer group 'local': kind sliding needs window >= 1, got 0"]
    assert not (tmp_path / "summary.json").exists()


def test_shipped_hybrid_shapes_compose_and_validate():
    for model, design in (("gemma3_1b_like", "hybrid_unified"), ("gpt_oss_like", "hybrid_separate"),
                          ("hybrid_like", "paged")):
        validate(composed(f"model={model}", f"strategy={design}"))


def test_an_engine_that_reads_one_page_table_refuses_a_multi_table_design(tmp_path, monkeypatch):
    from kvbench.engines.sim import SimEngine

    monkeypatch.setattr(SimEngine, "needs_layout", True)  # as the torch and gpu engines
    with pytest.raises(ConfigError, match=r"^strategy=hybrid_unified: engine=sim reads one page table per request, "
                                          r"this design keeps 7 \(per layer group\); run it with engine=sim$"):
        run(composed("model=gemma3_1b_like", "strategy=hybrid_unified", "trace.num_requests=2"), tmp_path)
    assert not (tmp_path / "summary.json").exists()
