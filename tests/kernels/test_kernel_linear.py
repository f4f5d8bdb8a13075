"""The decode-batch linear kernel against F.linear (fp32 accumulation; one rounding at the end)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvbench.kernels import linear as lin
from kvbench.kernels.tolerances import assert_close
from kv_testlib import DTYPES_CPU, device, randn


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_small_batch(dtype, M, bias):
    dev, gen = device(), torch.Generator().manual_seed(M)
    N, K = 40, 200                                    # neither a multiple of the tiles: masked edges
    big = randn(M, 2 * K, dtype=dtype, device=dev, gen=gen)
    x = big[:, :K]                                    # strided rows
    w = randn(N, K, dtype=dtype, device=dev, gen=gen) * 0.1
    b = randn(N, dtype=dtype, device=dev, gen=gen) if bias else None
    y = lin.linear(x, w, b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, ref)


def test_linear_falls_back_to_torch_for_big_batches_and_checks_shapes():
    dev = device()
    x, w = torch.randn(lin.MAX_M + 1, 8, device=dev), torch.randn(4, 8, device=dev)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))
    with pytest.raises(ValueError, match="K=8"):
        lin.linear(x[:2], torch.randn(4, 9, device=dev))
    with pytest.raises(ValueError, match="bias"):
        lin.linear(x[:2], w, torch.randn(5, device=dev))
