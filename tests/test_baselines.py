"""Metric regression: every seeded replay must reproduce its file in results/baselines/ exactly.

A change that moves a number fails here until the baseline is regenerated in the same commit:
    python -m kvbench.baselines --update --reason "<one line: why>"
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from kvbench import baselines
from kvbench.baselines import CASES, Case

REPO = baselines.REPO


_COMPUTE = baselines.compute  # (the real one: a test below patches baselines.compute with `computed`)


@functools.cache
def computed(case: Case) -> dict:
    return _COMPUTE(case)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_replay_matches_its_baseline(case):
    why = baselines.missing_input(case)
    if why:
        pytest.skip(why)
    old = baselines.load(case)
    assert old is not None, f"no baseline file {case.path}; run: {baselines.UPDATE_HINT}"
    diffs = baselines.differences(old, computed(case))
    if diffs:
        pytest.fail(f"{baselines.format_differences(case.name, diffs)}\n"
                    f"If the change is intended, regenerate in the same commit:\n  {baselines.UPDATE_HINT}",
                    pytrace=False)


def test_every_baseline_file_is_a_case_is_canonical_and_has_its_reason_in_the_changelog():
    names = {c.name for c in CASES}
    logged = baselines.changelog_digests()
    files = sorted(baselines.BASELINE_DIR.glob("*.json"))
    assert {f.stem for f in files} == names, "results/baselines/ holds a file for each case, no other"
    for f in files:
        record = json.loads(f.read_text())
        assert f.read_text() == baselines.dumps(record), f"{f.name} is not in canonical form (sorted, rounded)"
        assert record["metrics"] == baselines.round_sig(record["metrics"]), f"{f.name}: unrounded floats"
        assert f"{f.stem}@{baselines.digest(record)}" in logged, (
            f"{f.name} changed without a line in results/baselines/CHANGELOG.md; "
            f"regenerate it with: {baselines.UPDATE_HINT}")


def test_results_do_not_depend_on_the_hash_seed():
    # paged prefix caching keys its table by Python's hash() of bytes, randomized per process
    cmd = [sys.executable, "-m", "kvbench.baselines", "--case", "paged-shared_prefix",
           "--case", "radix-shared_prefix"]
    for seed in ("0", "4242"):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.returncode == 0, out.stdout + out.stderr


def test_update_needs_a_reason_writes_changed_files_and_logs_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(baselines, "BASELINE_DIR", tmp_path)
    monkeypatch.setattr(baselines, "CHANGELOG", tmp_path / "CHANGELOG.md")
    monkeypatch.setattr(baselines, "compute", computed)
    one = ["--case", "radix-shared_prefix"]
    assert baselines.main([*one, "--update"]) == 2  # no reason
    assert baselines.main(one) == 1  # no file yet: a difference
    assert baselines.main([*one, "--update", "--reason", "first"]) == 0
    assert baselines.main(one) == 0
    log = (tmp_path / "CHANGELOG.md").read_text()
    record = json.loads((tmp_path / "radix-shared_prefix.json").read_text())
    assert f"radix-shared_prefix@{baselines.digest(record)}` · first" in log

    record["metrics"]["waste_frac"] = 0.5  # a regression someone tries to hide
    (tmp_path / "radix-shared_prefix.json").write_text(baselines.dumps(record))
    capsys.readouterr()
    assert baselines.main(one) == 1
    out = capsys.readouterr()
    assert "waste_frac" in out.out and "0.5" in out.out and "--update --reason" in out.err
    assert baselines.main([*one, "--update", "--reason", "second"]) == 0
    assert (tmp_path / "CHANGELOG.md").read_text().count("\n- ") == 2


def test_rounding_keeps_six_significant_digits():
    assert baselines.round_sig(0.123456789) == 0.123457
    assert baselines.round_sig(12345678.9) == 12345700.0
    assert baselines.round_sig({"a": 1, "b": 2.0, "c": None}) == {"a": 1, "b": 2.0, "c": None}
    assert baselines.round_sig(float("nan")) == "nan"
