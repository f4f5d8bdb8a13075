"""kvbench-report and logger=wandb: one tidy row per run, figures on disk, missing runs listed,
and a run logged to Weights & Biases offline (or a one-line error without wandb)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from kvbench.report import write_report
from kvbench.report.collect import bin_timeline, collect, sweep_jobs
from kvbench.report.style import colour, label_order

REPO = Path(__file__).resolve().parents[1]
SMALL = ["trace=shared_prefix", "trace.num_groups=3", "trace.questions_per_group=6", "progress=false"]
FIGURES = ["memory_breakdown.png", "slot_states.png", "latency_cdf.png", "batch_size.png", "prefix_hit_rate.png"]


def kvbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbench.cli", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A finished sweep of three strategies on a small shared-prefix trace (made once)."""
    root = tmp_path_factory.mktemp("sweep")
    out = kvbench("-m", "strategy=slab,paged,radix", *SMALL, f"hydra.sweep.dir={root}")
    assert out.returncode == 0, out.stderr[-2000:]
    return root


def test_table_has_one_row_per_run_and_figures_are_written(sweep, tmp_path):
    out, col = write_report([sweep], tmp_path / "report")
    t = pd.read_csv(out / "runs.csv")
    assert sorted(t.label) == ["paged-16", "radix-1", "slab-max"]
    assert len(t) == 3 and t.run.is_unique and not col.missing
    assert set(t.trace) == {"shared_prefix"}
    # the held shares are the vLLM-paper view: token + reserved + internal + external = 1
    held = t[[f"held_{s}_frac" for s in ("token_states", "reserved", "internal_frag", "external_frag")]].sum(axis=1)
    assert np.allclose(held, 1.0)
    by = t.set_index("label")
    assert by.loc["slab-max", "waste_frac"] > 0.5 > by.loc["paged-16", "waste_frac"]
    assert by.loc["radix-1", "prefix_hit_rate"] > 0.5 and by.loc["slab-max", "prefix_hit_rate"] == 0
    for f in FIGURES:
        assert (out / f).stat().st_size > 5000, f
    index = (out / "index.md").read_text()
    assert all(f"]({f})" in index for f in FIGURES) and "Missing runs" not in index
    assert "| run | label | trace |" in (out / "runs.md").read_text()
    bounds = pd.read_csv(out / "hit_rate_bounds.csv")
    assert sorted(bounds.block_size.unique()) == [1, 16]  # a bound at each page size that hit
    bounds = bounds[bounds.block_size == 1].set_index("policy").token_hit_rate  # radix-1's
    assert bounds["unbounded"] >= bounds["belady"] >= bounds["lru"] >= 0
    assert by.loc["radix-1", "prefix_hit_rate"] <= bounds["unbounded"]


def test_a_failed_and_a_missing_run_are_listed_and_the_rest_reported(sweep, tmp_path):
    broken = tmp_path / "sweep"
    shutil.copytree(sweep, broken)
    (broken / "1_paged-16_shared_prefix" / "summary.json").unlink()  # failed: a folder, no summary
    shutil.rmtree(broken / "2_radix-1_shared_prefix")  # never ran: no folder at all
    out, col = write_report([broken])
    assert out == broken / "report"
    assert list(col.table.label) == ["slab-max"]
    index = (out / "index.md").read_text()
    assert "Missing runs (2)" in index
    assert "job 1 failed" in index and "strategy=paged" in index
    assert "job 2 never ran" in index and "strategy=radix" in index
    assert (out / "memory_breakdown.png").stat().st_size > 0


def test_sweep_jobs_expand_like_hydra(tmp_path):
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"strategy": "slab,paged", "trace": "azure_conv"}},
        "overrides": {"task": ["trace.limit=10,20", "+experiment=x"]}}}))
    assert sweep_jobs(tmp_path) == [
        ["strategy=slab", "trace=azure_conv", "trace.limit=10", "+experiment=x"],
        ["strategy=slab", "trace=azure_conv", "trace.limit=20", "+experiment=x"],
        ["strategy=paged", "trace=azure_conv", "trace.limit=10", "+experiment=x"],
        ["strategy=paged", "trace=azure_conv", "trace.limit=20", "+experiment=x"]]


def test_report_cli_on_a_folder_that_does_not_exist(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from kvbench.report import main; main()", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr == f"kvbench-report: error: no such folder: {tmp_path / 'nope'}\n"
    assert not (tmp_path / "r").exists()


def test_a_sweep_whose_runs_finished_nothing_is_reported_whole(tmp_path):
    # every request longer than max_model_len: rejected; no throughput or latency to draw on log axes
    out = kvbench("-m", "trace.rate=1,2,4", "max_model_len=8", "trace.num_requests=10", "progress=false",
                  f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    report = subprocess.run([sys.executable, "-c", "from kvbench.report import main; main()", str(tmp_path)],
                            capture_output=True, text=True)
    assert report.returncode == 0 and "warning" not in report.stderr, report.stderr
    t = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert t.finished.tolist() == [0, 0, 0] and t.rejected.tolist() == [10, 10, 10]
    index = (tmp_path / "report" / "index.md").read_text()
    assert "3 run(s)" in index and "Warning" not in index and not (tmp_path / "report" / "vs_rate.png").exists()


def test_a_figure_that_fails_is_named_and_the_rest_is_written(sweep, tmp_path, monkeypatch, capsys):
    from kvbench.report import figures

    def broken(col, out):
        raise ValueError("Data cannot be log-scaled")

    monkeypatch.setattr(figures, "latency_cdf", broken)
    out, _ = write_report([sweep], tmp_path / "report", bounds=False)
    index = (out / "index.md").read_text()
    assert "Warning: figure broken not drawn: ValueError: Data cannot be log-scaled." in index
    assert "kvbench-report: warning: figure broken not drawn" in capsys.readouterr().err
    assert (out / "memory_breakdown.png").stat().st_size > 5000 and not (out / "latency_cdf.png").exists()


def test_an_interrupted_report_leaves_the_earlier_one_as_it_was(sweep, tmp_path, monkeypatch):
    import kvbench.report.writer as report

    out, _ = write_report([sweep], tmp_path / "report", bounds=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "index_md", interrupted)  # after every figure and table is made
    with pytest.raises(KeyboardInterrupt):
        write_report([sweep], out, title="another title", bounds=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial folder, nothing replaced


def test_bin_timeline_is_time_weighted():
    # steps [0,1) running 2, [1,4) running 8 -> one bin: (2*1 + 8*3) / 4 = 6.5
    tl = pd.DataFrame({"t_s": [0.0, 1.0], "dt_s": [1.0, 3.0], "running": [2, 8], "waiting": [0, 0],
                       "token": [10, 30], "reserved": [0, 0], "internal": [0, 0], "external": [0, 0],
                       "cached": [0, 0], "free": [90, 70]})
    b = bin_timeline(tl, capacity=100, bins=1)
    assert b.running.tolist() == [6.5]
    assert b.token_states.tolist() == [pytest.approx((0.1 * 1 + 0.3 * 3) / 4)]
    assert len(bin_timeline(tl, capacity=100, bins=4)) == 2  # never more bins than steps


def test_colours_are_fixed_per_label_and_families_are_ordered():
    assert colour("paged-16") == colour("paged-16") != colour("radix-1")
    assert colour("paged-32") == colour("paged-32")  # unknown labels too
    assert label_order(["radix-1", "paged-16", "slab-max", "paged-8"]) == ["slab-max", "paged-8", "paged-16", "radix-1"]


def test_the_six_main_strategies_differ_in_colour_and_in_line_style():
    """Overlapping curves stay visible (a different dash pattern and marker), in greyscale too."""
    from matplotlib.colors import to_rgb

    from kvbench.report.style import line_style

    main = ["slab-max", "slab-pow2", "slab-oracle", "paged-16", "paged-16-nocache", "radix-1"]
    rgb = {lab: to_rgb(colour(lab)) for lab in main}
    assert min(sum(abs(x - y) for x, y in zip(rgb[a], rgb[b])) for a in main for b in main if a < b) > 0.25
    assert len({str(line_style(lab).ls) for lab in main}) == len({line_style(lab).marker for lab in main}) == 6
    assert len({line_style(lab).hatch for lab in main}) == 6


def test_collect_reads_a_single_run_folder(sweep):
    col = collect([sweep / "0_slab-max_shared_prefix"])
    assert list(col.table.label) == ["slab-max"] and len(col.timelines) == len(col.requests) == 1


# ---- logger=wandb ----------------------------------------------------------------------------
class _FakeRun:
    def __init__(self, log: dict):
        self.log_calls, self.summary, self.finished = [], {}, False
        log["run"] = self

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row):
        self.log_calls.append(row)

    def finish(self):
        self.finished = True


def test_wandb_logger_logs_config_summary_and_timeline(monkeypatch, sweep):
    from kvbench.loggers import WandbLogger

    seen: dict = {}
    fake = types.SimpleNamespace(init=lambda **kw: seen.update(init=kw) or _FakeRun(seen),
                                 Table=lambda dataframe: ("table", len(dataframe)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = sweep / "1_paged-16_shared_prefix"
    cfg = OmegaConf.load(run_dir / "config.yaml")
    summary = __import__("json").loads((run_dir / "summary.json").read_text())
    timeline = pd.read_parquet(run_dir / "timeline.parquet")
    WandbLogger(timeline_points=50).log_run(cfg, summary, timeline, pd.read_parquet(run_dir / "requests.parquet"))
    run = seen["run"]
    assert seen["init"]["mode"] == "offline"  # no key: offline
    assert seen["init"]["config"]["strategy"]["name"] == "paged"
    assert run.summary["waste_frac"] == summary["waste_frac"] and run.finished
    series = [r for r in run.log_calls if "t_s" in r]
    assert 0 < len(series) <= 50 and "timeline/token_states" in series[0]
    assert any("timeline_table" in r for r in run.log_calls)


def test_without_wandb_the_error_is_one_line(monkeypatch):
    from kvbench.loggers import WandbLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'kvbench\[wandb\]'"):
        WandbLogger()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_end_to_end(tmp_path):
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", "logger=wandb", f"logger.dir={tmp_path / 'wb'}",
                          "trace.num_requests=20", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"waste_frac" in record and b"PagedStrategy" in record  # the summary and the config
    assert list(runs[0].glob("files/media/table/timeline_table_*.table.json"))


def test_timeline_bins_split_a_long_step_over_the_bins_it_spans():
    from kvbench.report.collect import bin_timeline

    # steps [0,1) and [1,3) run 2 requests, nothing runs in [3,4), four 0.5 s steps from 4 run 4
    tl = pd.DataFrame({"t_s": [0.0, 1.0, 4.0, 4.5, 5.0, 5.5], "dt_s": [1.0, 2.0, 0.5, 0.5, 0.5, 0.5],
                       "running": [2, 2, 4, 4, 4, 4], "waiting": [0] * 6,
                       **{c: [6] * 6 for c in ["token", "reserved", "internal", "external", "cached", "free"]}})
    binned = bin_timeline(tl, capacity=36, bins=6)
    assert binned.running.tolist() == [2.0, 2.0, 2.0, 0.0, 4.0, 4.0]  # [2,3) is inside the long step
    assert binned.token_states.isna().tolist() == [False, False, False, True, False, False]


def test_panel_titles_name_how_the_trace_was_replayed():
    from kvbench.report.figures import _where
    row = lambda rate, offered: types.SimpleNamespace(trace="azure_conv", trace_rate=rate, offered_rate=offered)  # noqa: E731
    assert _where(row(4.0, 3.9)) == "azure_conv at 4 req/s"
    assert _where(row(np.inf, np.nan)) == "azure_conv, all at t=0"
    assert _where(row(np.nan, 2.5)) == "azure_conv at its own arrival times (2.5 req/s)"


def test_compare_gives_the_change_of_every_headline_metric_from_a_to_b(sweep, tmp_path):
    """B is the same grid at half the max_model_len: slab-max reserves half as much per request."""
    b_dir = tmp_path / "b"
    out = kvbench("-m", "strategy=slab,paged,radix", *SMALL, "max_model_len=8192", f"hydra.sweep.dir={b_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    cmd = [sys.executable, "-c", "from kvbench.report import main; main()", str(sweep), str(b_dir), "--compare"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    diff = pd.read_csv(b_dir / "compare" / "compare.csv")
    assert sorted(diff.run.unique()) == ["paged-16 · shared_prefix", "radix-1 · shared_prefix", "slab-max · shared_prefix"]
    a = pd.read_csv(write_report([sweep], tmp_path / "ra", bounds=False)[0] / "runs.csv").set_index("label")
    b = pd.read_csv(write_report([b_dir], tmp_path / "rb", bounds=False)[0] / "runs.csv").set_index("label")
    row = diff[(diff.run == "slab-max · shared_prefix") & (diff.metric == "waste_frac")].iloc[0]
    assert row.a == pytest.approx(a.loc["slab-max", "waste_frac"]) and row.b == pytest.approx(b.loc["slab-max", "waste_frac"])
    assert row.change == pytest.approx(row.b - row.a) and row.change_pct == pytest.approx((row.b - row.a) / row.a * 100)
    assert row.change < 0 and row.verdict == "better"
    assert {"ttft_p99_s", "tpot_p50_s", "request_throughput", "prefix_hit_rate"} <= set(diff.metric)
    assert (b_dir / "compare" / "compare.png").stat().st_size > 5000
    assert "slab-max · shared_prefix" in done.stdout and "waste_frac" in done.stdout
    refused = subprocess.run(cmd[:3] + [str(sweep), "--compare"], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
