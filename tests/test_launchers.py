"""Sweeps beyond one process, for real: a small sweep through Hydra's submitit launcher (its
local executor: the Slurm launcher's code path without Slurm) and through the Ray launcher on a
local Ray head (127.0.0.1), each run's summary.json checked; a failed job is recorded as in a
local sweep (error.txt, a FAILED row, exit 2).

Opt-in (they start processes and a Ray cluster): KVBENCH_LAUNCHER_TESTS=1, with
`pip install hydra-submitit-launcher hydra-ray-launcher`. Measured on the 2-core dev machine
(2026-11-30, ray 2.60.0, hydra-ray-launcher 1.2.2, submitit 1.5.4, Python 3.11): submitit 5 s,
Ray 46 s wall, 9 s CPU in pytest, with the head's start and stop (most of it waiting for the head)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["strategy=slab,radix", "trace=synthetic", "trace.num_requests=12,0", "progress=false"]
pytestmark = pytest.mark.skipif(os.environ.get("KVBENCH_LAUNCHER_TESTS") != "1",
                                reason="opt-in: KVBENCH_LAUNCHER_TESTS=1 (starts a Ray head and submitit jobs)")


def kvbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbench.cli", "-m", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def check_sweep(out: subprocess.CompletedProcess, root: Path) -> None:
    """Jobs 0 and 2 (num_requests=12) finished with 12 requests each; jobs 1 and 3 (0) failed,
    each recorded in its run dir, in the table and in the exit code."""
    assert out.returncode == 2, out.stderr[-3000:]
    done = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/summary.json")}
    assert sorted(done) == ["0_slab-max_synthetic", "2_radix-1_synthetic"], out.stderr[-3000:]
    assert all(s["finished"] == 12 for s in done.values())
    for failed in ("1_slab-max_synthetic", "3_radix-1_synthetic"):
        assert "trace.num_requests=0" in (root / failed / "error.txt").read_text()
    rows = out.stdout[out.stdout.index("2 runs under"):].splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["0", "1", "2", "3"] and "FAILED" in rows[1] and "FAILED" in rows[3]
    assert "2 of 4 runs failed" in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="pip install hydra-submitit-launcher")
def test_a_sweep_through_submitit_local(tmp_path):
    check_sweep(kvbench("hydra/launcher=submitit_local", *SWEEP, f"hydra.sweep.dir={tmp_path}"), tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1, run in the foreground (--block) in its own process group, and
    stopped by that group's id at the end."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="kvray", dir="/tmp")  # short: Ray's socket paths
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        for _ in range(120):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not start in 60 s")
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops its cluster on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="pip install hydra-ray-launcher")
def test_a_sweep_through_ray_on_a_local_head(ray_head, tmp_path):
    root = tmp_path / "sweep"
    out = kvbench("hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_head}", *SWEEP,
                  f"hydra.sweep.dir={root}")
    check_sweep(out, root)
