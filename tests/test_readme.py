"""Every command of README.md's bash blocks runs as written (issue 11), with a small trace.limit
and its outputs in a temporary folder. The commands are read from the README, so the test
follows it: a new example is tested the day it is written. An experiment runs every strategy
of its grid on the first value of each other swept key (KVBENCH_README_FULL=1: its whole grid)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kvbench.traces import traces_dir

REPO = Path(__file__).resolve().parents[1]
SMALL = ["trace.limit=20", "progress=false"]
NEEDS_FILES = ("azure", "mooncake", "burstgpt", "experiment=shared_prefix")


def needs_trace_files(command: str) -> bool:
    """The command, or the experiment yaml it names, reads one of the shared trace files."""
    m = re.search(r"\bexperiment=(\w+)", command)
    text = command if m is None else command + (REPO / "configs" / "experiment" / f"{m.group(1)}.yaml").read_text()
    return any(name in text for name in NEEDS_FILES)


def readme_commands(text: str) -> list[str]:
    """The kvbench, kvbench-report and python experiments/ commands of the ```bash blocks, in
    order: comments dropped, continuations joined, `a && b` split (set-up steps are not run)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            for part in (p.strip() for p in line.split("&&")):
                if part.startswith(("kvbench ", "kvbench-report ", "python experiments/")):
                    commands.append(part)
    return commands


COMMANDS = readme_commands((REPO / "README.md").read_text())


def test_the_readme_has_the_commands_this_test_expects():
    assert sum(c.startswith("kvbench ") for c in COMMANDS) >= 6
    assert any(c.startswith("kvbench-report") for c in COMMANDS)
    assert "kvbench -m strategy=slab,paged,radix" in COMMANDS  # the quick start


def one_slice(command: str) -> list[str]:
    """For `experiment=NAME`: overrides that pin each swept key but the strategy to its first value."""
    m = re.search(r"\bexperiment=(\w+)", command)
    if m is None or os.environ.get("KVBENCH_README_FULL") == "1":
        return []
    params = OmegaConf.load(REPO / "configs" / "experiment" / f"{m.group(1)}.yaml").hydra.sweeper.params
    return [f"{k}={str(v).split(',')[0]}" for k, v in params.items() if k != "strategy" and "," in str(v)]


def run_command(command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    if words[0] == "kvbench":
        argv = [sys.executable, "-m", "kvbench.cli", *words[1:], *one_slice(command), *SMALL,
                f"hydra.run.dir={tmp_path / 'run'}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    elif words[0] == "kvbench-report":
        sweep = tmp_path / "sweep"
        made = subprocess.run([sys.executable, "-m", "kvbench.cli", "-m", "strategy=slab,radix", *SMALL,
                               f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, cwd=tmp_path)
        assert made.returncode == 0, made.stderr[-2000:]
        args = " ".join(words[1:]).replace("DIR [DIR ...]", str(sweep)).split()
        argv = [sys.executable, "-c", "from kvbench.report import main; main()", *args]
    else:  # python experiments/x.py ...: Hydra overrides come last
        argv = [sys.executable, str(REPO / words[1]), *words[2:], *SMALL[:1]]
    return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)  # cwd: results/ lands here


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_written(command, tmp_path):
    if needs_trace_files(command) and not traces_dir().is_dir():
        pytest.skip("needs the shared trace files")
    out = run_command(command, tmp_path)
    assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr and "error" not in out.stderr.lower(), out.stderr[-3000:]
    if command.startswith("kvbench "):
        summaries = list(tmp_path.rglob("summary.json"))
        jobs = 1 if " -m " not in f" {command} " else None
        assert summaries and (jobs is None or len(summaries) == jobs)
        if "experiment=" in command:  # the experiment's report: in its sweep folder; published: in results/
            published = "publish=true" in command
            assert list((tmp_path / "results").glob("*/index.md")) if published else \
                (tmp_path / "sweep" / "report" / "index.html").exists()
            assert published or not (tmp_path / "results").exists(), "an unpublished experiment wrote into results/"
    elif command.startswith("kvbench-report"):
        assert (tmp_path / "sweep" / "report" / "index.md").exists()
