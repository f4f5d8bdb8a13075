"""A sweep composes each `key=value` of its grid in the parent before any run (kvbench.cli:
check_each_value_once): a bad value in the last job still stops the sweep before the first run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvbench.cli import check_each_value_once

REPO = Path(__file__).resolve().parents[1]


def test_the_parent_composes_the_jobs_that_bring_a_new_value(monkeypatch):
    # the class Hydra keeps: its plugin scan executes the module anew, so import it after the scan
    from hydra.core.plugins import Plugins

    Plugins.instance()
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    composed: list = []
    monkeypatch.setattr(BasicSweeper, "validate_batch_is_legal", lambda self, batch: composed.extend(batch))
    check_each_value_once()
    grid = [[f"strategy={s}", f"trace.rate={r}"] for s in ("slab", "paged", "radix") for r in range(1, 6)]
    BasicSweeper.validate_batch_is_legal(object(), grid)
    assert composed == grid[:5] + [grid[5], grid[10]]  # 5 rates with slab, then paged, radix
    check_each_value_once()  # installed once: not wrapped twice
    composed.clear()
    BasicSweeper.validate_batch_is_legal(object(), grid[:2])
    assert composed == grid[:2]


def test_a_bad_value_in_the_last_job_stops_the_sweep_before_any_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", "-m", "strategy=slab,paged", "trace.num_requests=5",
                          "progress=false", "max_model_len=64,not_a_number", f"hydra.sweep.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("kvbench: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "not_a_number" in out.stderr, out.stderr
    assert not list(tmp_path.glob("*/summary.json")) and not list(tmp_path.glob("*/.hydra"))


def test_a_node_that_passed_is_not_checked_again_and_a_bad_one_always_fails(monkeypatch):
    """validate(cfg, plain) skips the nodes whose resolved values passed before in this process
    (a sweep's jobs repeat them); a bad value raises whether or not a good one passed first."""
    import pytest
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kvbench import schema

    schema.register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        good = [compose("config", overrides=["strategy=paged", f"trace.rate={r}"]) for r in (1, 2)]
        bad = compose("config", overrides=["strategy=paged", "strategy.page_size=-4"])
    checked: list[str] = []
    whole = schema.validate_node
    monkeypatch.setattr(schema, "validate_node", lambda key, node, target=None: (checked.append(key), whole(key, node, target)))
    monkeypatch.setattr(schema, "_PASSED", {})
    for cfg in good:
        schema.validate(cfg, OmegaConf.to_container(cfg, resolve=True))
    top = [k for k in checked if "." not in k]  # (nested nodes, e.g. trace.input_len, are checked inside their group's)
    assert sorted(top) == sorted(["scheduler", "strategy", "engine", "trace", "logger", "trace"])  # (the rate is the trace's)
    for plain in (OmegaConf.to_container(bad, resolve=True), None):
        with pytest.raises(schema.ConfigError, match="strategy.page_size"):
            schema.validate(bad, plain)
    checked.clear()
    schema.validate(good[0])  # without the resolved config: every node, every time
    assert sorted(k for k in checked if "." not in k) == ["engine", "logger", "scheduler", "strategy", "trace"]
