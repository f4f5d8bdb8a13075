"""Resume never trusts a half-written run (issue 11): a run killed at any file write is run again,
never kept; two writers of one run dir take turns; a failed write leaves no partial file; one
bad job of a sweep is recorded and the others run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import kvbench.run as run_module
from kvbench.report import write_report
from kvbench.run import OutputError, config_hash, finished_before, locked, run
from kvbench.schema import register

REPO = Path(__file__).resolve().parents[1]
A = ["trace.num_requests=12", "progress=false"]
B = ["trace.num_requests=13", "progress=false"]
WRITES = ["requests.parquet", "timeline.parquet", "config.yaml", "summary.json"]  # in this order


def composed(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def metrics(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_time_s"}


class Killed(BaseException):
    """Stands for kill -9: not an Exception, so nothing on the way handles it."""


def kill_at_write(monkeypatch, n: int) -> None:
    """The n-th rename into place (0-based) dies before it happens, leaving its temporary file."""
    calls = []
    real_replace, real_unlink = os.replace, Path.unlink

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == n + 1:
            monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # kill -9: no clean-up
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(run_module.os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", real_unlink)


@pytest.mark.parametrize("at", range(len(WRITES)), ids=WRITES)
def test_a_run_killed_at_any_write_is_run_again_not_kept(tmp_path, monkeypatch, at):
    fresh_b = run(composed(*B), tmp_path / "fresh")
    run(composed(*A), tmp_path / "d")  # a finished run of another config in the same dir
    kill_at_write(monkeypatch, at)
    with pytest.raises(Killed):
        run(composed(*B), tmp_path / "d")
    monkeypatch.undo()
    assert list((tmp_path / "d").glob(".*.tmp*")), "the kill should leave a temporary file"
    assert finished_before(composed(*B), tmp_path / "d") is None  # B did not finish
    assert finished_before(composed(*A), tmp_path / "d") is None  # and A's results are no longer whole
    again = run(composed(*B), tmp_path / "d")
    assert metrics(again) == metrics(fresh_b)
    assert not list((tmp_path / "d").glob(".*.tmp*"))
    assert len(pd.read_parquet(tmp_path / "d" / "requests.parquet")) == 13


def test_a_torn_marker_or_table_is_never_trusted(tmp_path, capsys):
    first = run(composed(*A), tmp_path)
    assert finished_before(composed(*A), tmp_path) == first
    (tmp_path / "summary.json").write_text("")  # a 0-byte marker does not block the rerun
    assert finished_before(composed(*A), tmp_path) is None
    assert metrics(run(composed(*A), tmp_path)) == metrics(first)
    (tmp_path / "requests.parquet").write_bytes(b"")  # a 0-byte table is not 'done'
    assert finished_before(composed(*A), tmp_path) is None
    assert metrics(run(composed(*A), tmp_path)) == metrics(first)
    assert len(pd.read_parquet(tmp_path / "requests.parquet")) == 12
    capsys.readouterr()
    kept = run(composed(*A), tmp_path)  # whole and matching: kept
    assert "kept the earlier results" in capsys.readouterr().out
    assert kept == first | {"wall_time_s": kept["wall_time_s"]}
    assert json.loads((tmp_path / "summary.json").read_text())["config_hash"] == config_hash(composed(*A))


def test_redo_killed_mid_write_leaves_nothing_that_counts_as_done(tmp_path, monkeypatch):
    run(composed(*A), tmp_path)
    kill_at_write(monkeypatch, 1)
    with pytest.raises(Killed):
        run(composed(*A, "redo=true"), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "summary.json").exists()  # the old marker went first
    assert finished_before(composed(*A), tmp_path) is None


def test_a_failed_write_raises_one_output_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def full_disk(self, path, **kwargs):
        Path(path).write_bytes(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    with pytest.raises(OutputError, match=r"cannot write .*requests\.parquet: No space left on device"):
        run(composed(*A), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_second_writer_waits_for_the_first(tmp_path):
    run_dir = tmp_path / "run"
    with locked(run_dir):
        proc = subprocess.Popen([sys.executable, "-m", "kvbench.cli", *A, f"hydra.run.dir={run_dir}"], cwd=REPO,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = proc.stderr.readline()  # blocks until the second writer says it waits
        assert "is being written by another kvbench process; waiting for it" in line
        assert proc.poll() is None and not (run_dir / "summary.json").exists()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert finished_before(composed(*A), run_dir) is not None


def test_two_sweeps_into_one_dir_leave_every_run_whole(tmp_path):
    args = [sys.executable, "-m", "kvbench.cli", "-m", "strategy=slab,paged", "trace.num_requests=40",
            "progress=false", f"hydra.sweep.dir={tmp_path}"]
    procs = [subprocess.Popen(args, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    runs = sorted(tmp_path.glob("*_synthetic"))
    assert [r.name for r in runs] == ["0_slab-max_synthetic", "1_paged-16_synthetic"]
    for r in runs:
        summary = json.loads((r / "summary.json").read_text())
        assert len(pd.read_parquet(r / "requests.parquet")) == summary["num_requests"] == 40
        assert not list(r.glob(".*.tmp*"))


def test_one_bad_job_does_not_stop_the_sweep(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", "-m", "strategy=slab,paged", "max_model_len=200000",
                          "trace.num_requests=10", "progress=false", f"hydra.sweep.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr  # every failure was bad input
    slab, paged = tmp_path / "0_slab-max_synthetic", tmp_path / "1_paged-16_synthetic"
    why = "slab(max) reserves max_model_len=200000 slots per request but the pool holds 131072"
    assert why in (slab / "error.txt").read_text() and why in (slab / "run.log").read_text()
    assert not (slab / "summary.json").exists()
    assert json.loads((paged / "summary.json").read_text())["finished"] == 10
    assert "results in" in (paged / "run.log").read_text()
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("kvbench: error: 1 of 2 runs failed") and why in last
    _, col = write_report([tmp_path], tmp_path / "report", bounds=False)
    assert len(col.table) == 1 and len(col.missing) == 1
    assert why in col.missing[0].why and why in (tmp_path / "report" / "index.md").read_text()
