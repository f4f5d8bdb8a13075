"""The CI speed gate (tests/bench/gate.py) on made-up pytest-benchmark results: a benchmark more
than 2x slower than its reference, relative to the calibration workload of its own run, fails
with its name, its ratio and the update command; a slower machine, a faster benchmark, a new or
a skipped one do not fail. No benchmark runs here (that is the gate's own pass, in .ci/run)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
import gate  # noqa: E402

REPLAY = "tests/bench/test_replay.py::test_replay_synthetic[paged]"
ADMIT = "tests/bench/test_allocators.py::test_admit[radix]"


def bench(fullname: str, fastest: float, timer: str) -> dict:
    return {"fullname": fullname, "name": fullname.split("::")[-1], "stats": {"min": fastest, "median": 3 * fastest},
            "options": {"timer": f"time.{timer}"}}


def run(replay_s: float, admit_s: float, calib_cpu: float = 0.016, calib_wall: float = 0.016, extra=()) -> dict:
    """pytest-benchmark's JSON as gate.run_pass leaves it, calibration samples added (the fastest
    counts, of benchmarks and calibration alike)."""
    return {"benchmarks": [bench(REPLAY, replay_s, "process_time"), bench(ADMIT, admit_s, "perf_counter"), *extra],
            "calibration": {"process_time": [2 * calib_cpu, calib_cpu, 5 * calib_cpu],
                            "perf_counter": [calib_wall, 9 * calib_wall, 1.5 * calib_wall]},
            "commit_info": {"id": "abc"}, "machine_info": {"cpu": {"brand_raw": "test CPU", "count": 2}}}


REFERENCE = gate.normalized(run(0.150, 12e-6))


def test_each_benchmark_is_divided_by_the_calibration_of_its_own_timer():
    now = gate.normalized(run(0.150, 12e-6, calib_cpu=0.015, calib_wall=0.030))
    assert now[REPLAY]["ratio"] == pytest.approx(10.0) and now[ADMIT]["ratio"] == pytest.approx(4e-4)
    assert set(now) == {REPLAY, ADMIT}
    with pytest.raises(SystemExit, match="no calibration samples"):
        gate.normalized({"benchmarks": []})


def test_a_slower_machine_passes_and_a_2x_regression_fails():
    # everything 3x slower, the calibration too: the code did not change
    assert gate.compare(gate.normalized(run(0.450, 36e-6, 0.048, 0.048)), REFERENCE)[0] == []
    # faster never fails, however much
    assert gate.compare(gate.normalized(run(0.010, 1e-6)), REFERENCE)[0] == []
    # 1.9x is within the limit; 2.5x is not, and only that benchmark is named
    assert gate.compare(gate.normalized(run(0.285, 12e-6)), REFERENCE)[0] == []
    failures, _ = gate.compare(gate.normalized(run(0.150, 30e-6)), REFERENCE)
    assert len(failures) == 1 and failures[0].startswith(f"{ADMIT}: 2.50x its reference")


def test_new_and_skipped_benchmarks_are_listed_not_failed():
    new = bench("tests/bench/test_replay.py::test_replay_synthetic[slab]", 0.08, "process_time")
    now = gate.normalized(run(0.150, 12e-6, extra=[new]))
    del now[ADMIT]
    failures, notes = gate.compare(now, REFERENCE)
    assert failures == []
    assert f"not run (skipped here?): {ADMIT}" in notes
    assert any(n.startswith("no reference yet") and n.endswith("[slab]") for n in notes)


def test_the_command_line_names_the_benchmark_the_ratio_and_the_update_command(tmp_path):
    ref, slow = tmp_path / "reference.json", tmp_path / "slow.json"
    (tmp_path / "base.json").write_text(json.dumps(run(0.150, 12e-6)))
    slow.write_text(json.dumps(run(0.400, 12e-6)))
    gate_py = [sys.executable, str(Path(gate.__file__))]
    made = subprocess.run([*gate_py, "--json", str(tmp_path / "base.json"), "--reference", str(ref), "--update"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    doc = json.loads(ref.read_text())
    assert doc["schema"] == gate.SCHEMA and doc["commit"] == "abc" and set(doc["benchmarks"]) == {REPLAY, ADMIT}
    ok = subprocess.run([*gate_py, "--json", str(tmp_path / "base.json"), "--reference", str(ref)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "passed" in ok.stdout
    bad = subprocess.run([*gate_py, "--json", str(slow), "--reference", str(ref)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"{REPLAY}: 2.67x its reference" in bad.stderr and gate.UPDATE in bad.stderr


def test_the_stored_reference_covers_the_ci_pass():
    doc = json.loads(gate.REFERENCE.read_text())
    assert doc["schema"] == gate.SCHEMA and doc["limit"] == gate.LIMIT
    names = set(doc["benchmarks"])
    assert any("test_replay_synthetic" in n for n in names) and any("test_allocators" in n for n in names)
    assert all(v["ratio"] > 0 and v["timer"] in ("process_time", "perf_counter") for v in doc["benchmarks"].values())
