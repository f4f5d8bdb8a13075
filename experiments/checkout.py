"""For scripts run on a bare checkout (a GPU machine without `pip install -e .`): put the
checkout's root on sys.path, so that `import kvbench` finds it (kvbench/__init__.py then maps
`kvbench.kernels` and `kvbench.strategies` to kernels/ and strategies/, as pyproject.toml's
package-dir does for an install)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    """The checkout's root first on sys.path, unless it is there already."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
