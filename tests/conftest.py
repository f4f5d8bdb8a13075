"""Without a GPU, Triton kernels run in its interpreter: set before anything imports triton."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Two cores shared by several processes: torch's thread pool spinning costs ~40x here. A
    module that runs the model on the CPU uses it (`pytestmark = pytest.mark.usefixtures(...)`)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)
