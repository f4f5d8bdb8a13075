"""Without a GPU, Triton kernels run in its interpreter: set before anything imports triton."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import kvbench.kernels  # noqa: F401
except ImportError:  # a bare checkout (a GPU machine without `pip install -e .`): kernels/ and strategies/ as kvbench's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments.checkout import use_checkout
    use_checkout()


@pytest.fixture(scope="module")
def one_thread():
    """Two cores shared by several processes: torch's thread pool spinning costs ~40x here. A
    module that runs the model on the CPU uses it (`pytestmark = pytest.mark.usefixtures(...)`)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)
