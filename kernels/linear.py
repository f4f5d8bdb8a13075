"""Linear layer for decode-sized batches: y = x @ W^T (+ b) for x of at most 16 rows.

A decode step of a small batch reads every weight once and does almost no arithmetic, so its
matmuls should stream W at the copy bandwidth. Measured on an H200 (docs/model.md), cuBLAS
picks split-K kernels for the 4096-wide projections of Llama-3.1-8B at batch 1 that reach ~3.1
TB/s (plus a separate reduction kernel); this kernel gives each program BLOCK_N output columns
over the whole K, pads x to 16 rows for one tensor-core dot per K tile, and is autotuned per
(N, K) on the GPU. One row of x (batch 1) has its own kernel on the CUDA cores
(`_gemv_m1_kernel`; with SwiGLU's silu_mul fused in, `_gemv_m1_glu_kernel`). Larger batches (and
the lm_head) use ``F.linear``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._common import (ATTN_DTYPES, cdiv, check, check_backend, check_tensor, direct, dot_in_f32, dot_precision,
                      kernel_for, make_plan, pdl_args, pdl_begin, pdl_late, use_interpreter)
from .silu_mul import silu_mul as _silu_mul

MAX_M = 16          # rows handled by the kernel (x padded to one 16-row tile); more -> F.linear
# one row of x: `_gemv_m1_kernel` (KVBENCH_GEMV_M1=0: the padded tensor-core kernel, for A/B runs)
M1 = os.environ.get("KVBENCH_GEMV_M1", "1")
if M1 not in ("0", "1"):
    raise ValueError(f"KVBENCH_GEMV_M1={M1!r}: expected 0 or 1")
M1 = M1 == "1"
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_K=64)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,          # x [M, K], W [N, K], b [N], y [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    pdl_begin(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)   # [BN, BK]
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        if DOT_F32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)                             # [BM, BN]
    pdl_late(PDL)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_m1_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,          # x [1, K], W [N, K], b [N], y [1, N]
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row of x (a batch-1 decode step), on the CUDA cores: each thread adds its products of a
    [BLOCK_N, BLOCK_K] weight tile and x into a tile-shaped fp32 accumulator, reduced across
    threads once after the loop (no padding to 16 rows, no trip through shared memory). Blocks
    of a few rows give many programs. (The same signature as `_gemv_kernel`: one plan path.)"""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    pdl_begin(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)   # [BN, BK]
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)                                         # [BK]
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    pdl_late(PDL)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_m1_glu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,          # x [1, K], W [2I, K] (gate rows, then up rows), b [2I], y [1, I]
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """SwiGLU's gate and up projections and silu(gate) * up for one row of x, as
    `_gemv_m1_kernel` then `silu_mul` would give them (no separate launch, no [1, 2I] round trip):
    a program makes outputs [n, n + BLOCK_N) from one [2 BLOCK_N, BLOCK_K] tile a step whose rows
    are gate row n, up row I + n, gate row n + 1, ... (the loop of `_gemv_m1_kernel` with twice
    the rows), rounds each sum to y's dtype as the stored projection would be, and applies
    silu_mul's rounding (silu rounded, then the product)."""
    I = N // 2
    r = tl.arange(0, 2 * BLOCK_N)
    offs_n = tl.program_id(0) * BLOCK_N + r // 2                    # [2BN]: n, n, n + 1, n + 1, ...
    n_mask = offs_n < I
    rows = offs_n.to(tl.int64) + (r % 2).to(tl.int64) * I           # gate row, up row, ...
    w_rows = w_ptr + rows[:, None] * stride_wn
    pdl_begin(PDL)
    acc = tl.zeros([2 * BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)   # [2BN, BK]
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)                                         # [BK]
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    pdl_late(PDL)
    y = tl.sum(acc, axis=1)                                                                         # [2BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
    g, u = tl.split(tl.reshape(y.to(y_ptr.dtype.element_ty).to(tl.float32), [BLOCK_N, 2]))         # [BN] each
    s = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs, (s * u).to(y_ptr.dtype.element_ty), mask=offs < I)


_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bn, bk, w, s in [(16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 4, 4), (32, 256, 4, 4),
                                 (32, 512, 4, 3), (32, 128, 4, 6), (64, 128, 4, 4), (64, 256, 8, 3),
                                 (16, 1024, 8, 2), (16, 128, 2, 8)]]
# GPU: benchmark the configs on the first call of each (N, K) (the engine's warm-up makes that
# call before any timed step or CUDA-graph capture) and keep the fastest
_gemv_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "HAS_BIAS"])(_gemv_kernel)
# batch 1: blocks of 1-4 rows over 1k-4k columns (experiments/gemv_fma_bench.py, H200: the best
# configs of a 111-config sweep all sat there)
_M1_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
               for bn, bk, w, s in [(2, 2048, 2, 2), (2, 2048, 2, 3), (4, 2048, 4, 1), (4, 2048, 4, 3),
                                    (2, 1024, 4, 2), (1, 4096, 2, 1), (1, 2048, 1, 2), (2, 4096, 4, 1)]]
_gemv_m1_tuned = triton.autotune(configs=_M1_CONFIGS, key=["N", "K", "HAS_BIAS"])(_gemv_m1_kernel)
# SwiGLU at batch 1: a program's tile has 2 BLOCK_N rows (gate and up), so half of the row counts above
_M1_GLU_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
                   for bn, bk, w, s in [(1, 2048, 2, 2), (1, 2048, 2, 3), (2, 2048, 4, 1), (2, 2048, 4, 3),
                                        (1, 1024, 4, 2), (1, 4096, 4, 1), (2, 1024, 4, 2), (4, 1024, 4, 2)]]
_gemv_m1_glu_tuned = triton.autotune(configs=_M1_GLU_CONFIGS, key=["N", "K", "HAS_BIAS"])(_gemv_m1_glu_kernel)


def linear(x, weight, bias=None, *, silu_mul: bool = False, backend: str = "triton"):
    """y = x @ weight.T + bias. x [M, K], weight [N, K] (rows contiguous), bias [N] or None.
    The kernel runs for M <= MAX_M with backend="triton"; otherwise (and for backend="torch")
    this is ``F.linear``.

    silu_mul=True: SwiGLU's first half, ``silu_mul(x @ weight.T + bias)`` (weight = gate rows, then
    up rows; y [M, N / 2]), with the same rounding. One row of x takes one kernel
    (`_gemv_m1_glu_kernel`); otherwise it is those two launchers."""
    if silu_mul and not (backend == "triton" and M1 and x.dim() == 2 and x.shape[0] == 1 <= MAX_M):
        return _silu_mul(linear(x, weight, bias, backend=backend), backend=backend)   # (two launchers)
    key, ok = None, False
    if backend == "triton" and x.is_cuda:
        # the hit path (data pointers go to the C launcher as ints: no data_ptr call and pointer
        # check there). The key: everything the checks and the compiled code (autotuned per N, K)
        # depend on. Devices as indices (x is on the GPU: an equal index is the same GPU); x and
        # weight (whole shapes in the key) keyed as contiguous when they are (a contiguous one's
        # strides are the shape's, but on dims of size 1, whose stride reads nothing)
        px, pw = x.data_ptr(), weight.data_ptr()
        if bias is None:
            pb, bias_key = pw, None
        else:
            pb, bias_key = bias.data_ptr(), (bias.shape, bias.stride(), bias.dtype, bias.get_device())
        ok = not (px | pw | pb) & 15                          # all 16-byte aligned (Triton specializes on it)
        key = (x.shape, x.is_contiguous() or x.stride(), x.dtype, x.get_device(), weight.shape,
               weight.is_contiguous() or weight.stride(), weight.dtype, weight.get_device(), bias_key,
               _common._pdl_mode, MAX_M, M1, silu_mul)
        hit = _PLANS.get(key) if ok else None
        if hit is not None:
            # (the launch unwrapped, `_common.direct`: one Python call; sizes as arguments to
            # new_empty: a shape tuple costs ~1 us more to parse)
            launch, stream, dev, head, tail, grid, M, N = hit
            y = x.new_empty(M, N)
            launch(grid, 1, 1, stream(dev), *head, px, pw, pb, y.data_ptr(), *tail)
            return y
    check_backend(backend)
    glu = silu_mul  # (one row of x on the triton backend: others took the two launchers above)
    if backend == "torch" or x.dim() != 2 or x.shape[0] > MAX_M or x.shape[0] == 0:
        return F.linear(x, weight, bias)
    check_tensor("x", x, ndim=2, dtypes=ATTN_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x)
    M, K = x.shape
    N = weight.shape[0]
    check(weight.shape[1] == K, lambda: f"weight is {tuple(weight.shape)}, x rows have K={K}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x)
        check(bias.shape[0] == N, lambda: f"bias is [{bias.shape[0]}], expected [{N}]")
    if glu:
        check(N % 2 == 0, lambda: f"silu_mul=True needs an even number of weight rows (gate, up), got {N}")
    n_out = N // 2 if glu else N
    y = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    args = (x, weight, bias if bias is not None else weight, y, M, N, K,
            x.stride(0), weight.stride(0), y.stride(0))
    meta = dict(HAS_BIAS=bias is not None, DOT_F32=dot_in_f32(x.dtype, x.device),
                DOT_PREC=dot_precision(x.dtype), BLOCK_M=MAX_M, **pdl_args(x.device))
    jitfn, tuned = ((_gemv_m1_glu_kernel, _gemv_m1_glu_tuned) if glu else
                    (_gemv_m1_kernel, _gemv_m1_tuned) if M == 1 and M1 else (_gemv_kernel, _gemv_tuned))
    if use_interpreter(x.device):
        config = INTERPRET_CONFIG
        kernel = kernel_for(jitfn, x.device)[(cdiv(n_out, config["BLOCK_N"]),)](*args, **meta, **config)
    else:
        kernel = tuned[lambda c: (cdiv(n_out, c["BLOCK_N"]),)](*args, **meta)
        best = getattr(tuned, "best_config", None)
        config = None if best is None else best.all_kwargs()
    if ok and config is not None:   # (make_plan: None in the interpreter)
        plan = make_plan(kernel, jitfn, args, dict(meta, **config), 4, x.device)
        if plan is not None:
            _PLANS[key] = (*direct(plan), cdiv(n_out, config["BLOCK_N"]), M, n_out)
    return y


# key -> (the launch (`_common.direct`'s unwrapped plan: launch, stream, device, head, tail), grid, M, N)
_PLANS: dict = {}
