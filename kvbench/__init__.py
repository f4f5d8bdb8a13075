"""kvbench: compare KV-cache allocation strategies on the same scheduler, model and kernels."""
import os as _os

# A checkout that is not pip-installed (e.g. the GPU machine's copy of the working tree, run with
# PYTHONPATH=.): pyproject's package-dir maps kvbench.strategies and kvbench.kernels to the
# top-level strategies/ and kernels/, and searching the checkout's root after kvbench/ gives
# the same names (`python -m kvbench.cli` works there). An installed kvbench finds them first.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isfile(_os.path.join(_root, d, "__init__.py")) for d in ("strategies", "kernels")):
    __path__.append(_root)
