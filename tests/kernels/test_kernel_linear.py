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


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_silu_mul_is_the_two_launchers(dtype, M, bias):
    """silu_mul=True (at M = 1 one fused kernel: gate and up tiles, silu_mul's rounding in its
    epilogue) gives the bits of `linear` then `silu_mul`, and matches fp32 F.linear + F.silu."""
    from kvbench.kernels.silu_mul import silu_mul
    dev, gen = device(), torch.Generator().manual_seed(10 + M)
    I, K = 40, 200                                    # masked edges: neither a multiple of the tiles
    x = randn(M, 2 * K, dtype=dtype, device=dev, gen=gen)[:, :K]
    w = randn(2 * I, K, dtype=dtype, device=dev, gen=gen) * 0.1
    b = randn(2 * I, dtype=dtype, device=dev, gen=gen) if bias else None
    y = lin.linear(x, w, b, silu_mul=True)
    assert y.shape == (M, I) and y.dtype == dtype
    assert torch.equal(y, silu_mul(lin.linear(x, w, b)))
    gu = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert_close(y, F.silu(gu[:, :I]) * gu[:, I:])
    assert torch.equal(lin.linear(x, w, b, silu_mul=True, backend="torch"),
                       silu_mul(F.linear(x, w, b), backend="torch"))
    if M == 1:
        with pytest.raises(ValueError, match="even number of weight rows"):
            lin.linear(x, w[:-1], silu_mul=True)


def test_linear_falls_back_to_torch_for_big_batches_and_checks_shapes():
    dev = device()
    x, w = torch.randn(lin.MAX_M + 1, 8, device=dev), torch.randn(4, 8, device=dev)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))
    with pytest.raises(ValueError, match="K=8"):
        lin.linear(x[:2], torch.randn(4, 9, device=dev))
    with pytest.raises(ValueError, match="bias"):
        lin.linear(x[:2], w, torch.randn(5, device=dev))


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_dependent_kernel_chain_same_with_and_without_pdl(graph):
    """Each kernel reads what the one before it wrote; under programmatic dependent launch a
    missing wait would read stale data. A chain of the model's decode kernels must give exactly the
    same bits in every PDL mode, eagerly and replayed from a CUDA graph."""
    from kvbench.kernels import _common
    from kvbench.kernels.rms_norm import rms_norm
    from kvbench.kernels.silu_mul import silu_mul

    dev, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    H, I = 4096, 14336
    w_in = randn(2 * I, H, dtype=torch.bfloat16, device=dev, gen=gen) * 0.02
    w_out = randn(H, I, dtype=torch.bfloat16, device=dev, gen=gen) * 0.02
    g = randn(H, dtype=torch.bfloat16, device=dev, gen=gen)

    def chain(x0):
        x, res = x0.clone(), torch.zeros_like(x0)
        for _ in range(8):
            h = rms_norm(x, g, 1e-5, res)
            x = lin.linear(silu_mul(lin.linear(h, w_in)), w_out) + lin.linear(h[:1], w_in, silu_mul=True) @ w_out.T
        return torch.cat([x, res])

    x0 = randn(2, H, dtype=torch.bfloat16, device=dev, gen=gen)
    outs, was = [], _common.set_pdl("off")
    try:
        for mode in ("off", "early", "late"):
            _common.set_pdl(mode)
            chain(x0)                                 # compile / autotune outside the graph
            if graph:
                g_ = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g_):
                    out = chain(x0)
                g_.replay()
            else:
                out = chain(x0)
            torch.cuda.synchronize()
            outs.append(out.clone())
    finally:
        _common.set_pdl(was)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
