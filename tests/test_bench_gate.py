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


def test_a_replay_is_divided_by_the_calibration_around_its_rounds():
    # one warm-up round: blocks before it, before each timed round, and after the last; each round
    # weighs the mean of its two blocks: (2 + 4) / (1 + 2)
    assert gate.round_ratio([2.0, 4.0], [9.0, 1.0, 1.0, 3.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="need one more than the rounds"):
        gate.round_ratio([2.0, 4.0], [1.0, 1.0])
    rounds = [1.0, 1.2, 1.7, 1.1, 1.4]
    # the load moved with the rounds: each round's two blocks average to a thousandth of it
    blocks = [5e-3, 1e-3, 1e-3, 1.4e-3, 2.0e-3, 0.2e-3, 2.6e-3]

    def replay(scale: float) -> dict:
        b = bench(REPLAY, min(rounds) * scale, "process_time")
        b["stats"]["data"] = [t * scale for t in rounds]
        b["extra_info"] = {"gate_blocks": blocks}
        return {**run(0.150, 12e-6, calib_cpu=1e-4), "benchmarks": [b, bench(ADMIT, 12e-6, "perf_counter")]}

    ref = gate.normalized(replay(1.0))
    assert ref[REPLAY]["by"] == "rounds" and ref[ADMIT]["by"] == "fastest"
    assert ref[REPLAY]["ratio"] == pytest.approx(1000.0)  # every round took 1000 calibrations around it
    assert ref[REPLAY]["ratio"] != pytest.approx(min(rounds) / 1e-4)  # not the fastest round / fastest sample
    assert gate.compare(gate.normalized(replay(1.9)), ref)[0] == []
    failures, _ = gate.compare(gate.normalized(replay(2.5)), ref)
    assert len(failures) == 1 and failures[0].startswith(f"{REPLAY}: 2.50x its reference")
    # a reference measured the other way is not compared: listed, with the update command
    failures, notes = gate.compare(gate.normalized(replay(2.5)), REFERENCE)
    assert failures == [] and any(n.startswith("measured another way") and n.endswith(REPLAY) for n in notes)


def test_the_gate_plugin_brackets_every_round_of_a_process_time_benchmark(tmp_path):
    (tmp_path / "test_b.py").write_text(
        "import time\nimport pytest\n\n"
        "@pytest.mark.benchmark(timer=time.process_time)\n"
        "def test_cpu(benchmark):\n"
        "    seen = []\n"
        "    benchmark.pedantic(lambda: sum(range(10000)), setup=lambda: seen.append(1), rounds=3, warmup_rounds=1)\n"
        "    assert len(seen) == 4\n\n"
        "@pytest.mark.benchmark(timer=time.perf_counter)\n"
        "def test_wall(benchmark):\n"
        "    benchmark.pedantic(lambda: None, rounds=3)\n")
    out = tmp_path / "run.json"
    env = {**gate.bench_env(), gate.ENV: str(tmp_path / "calib.json"), "PYTHONPATH": str(Path(gate.__file__).parent)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "gate", "-p", "no:cacheprovider", "-c", "/dev/null",
           f"--benchmark-json={out}", str(tmp_path / "test_b.py")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    benches = {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}
    blocks = benches["test_cpu"]["extra_info"]["gate_blocks"]
    assert len(blocks) == 5 and min(blocks) > 0 and len(benches["test_cpu"]["stats"]["data"]) == 3
    assert "gate_blocks" not in benches["test_wall"]["extra_info"]  # microsecond rounds: the fastest-sample way
