"""For scripts run on a bare checkout (a GPU machine without `pip install -e .`): make the
package-dir mappings of pyproject.toml importable (`kvbench.kernels` = kernels/,
`kvbench.strategies` = strategies/)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    """Alias kernels/ and strategies/ as subpackages of kvbench when it is not installed."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import kvbench

    for name, folder in (("kernels", "kernels"), ("strategies", "strategies")):
        try:
            importlib.import_module(f"kvbench.{name}")
            continue
        except ImportError:
            pass
        spec = importlib.util.spec_from_file_location(f"kvbench.{name}", REPO / folder / "__init__.py",
                                                      submodule_search_locations=[str(REPO / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"kvbench.{name}"] = module
        setattr(kvbench, name, module)
        spec.loader.exec_module(module)
