"""Which code a result came from: the checkout's commit, named in every run's summary.json and in
the GPU records (experiments/gpu_record.py)."""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """$KVBENCH_COMMIT where set (a GPU machine's copy of the tree has no git repository, or a
    stale one), else the checkout's short commit, with "+uncommitted" when tracked files differ;
    None outside a git checkout. Asked once a process (two git calls, tens of ms)."""
    if os.environ.get("KVBENCH_COMMIT"):
        return os.environ["KVBENCH_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=REPO, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode:
        return None
    return rev.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
