"""The fused decode projections (kernels/fused_linear.py) against the unfused ops they replace:
silu_mul then linear, rms_norm (+ residual add) then linear. Bit for bit, every dtype, odd K and N
(masked tiles), with and without bias; the residual stream returned, the input untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvbench.kernels import fused_linear as fl
from kvbench.kernels import linear as lin
from kvbench.kernels.rms_norm import rms_norm, rms_norm_ref
from kvbench.kernels.silu_mul import silu_mul, silu_mul_ref
from kvbench.kernels.tolerances import assert_close
from kv_testlib import DTYPES_CPU, device, randn

dtype_ids = lambda d: str(d).split(".")[-1]  # noqa: E731
N, K = 37, 77                                   # neither a multiple of the tiles nor of 16
EPS = 1e-5


@pytest.fixture
def fuse_all(monkeypatch):
    """Fuse up to the full tile (the default limits are lower) so M = 3, 16 take the kernels."""
    monkeypatch.setattr(fl, "NORM_MAX_M", fl.TILE_M)
    monkeypatch.setattr(fl, "SILU_MAX_M", fl.TILE_M)


def weights(dtype, bias, gen, n=N, k=K):
    dev = device()
    w = randn(n, k, dtype=dtype, device=dev, gen=gen) * 0.1
    return w, (randn(n, dtype=dtype, device=dev, gen=gen) if bias else None)


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=dtype_ids)
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_silu_mul_linear_is_silu_mul_then_linear(dtype, M, bias, fuse_all):
    gen = torch.Generator().manual_seed(M)
    big = randn(M, 3 * K, dtype=dtype, device=device(), gen=gen) * 2
    gate_up = big[:, :2 * K]                    # strided rows
    w, b = weights(dtype, bias, gen)
    before = gate_up.clone()
    y = fl.silu_mul_linear(gate_up, w, b)
    assert y.shape == (M, N) and y.dtype == dtype
    assert torch.equal(y, lin.linear(silu_mul(gate_up), w, b))
    assert torch.equal(gate_up, before)
    ref = F.linear(silu_mul_ref(gate_up.float()), w.float(), None if b is None else b.float())
    assert_close(y, ref)


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=dtype_ids)
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_rms_norm_linear_with_residual_is_rms_norm_then_linear(dtype, M, bias, fuse_all):
    gen = torch.Generator().manual_seed(10 + M)
    dev = device()
    big = randn(M, 2 * K, dtype=dtype, device=dev, gen=gen)
    x = big[:, :K]                              # strided rows
    res = randn(M, K, dtype=dtype, device=dev, gen=gen)
    g = randn(K, dtype=dtype, device=dev, gen=gen)
    w, b = weights(dtype, bias, gen)
    res_in, res_unfused = res.clone(), res.clone()
    y, stream = fl.rms_norm_linear(x, g, EPS, w, b, res_in)
    y_unfused = lin.linear(rms_norm(x, g, EPS, res_unfused), w, b)
    assert y.shape == (M, N) and y.dtype == dtype and stream.shape == (M, K)
    assert torch.equal(y, y_unfused)
    assert torch.equal(stream, res_unfused)     # x + residual, rounded once
    assert torch.equal(res_in, res)             # the fused path writes a new tensor, not the input
    assert stream.data_ptr() != res_in.data_ptr()
    ref_res = res.float().clone()
    h = rms_norm_ref(x.float(), g.float(), EPS, ref_res)
    assert_close(y, F.linear(h, w.float(), None if b is None else b.float()))


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=dtype_ids)
@pytest.mark.parametrize("M", [1, 3])
def test_rms_norm_linear_without_residual(dtype, M, fuse_all):
    gen = torch.Generator().manual_seed(20 + M)
    dev = device()
    x = randn(M, K, dtype=dtype, device=dev, gen=gen) * 3
    g = randn(K, dtype=dtype, device=dev, gen=gen)
    w, b = weights(dtype, True, gen)
    y, stream = fl.rms_norm_linear(x, g, EPS, w, b)
    assert torch.equal(y, lin.linear(rms_norm(x, g, EPS), w, b))
    assert stream is x


def test_default_limits_and_fallbacks(monkeypatch):
    """Above its M limit, for backend="torch" and when linear.MAX_M sends projections to cuBLAS,
    each op is the unfused pair, and the unfused residual add is in place (as rms_norm's)."""
    gen, dev, dt = torch.Generator().manual_seed(3), device(), torch.float32
    assert 1 <= fl.NORM_MAX_M <= fl.SILU_MAX_M <= lin.MAX_M
    w, _ = weights(dt, False, gen)
    g = randn(K, dtype=dt, device=dev, gen=gen)
    for M in (fl.NORM_MAX_M + 1, lin.MAX_M + 1):
        x, res = randn(M, K, dtype=dt, device=dev, gen=gen), randn(M, K, dtype=dt, device=dev, gen=gen)
        res_ref = res.clone()
        y, stream = fl.rms_norm_linear(x, g, EPS, w, None, res)
        assert stream is res and torch.equal(y, lin.linear(rms_norm(x, g, EPS, res_ref), w))
        assert torch.equal(res, res_ref)
    for M in (fl.SILU_MAX_M + 1, lin.MAX_M + 1):
        gu = randn(M, 2 * K, dtype=dt, device=dev, gen=gen)
        assert torch.equal(fl.silu_mul_linear(gu, w), lin.linear(silu_mul(gu), w))
    gu1 = gu[:1]
    assert torch.equal(fl.silu_mul_linear(gu1, w, backend="torch"), F.linear(silu_mul_ref(gu1), w))
    calls = []
    monkeypatch.setattr(fl, "_launch", lambda *a: calls.append(a))
    monkeypatch.setattr(lin, "MAX_M", 0)        # the "cublas" A/B variant: nothing fused either
    assert torch.equal(fl.silu_mul_linear(gu1, w), F.linear(silu_mul(gu1), w))
    y, _ = fl.rms_norm_linear(gu1[:, :K], g, EPS, w)
    assert torch.equal(y, F.linear(rms_norm(gu1[:, :K], g, EPS), w)) and not calls


def test_bad_shapes_are_named(fuse_all):
    dev, dt = device(), torch.float32
    x, g, w = torch.ones(2, K, device=dev), torch.ones(K, device=dev), torch.ones(N, K, device=dev)
    with pytest.raises(ValueError, match="K=77"):
        fl.rms_norm_linear(x, g, EPS, torch.ones(N, K + 1, device=dev))
    with pytest.raises(ValueError, match="norm_weight"):
        fl.rms_norm_linear(x, torch.ones(K + 1, device=dev), EPS, w)
    with pytest.raises(ValueError, match="residual"):
        fl.rms_norm_linear(x, g, EPS, w, None, torch.ones(3, K, device=dev))
    with pytest.raises(ValueError, match="bias"):
        fl.silu_mul_linear(torch.ones(2, 2 * K, device=dev), w, torch.ones(N + 1, device=dev))
    with pytest.raises(ValueError, match="gate \\| up"):
        fl.silu_mul_linear(torch.ones(2, 2 * K + 1, device=dev, dtype=dt), w)


@pytest.mark.parametrize("op", ["silu", "rms", "rms+residual"])
def test_plan_hit_computes_what_the_checked_call_does(op, fuse_all, monkeypatch):
    """The launcher's plan hit path (pointers as ints in the kernel's argument order, the residual
    stream's new tensor) replayed on the CPU (test_kernel_plan_hits_cpu.replay_plans): bit for bit
    the checked first call's result, at each M (a plan per M)."""
    import test_kernel_plan_hits_cpu as hits_cpu
    monkeypatch.setattr(hits_cpu, "MODS", hits_cpu.MODS + (fl,))
    BF = torch.bfloat16

    def inputs(M):
        g = torch.Generator().manual_seed(M)
        x = torch.randn(M, 3 * K, dtype=BF, generator=g)[:, :2 * K if op == "silu" else K]
        w, b = torch.randn(N, K, dtype=BF, generator=g) * 0.1, torch.randn(N, dtype=BF, generator=g)
        return x, w, b, torch.randn(K, dtype=BF, generator=g), torch.randn(M, K, dtype=BF, generator=g)

    def call(x, w, b, g, r):
        if op == "silu":
            return (fl.silu_mul_linear(x, w, b),)
        r_in = r.clone()
        y, stream = fl.rms_norm_linear(x, g, EPS, w, b, r if op == "rms+residual" else None)
        assert torch.equal(r, r_in) and (stream is x) == (op == "rms")
        return y, stream
    hits_cpu._miss_then_hit(call, inputs, [3, 1, 16])


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("prefetch", [0, 2], ids=["no-prefetch", "prefetch-2"])
def test_fused_bit_identical_on_gpu_at_8b_shapes(graph, prefetch, monkeypatch):
    """Autotuned fused kernels (their own configs) against the unfused autotuned pair at Llama-3.1-8B
    shapes, M = 1..16, eagerly and replayed from a CUDA graph, with and without the L2 prefetch
    option: the same bits (and a second call, through the launch plan, the same as the first)."""
    monkeypatch.setattr(fl, "PREFETCH_TILES", prefetch)
    monkeypatch.setattr(fl, "NORM_MAX_M", fl.TILE_M)
    monkeypatch.setattr(fl, "SILU_MAX_M", fl.TILE_M)
    dev, dt, gen = torch.device("cuda"), torch.bfloat16, torch.Generator().manual_seed(0)
    H, I = 4096, 14336
    w_qkv = randn(6144, H, dtype=dt, device=dev, gen=gen) * 0.02
    w_down = randn(H, I, dtype=dt, device=dev, gen=gen) * 0.02
    g = randn(H, dtype=dt, device=dev, gen=gen)
    for M in (1, 2, 5, 16):
        x, res = randn(M, H, dtype=dt, device=dev, gen=gen), randn(M, H, dtype=dt, device=dev, gen=gen)
        gu = randn(M, 2 * I, dtype=dt, device=dev, gen=gen)

        def both():
            r = res.clone()
            y0 = lin.linear(rms_norm(x, g, 1e-5, r), w_qkv)
            y1, s1 = fl.rms_norm_linear(x, g, 1e-5, w_qkv, None, res)
            return y0, y1, r, s1, lin.linear(silu_mul(gu), w_down), fl.silu_mul_linear(gu, w_down)

        first = both()                          # autotune / compile outside any graph
        outs = both()                           # the launch plans
        if graph:
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg):
                outs = both()
            cg.replay()
        torch.cuda.synchronize()
        y0, y1, r, s1, d0, d1 = outs
        assert all(torch.equal(a, b) for a, b in zip(first, outs)), f"M={M}: a plan's launch differs"
        assert torch.equal(y0, y1) and torch.equal(r, s1) and torch.equal(d0, d1), f"M={M}"


# ------------------------------------------------------------------------------- the model
def test_model_logits_unchanged_by_the_fusions(monkeypatch):
    """A tiny bf16 Llama with a qkv bias (Qwen2-style) on the Triton backend, driven through
    prefill chunks, a mixed step and decodes: the same logits bit for bit with every fusion on
    (norms up to 16 rows) as with none (the unfused ops: the model before fused_linear)."""
    from kvbench.engines.torch_engine import TorchEngine
    from kvbench.model import ModelConfig
    from model_drive import drive, request

    cfg = ModelConfig.from_dict(dict(name="tiny", num_layers=2, hidden_size=48, intermediate_size=80, num_heads=4,
                                     num_kv_heads=2, head_dim=12, vocab_size=96, dtype="bfloat16",
                                     attention_bias=True))
    launches = []
    launch = fl._launch
    monkeypatch.setattr(fl, "_launch", lambda mode, *a: launches.append(mode) or launch(mode, *a))

    def run(silu_max, norm_max):
        monkeypatch.setattr(fl, "SILU_MAX_M", silu_max)
        monkeypatch.setattr(fl, "NORM_MAX_M", norm_max)
        eng = TorchEngine(model=cfg, attention="triton", keep_logits=True)
        for layer in eng.model.layers:          # init_random zeroes biases: make them matter
            layer.qkv.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        reqs = [request(i, n, 2, seed=i, vocab=cfg.vocab_size) for i, n in enumerate((5, 2))]
        return drive(eng, reqs, chunk=4)

    fused = run(fl.TILE_M, fl.TILE_M)
    assert launches.count(fl.MODE_SILU) > 0 and launches.count(fl.MODE_RMS) == 2 * launches.count(fl.MODE_SILU)
    launches.clear()
    unfused = run(0, 0)
    assert not launches and fused.keys() == unfused.keys() == {0, 1}
    for rid in fused:
        assert torch.isfinite(fused[rid].float()).all() and torch.equal(fused[rid], unfused[rid]), rid
