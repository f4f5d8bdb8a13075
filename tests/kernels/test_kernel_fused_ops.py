"""The model's fused elementwise kernels against their torch references (HF's rounding):
rms_norm (with the residual add), rope_kv_write, silu_mul."""
from __future__ import annotations

import pytest
import torch

from kvbench.kernels.rms_norm import rms_norm, rms_norm_ref
from kvbench.kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref, split_qkv
from kvbench.kernels.silu_mul import silu_mul, silu_mul_ref
from kvbench.kernels.tolerances import assert_close
from kv_testlib import DTYPES_CPU, device, randn

dtype_ids = lambda d: str(d).split(".")[-1]  # noqa: E731
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=dtype_ids)
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add+norm"])
def test_rms_norm(dtype, add):
    dev, gen = device(), torch.Generator().manual_seed(1)
    T, N = 5, 96                                          # N not a power of two: masked tail
    big = randn(T, 2 * N, dtype=dtype, device=dev, gen=gen)
    x = big[:, :N]                                        # strided rows
    w = randn(N, dtype=dtype, device=dev, gen=gen)
    res = randn(T, N, dtype=dtype, device=dev, gen=gen) if add else None
    res_ref = res.clone() if add else None
    out = rms_norm(x, w, 1e-5, res)
    ref = rms_norm_ref(x, w, 1e-5, res_ref)
    assert out.shape == (T, N) and out.dtype == dtype
    assert_close(out, ref)
    if add:  # the add is one rounding: bit-exact (Triton's CPU interpreter truncates fp32 -> bf16)
        assert torch.equal(res, res_ref) or (dev.type == "cpu" and dtype == torch.bfloat16)
        assert_close(res, res_ref)
        assert not torch.equal(res, big[:, N:])           # and it happened in place


def test_rms_norm_matches_hf_formula():
    """Against LlamaRMSNorm's formula written out, in fp32 (where rounding cannot hide)."""
    gen = torch.Generator().manual_seed(2)
    x = randn(3, 64, dtype=torch.float32, device=device(), gen=gen)
    w = randn(64, dtype=torch.float32, device=device(), gen=gen)
    hf = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert_close(rms_norm(x, w, 1e-6), hf)


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=dtype_ids)
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 64), (6, 3, 32)])   # GQA; head counts not powers of two
def test_rope_kv_write(dtype, Hq, Hkv, D):
    dev, gen = device(), torch.Generator().manual_seed(Hq)
    T, S = 7, 40
    qkv = randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, device=dev, gen=gen)
    pos = torch.tensor([0, 1, 5, 9, 100, 2047, 3], dtype=torch.float32)
    freqs = pos[:, None] / (10000.0 ** (torch.arange(0, D, 2).float() / D))[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype).to(dev), emb.sin().to(dtype).to(dev)
    slots = torch.randperm(S, generator=gen)[:T]
    slots[2] = -1                                         # padding: rotated, never written
    slots = slots.to(dev)
    kc = randn(S, Hkv, D, dtype=dtype, device=dev, gen=gen)
    vc = randn(S, Hkv, D, dtype=dtype, device=dev, gen=gen)
    qkv_r, kc_r, vc_r = qkv.clone(), kc.clone(), vc.clone()
    kc0 = kc.clone()
    q, k, v = rope_kv_write(qkv, cos, sin, kc, vc, slots, Hq, Hkv)
    rope_kv_write_ref(qkv_r, cos, sin, kc_r, vc_r, slots, Hq, Hkv)
    q_r, k_r, v_r = split_qkv(qkv_r, Hq, Hkv)
    assert q.shape == (T, Hq, D) and k.shape == (T, Hkv, D) and q.data_ptr() == qkv.data_ptr()
    assert_close(q, q_r)
    assert_close(k, k_r)
    assert torch.equal(v, v_r)                            # v is not touched
    keep = slots >= 0
    assert torch.equal(kc[slots[keep]], k[keep])          # the cache holds the rotated k, exactly
    assert torch.equal(vc[slots[keep]], v[keep])
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots[keep].cpu()] = False
    assert torch.equal(kc[untouched.to(dev)], kc0[untouched.to(dev)])


def test_rope_position_zero_is_identity_and_errors():
    dev = device()
    qkv = randn(1, 4 * 16, dtype=torch.float32, device=dev)
    before = qkv.clone()
    ones, zeros = torch.ones(1, 16, device=dev), torch.zeros(1, 16, device=dev)
    kc = torch.zeros(4, 1, 16, device=dev)
    rope_kv_write(qkv, ones, zeros, kc, kc.clone(), torch.tensor([3], device=dev), 2, 1)
    assert torch.equal(qkv, before) and torch.equal(kc[3, 0], before[0, 32:48])
    with pytest.raises(ValueError, match="qkv width"):
        rope_kv_write(qkv, ones, zeros, kc, kc.clone(), torch.tensor([3], device=dev), 3, 1)
    with pytest.raises(ValueError, match="k_cache must be"):
        rope_kv_write(qkv, ones, zeros, kc[:, :, :8], kc[:, :, :8].clone(), torch.tensor([3], device=dev), 2, 1)


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=dtype_ids)
def test_silu_mul(dtype):
    dev, gen = device(), torch.Generator().manual_seed(3)
    x = randn(4, 2 * 1100, dtype=dtype, device=dev, gen=gen) * 4   # I > one block: two column blocks
    out = silu_mul(x)
    assert out.shape == (4, 1100)
    assert_close(out, silu_mul_ref(x))
    with pytest.raises(ValueError, match="gate | up"):
        silu_mul(x[:, :-1])


@pytest.mark.gpu
@gpu
def test_fused_ops_gpu_llama8b_shapes():
    dev, gen, dt = torch.device("cuda"), torch.Generator().manual_seed(4), torch.bfloat16
    T, N, I = 64, 4096, 14336
    x, r, w = (randn(T, N, dtype=dt, device=dev, gen=gen) for _ in range(2)), None, None
    x, r = x
    w = randn(N, dtype=dt, device=dev, gen=gen)
    r2 = r.clone()
    assert_close(rms_norm(x, w, 1e-5, r), rms_norm_ref(x, w, 1e-5, r2))
    assert torch.equal(r, r2)
    g = randn(T, 2 * I, dtype=dt, device=dev, gen=gen)
    assert_close(silu_mul(g), silu_mul_ref(g))
    qkv = randn(T, 48 * 128, dtype=dt, device=dev, gen=gen)
    emb = torch.rand(T, 64, generator=gen).to(dev) * 100
    cos, sin = torch.cat((emb, emb), -1).cos().to(dt), torch.cat((emb, emb), -1).sin().to(dt)
    kc = torch.zeros(1024, 8, 128, dtype=dt, device=dev)
    slots = torch.randperm(1024, generator=gen)[:T].to(dev)
    qkv_r, kc_r, vc_r = qkv.clone(), kc.clone(), kc.clone()
    vc = kc.clone()
    q, k, v = rope_kv_write(qkv, cos, sin, kc, vc, slots, 32, 8)
    rope_kv_write_ref(qkv_r, cos, sin, kc_r, vc_r, slots, 32, 8)
    assert_close(qkv, qkv_r)
    assert torch.equal(kc[slots], k) and torch.equal(vc, vc_r)
