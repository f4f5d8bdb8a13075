"""Where trace files live: ``$KVBENCH_TRACES``, else ``<repo>/../shared/traces``."""
from __future__ import annotations

import os
from pathlib import Path

from kvbench.traces.errors import TraceError

ENV_VAR = "KVBENCH_TRACES"


def traces_dir() -> Path:
    """The shared trace folder: ``$KVBENCH_TRACES`` if set, else ``../shared/traces`` next to
    the repository root (this file is ``<repo>/kvbench/traces/paths.py``). May not exist."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def resolve_trace_path(path: str | os.PathLike) -> Path:
    """Find a trace file: an absolute path as is; a relative one against the current directory
    (Hydra keeps it: ``hydra.job.chdir=False``), then against :func:`traces_dir`.

    Raises TraceError naming what was tried and how to fix it.
    """
    if path is None or str(path) in ("", "???"):
        raise TraceError("no trace file given: set trace.path=/path/to/file")
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, traces_dir() / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise TraceError(
        f"trace file not found: {str(path)!r} (tried {tried}); set {ENV_VAR} to the folder that "
        f"holds the traces, or pass trace.path=/absolute/path/to/file"
    )
