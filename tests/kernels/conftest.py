"""Kernel tests: CPU runs go through Triton's interpreter (TRITON_INTERPRET=1).

TRITON_INTERPRET must be in the environment before the first ``import triton`` of the process
(Triton decides interpreted vs compiled when its decorators run). It is set here at import time
when no GPU is visible. That is early enough when pytest reaches tests/kernels before anything
else imported triton; a top-level ``tests/conftest.py`` doing the same makes it order-proof.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _ensure_kvbench_kernels() -> None:
    """Make ``kvbench.kernels`` importable from a source checkout that was not pip-installed
    (the package maps ``kvbench.kernels`` to ``kernels/`` through setuptools' package-dir)."""
    try:
        import kvbench.kernels  # noqa: F401
        return
    except ImportError:
        pass
    if str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))
    import kvbench

    spec = importlib.util.spec_from_file_location(
        "kvbench.kernels", _REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(_REPO / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvbench.kernels"] = mod
    spec.loader.exec_module(mod)
    kvbench.kernels = mod


_ensure_kvbench_kernels()
