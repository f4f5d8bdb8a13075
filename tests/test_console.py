"""What `kvbench` prints: one run's results in ms (as `vllm bench serve`), one sweep table with a
row per run in job order, a progress line per job, --help and --version, `experiment=` without
`+`, and run folders named by the strategy's label."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kvbench.cli import plain_args, strategy_label
from kvbench.report.console import progress_line, run_block, sweep_table

REPO = Path(__file__).resolve().parents[1]
TINY = ["trace=synthetic", "trace.num_requests=12", "progress=false"]


def kvbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbench.cli", *args], capture_output=True, text=True, cwd=REPO)


SUMMARY = {"label": "paged-16", "trace": "azure_conv", "engine": "sim", "finished": 50, "rejected": 2,
           "preemptions": 3, "duration_s": 7.5624, "request_throughput": 6.6117, "output_throughput": 834.126,
           "total_token_throughput": 3923.487, "ttft_mean_s": 0.025536, "ttft_p50_s": 0.022262, "ttft_p99_s": 0.066111,
           "tpot_mean_s": 0.0077383, "tpot_p50_s": 0.0076441, "tpot_p99_s": 0.0094708, "itl_mean_s": 0.00754,
           "itl_p50_s": 0.006676, "itl_p99_s": 0.030921, "e2e_mean_s": 0.96924, "e2e_p50_s": 0.74487,
           "e2e_p99_s": 3.89531, "mem_token_states_frac": 0.0333, "waste_frac": 0.0109, "prefix_hit_rate": 0.25,
           "mean_running": 6.38, "peak_running": 14, "wall_time_s": 0.0355}


def test_run_block_shows_mean_median_p99_in_ms_and_throughputs():
    lines = run_block(SUMMARY).splitlines()
    row = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.split() and ln.split()[0] in ("TTFT", "TPOT", "ITL", "E2E")}
    assert row == {"TTFT": ["25.54", "22.26", "66.11"], "TPOT": ["7.74", "7.64", "9.47"],
                   "ITL": ["7.54", "6.68", "30.92"], "E2E": ["969.2", "744.9", "3895"]}
    text = "\n".join(lines)
    for expect in ("Successful requests:", "Rejected requests:", "Duration (s, served):",
                   "Request throughput (req/s):", "Output token throughput (tok/s):", "Total token throughput (tok/s):"):
        assert expect in text
    assert [ln for ln in lines if ln.startswith("Total token")][0].endswith("3923.49")
    assert "paged-16 · azure_conv · sim" in lines[0]
    assert max(len(ln) for ln in lines) <= 50


def _run(tmp: Path, name: str, overrides: list[str], summary: dict | None) -> tuple[Path, dict | None, str | None]:
    d = tmp / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return d, summary, None if summary else "error: trace.limit=0: must be >= 1"


def test_sweep_table_is_one_row_per_run_in_job_order_with_the_varying_keys(tmp_path):
    rows = [_run(tmp_path, f"{n}_x", [f"strategy={s}", f"trace.rate={r}", "trace=azure_conv"],
                 {**SUMMARY, "label": s, "request_throughput": float(n)} if n != 10 else None)
            for n, (s, r) in enumerate((s, r) for s in ("slab", "paged") for r in (2, 4, 8, 16, 32, 64)) if n < 12]
    lines = sweep_table(rows[::-1]).splitlines()  # given out of order
    assert lines[0].split()[:4] == ["#", "strategy", "trace.rate", "done"]  # trace does not vary: no column
    assert "trace=azure_conv" not in lines[0] and len(lines) == 13
    assert [ln.split()[0] for ln in lines[1:]] == [str(n) for n in range(12)]  # 0, 1, 2, ..., 10, 11
    assert lines[3].split()[:4] == ["2", "slab", "8", "50"] and lines[3].split()[6] == "2.00"
    assert lines[11].split()[:4] == ["10", "paged", "32", "FAILED:"]
    assert max(len(ln) for ln in lines) < 200


def test_progress_line_counts_and_estimates():
    assert progress_line(3, 1, 12, 30.0) == "kvbench: sweep 3/12 runs done (1 failed), 30 s elapsed, ETA 1 min 30 s"
    assert progress_line(12, 0, 12, 75.0) == "kvbench: sweep 12/12 runs done, 1 min 15 s elapsed"


@pytest.mark.parametrize(("node", "label"), [
    ({"name": "slab", "reservation": "oracle", "page_size": 1}, "slab-oracle"),
    ({"name": "paged", "page_size": 16, "prefix_caching": True}, "paged-16"),
    ({"name": "paged", "page_size": 16, "prefix_caching": False}, "paged-16-nocache"),
    ({"name": "radix", "page_size": 1}, "radix-1"),
    ({"name": "radix", "page_size": 1, "eviction": "s3fifo", "cache_outputs": False, "min_cache_len": 64},
     "radix-1-s3fifo-noout-min64"),
    ({"name": "paged", "page_size": 16, "prefix_caching": True, "eviction": "lru", "cache_outputs": True}, "paged-16")])
def test_run_folders_are_named_by_the_label_the_strategy_reports(node, label):
    assert strategy_label(OmegaConf.create(node)) == label


def test_plain_args_put_multirun_first_and_accept_both_experiment_spellings():
    assert plain_args(["+experiment=page_size", "-m", "publish=true"]) == [
        "-m", "experiment=page_size", "hydra.callbacks.report.publish=true"]


def test_publish_without_an_experiment_is_one_line_and_exit_2():
    out = kvbench("-m", "strategy=slab", "publish=true")
    assert out.returncode == 2 and out.stderr == (
        "kvbench: error: publish=true writes an experiment's report to results/<name>/: use it with experiment=NAME\n")


def test_version_help_and_a_sweep_print_what_a_user_expects(tmp_path):
    version = kvbench("--version")
    assert version.returncode == 0 and version.stdout.startswith("kvbench 0.") and "Hydra 1.3" in version.stdout
    helped = kvbench("--help")
    assert helped.returncode == 0 and "powered by Hydra" not in helped.stdout
    assert "kvbench -m experiment=memory_waste" in helped.stdout and "paged, paged_nocache, radix, radix_nocache, slab" in helped.stdout
    out = kvbench("-m", "strategy=slab_oracle,radix", "trace.rate=4,16", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.parent.name for p in tmp_path.glob("*/summary.json")) == [
        "0_slab-oracle_synthetic", "1_slab-oracle_synthetic", "2_radix-1_synthetic", "3_radix-1_synthetic"]
    progress = [ln for ln in out.stderr.splitlines() if ln.startswith("kvbench: sweep")]
    assert [ln.split()[2] for ln in progress] == ["1/4", "2/4", "3/4", "4/4"]
    table = out.stdout[out.stdout.index("4 runs under"):].splitlines()[1:]
    assert table[0].split()[:3] == ["#", "strategy", "trace.rate"] and len(table) == 5
    assert [r.split()[:3] for r in table[1:]] == [["0", "slab-oracle", "4"], ["1", "slab-oracle", "16"],
                                                  ["2", "radix-1", "4"], ["3", "radix-1", "16"]]
    assert "Latency (ms)" not in out.stdout  # no per-run tables in a sweep
    finished = json.loads((tmp_path / "3_radix-1_synthetic" / "summary.json").read_text())["finished"]
    assert table[4].split()[3] == str(finished)


def test_a_bare_checkout_maps_the_package_dirs():
    """Without an install (the GPU machine runs the working tree with PYTHONPATH=.), the path
    search of kvbench's subpackages finds strategies/ and kernels/ at the checkout's root, as
    pyproject.toml's package-dir maps them for an install."""
    from importlib.machinery import PathFinder

    import kvbench

    root = Path(kvbench.__file__).resolve().parents[1]
    if not (root / "strategies").is_dir():
        pytest.skip("kvbench is installed, not run from a checkout")
    for name, folder in (("strategies", "strategies"), ("kernels", "kernels"), ("engines", "kvbench/engines")):
        spec = PathFinder.find_spec(f"kvbench.{name}", kvbench.__path__)
        assert spec is not None and Path(spec.origin) == root / folder / "__init__.py"
