"""hydra/launcher=parallel (hydra_plugins/kvbench_launcher): warm forked workers. A worker killed
mid-job fails that job only (error.txt, exit 1) and the sweep goes on in a fresh worker; bad
n_jobs gets one line and exit 2; joblib's n_jobs rule. ~10 s on 2 cores."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.cli import register_launcher

REPO = Path(__file__).resolve().parents[1]
TINY = ["trace=synthetic", "trace.num_requests=20", "progress=false"]
KILLER = """import os, signal

def trace(**kwargs):  # a trace whose loading kills the process that runs the job
    os.kill(os.getpid(), signal.SIGKILL)
"""


def kvbench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbench.cli", "-m", "hydra/launcher=parallel", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_a_killed_worker_fails_its_job_only_and_the_sweep_goes_on(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = kvbench("hydra.launcher.n_jobs=1", "strategy=slab", *TINY,
                  "trace._target_=killer.trace,kvbench.traces.synthetic", "trace.rate=4,8",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env)
    assert out.returncode == 1, out.stderr[-3000:]  # (a crash is not bad input)
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 4, runs
    done = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json"))
    failed = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/error.txt"))
    assert [r.split("_")[0] for r in done] == ["2", "3"] and [r.split("_")[0] for r in failed] == ["0", "1"]
    why = (tmp_path / "sweep" / failed[0] / "error.txt").read_text()
    assert why.startswith("kvbench: unexpected error: the worker process running this job died (signal 9)")
    assert "2 of 4 runs failed" in out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("n_jobs", ["0", "abc", "-99"])
def test_bad_n_jobs_gets_one_line_and_exit_2(tmp_path, n_jobs):
    out = kvbench(f"hydra.launcher.n_jobs={n_jobs}", "strategy=slab,paged", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvbench: error: hydra.launcher.n_jobs={n_jobs}"), lines
    assert not list(tmp_path.glob("*/summary.json"))


def test_worker_count_follows_joblib():
    register_launcher()
    from hydra_plugins.kvbench_launcher import worker_count

    assert [worker_count(n, cpus=4) for n in (1, 3, -1, -2, -4)] == [1, 3, 4, 3, 1]
    for bad in (0, -5, 1.5, "2", True):
        with pytest.raises(ValueError):
            worker_count(bad, cpus=4)


def test_yaml_from_pieces_is_the_whole_dump_byte_for_byte():
    """hydra.yaml, .hydra/config.yaml and config.yaml put together from per-key dumps (kept across
    jobs, kvbench/yaml_dump.py) equal OmegaConf's own dumps, for every experiment's config, fresh
    and from the kept pieces (in another order of jobs)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from kvbench import yaml_dump
    from kvbench.run import config_yaml
    from kvbench.schema import register

    register_launcher()
    from hydra_plugins import kvbench_launcher as L

    register()
    names = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
    cfgs = []
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for name in names:
            cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
            hydra_node = OmegaConf.to_container(cfg.hydra, resolve=False, enum_to_str=True)
            with open_dict(cfg):
                del cfg["hydra"]
            cfgs.append((hydra_node, cfg))
    yaml_dump._PIECES.clear()
    yaml_dump._CHECKED.clear()
    for hydra_node, cfg in cfgs + cfgs[::-1]:
        assert L.hydra_yaml(hydra_node) == OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_node}))
        assert L.task_yaml(cfg) == OmegaConf.to_yaml(cfg)
        assert config_yaml(cfg, OmegaConf.to_container(cfg, resolve=True)) == OmegaConf.to_yaml(cfg, resolve=True)
    assert yaml_dump._CHECKED == {"hydra": True, None: True} and len(yaml_dump._PIECES) > len(cfgs[0][0])


def test_ctrl_c_stops_the_sweep_and_each_running_job_records_it(tmp_path):
    import signal
    import time

    cmd = [sys.executable, "-m", "kvbench.cli", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
           "strategy=slab,paged,radix", "trace=synthetic", "trace.num_requests=20000", "progress=false",
           f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # a shell's background job (e.g. `.ci/run &`) ignores SIGINT and a child
                            # inherits that (test_cli_errors' Ctrl-C test does the same)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*/.hydra/config.yaml"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # both workers are in a job
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the sweep's process and its workers
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "kvbench: interrupted" and "Traceback" not in err
    why = sorted((d / "error.txt").read_text().splitlines()[0] for d in tmp_path.glob("*_synthetic"))
    assert why == ["kvbench: interrupted (Ctrl-C) before the run finished"] * 2, why
    assert not list(tmp_path.glob("*/summary.json"))
