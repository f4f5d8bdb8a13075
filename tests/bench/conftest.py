"""Speed benchmarks: skipped by the ordinary test command (pyproject's `-m 'not bench'`), run by

    python -m pytest tests/bench -m bench --benchmark-storage=results/benchmarks \
        --benchmark-autosave --benchmark-compare --benchmark-compare-fail=median:100%

(docs/benchmarks.md says why 100 %). Two additions to pytest-benchmark:
- where `results/benchmarks/<machine>/` holds no earlier run, the comparison is dropped with a
  note instead of pytest-benchmark's usage error (this run becomes the reference);
- the end of the run prints the goals of issue 6 with the numbers just measured;
- with $KVBENCH_GATE_CALIBRATION set to a file, the fixed workload of the CI speed gate
  (tests/bench/gate.py) is timed before every benchmark, with both timers, and the samples go
  to that file: spread over the whole pass, they see the load the benchmarks saw.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

# (benchmark name, extra_info key or None for the median, limit, text)
GOALS = [
    ("paged append of one token, amortized (us)", "test_grow_one_token[paged]", 1.0),
    ("radix match + insert, 4096-token prompt, miss (us per 16 tokens)",
     "test_radix_match_and_insert_long_prompt[miss]", 1.0),
    ("radix match + insert, 4096-token prompt, half cached (us per 16 tokens)",
     "test_radix_match_and_insert_long_prompt[half-cached]", 1.0),
]
CACHING_COST = [("synthetic_nosharing", "synthetic, 500 requests"),
                ("azure_conv_nosharing", "azure_conv, 1500 rows")]


def _earlier_runs(config) -> list[Path]:
    from pytest_benchmark.utils import get_machine_id

    storage = str(config.getoption("benchmark_storage"))
    storage = storage[len("file://"):] if storage.startswith("file://") else storage
    return sorted((Path(storage) / get_machine_id()).glob("*.json"))


def pytest_configure(config):
    if config.getoption("benchmark_compare", None) and not _earlier_runs(config):
        config.option.benchmark_compare = False
        config.option.benchmark_compare_fail = None
        session = getattr(config, "_benchmarksession", None)
        if session is not None:  # this conftest was loaded after pytest-benchmark set up its session
            session.compare, session.compare_fail, session.compared_mapping = False, None, {}
        print("kvbench: no earlier benchmark run saved for this machine: nothing to compare with; "
              "this run (with --benchmark-autosave) becomes the reference")


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    benches = {b.name: b for b in getattr(session, "benchmarks", []) if b}
    rows = []
    for text, name, limit in GOALS:
        if name in benches:
            value = benches[name].extra_info["median_per_op_us"]
            rows.append((text, f"{value:.3f}", f"<= {limit:g}", "met" if value <= limit else "NOT met"))
    for slice_name, text in CACHING_COST:
        on = benches.get(f"test_replay_prefix_caching_at_zero_hits[paged-{slice_name}]")
        off = benches.get(f"test_replay_prefix_caching_at_zero_hits[paged_nocache-{slice_name}]")
        if on and off:
            cost = on.stats.median / off.stats.median - 1
            rows.append((f"prefix caching on at 0 % hits, replay of {text} (+%)", f"{cost:+.1%}",
                         "<= +1%", "met" if cost <= 0.01 else "NOT met"))
    if rows:
        terminalreporter.section("kvbench speed goals (issue 6), medians of this run")
        width = max(len(r[0]) for r in rows)
        for text, value, limit, verdict in rows:
            terminalreporter.write_line(f"{text.ljust(width)}  {value:>8}  goal {limit:<7}  {verdict}")


_CALIBRATION: list[tuple[float, float]] = []  # (process_time, perf_counter) seconds per sample


@pytest.fixture(autouse=True)
def _gate_calibration():
    """Time the gate's calibration workload before each benchmark (only for tests/bench/gate.py)."""
    if os.environ.get("KVBENCH_GATE_CALIBRATION"):
        from gate import calibration_workload

        for _ in range(10):
            c0, w0 = time.process_time(), time.perf_counter()
            calibration_workload()
            _CALIBRATION.append((time.process_time() - c0, time.perf_counter() - w0))
    yield


def pytest_sessionfinish(session):
    path = os.environ.get("KVBENCH_GATE_CALIBRATION")
    if path and _CALIBRATION:
        Path(path).write_text(json.dumps({"process_time": [c for c, _ in _CALIBRATION],
                                          "perf_counter": [w for _, w in _CALIBRATION]}))
