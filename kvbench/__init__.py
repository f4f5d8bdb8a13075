"""kvbench: compare KV-cache allocation strategies on the same scheduler, model and kernels."""
from pathlib import Path as _Path

# A checkout that is not pip-installed (e.g. the GPU machine's copy of the working tree, run with
# PYTHONPATH=.): pyproject's package-dir maps kvbench.strategies and kvbench.kernels to the
# top-level strategies/ and kernels/, and searching the checkout's root after kvbench/ gives
# the same names (`python -m kvbench.cli` works there). An installed kvbench finds them first.
_root = _Path(__file__).resolve().parent.parent
if (_root / "strategies" / "__init__.py").is_file() and (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))
