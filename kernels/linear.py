"""Linear layer for decode-sized batches: y = x @ W^T (+ b) for x of at most 16 rows.

A decode step of a small batch reads every weight once and does almost no arithmetic, so its
matmuls should stream W at the copy bandwidth. Measured on an H200 (docs/model.md), cuBLAS
picks split-K kernels for the 4096-wide projections of Llama-3.1-8B at batch 1 that reach ~3.1
TB/s (plus a separate reduction kernel); this kernel gives each program BLOCK_N output columns
over the whole K, pads x to 16 rows for one tensor-core dot per K tile, and is autotuned per
(N, K) on the GPU. Larger batches (and the lm_head) use ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._common import (ATTN_DTYPES, cdiv, check, check_backend, check_tensor, dot_in_f32, dot_precision, kernel_for,
                      make_plan, pdl_args, pdl_begin, pdl_late, use_interpreter)

MAX_M = 16          # rows handled by the kernel (x padded to one 16-row tile); more -> F.linear
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,          # x [M, K], W [N, K], b [N], y [M, N]
    ws_ptr, cnt_ptr,                     # split-K: fp32 partials [SPLIT_K, BLOCK_M, N], int32 arrivals per column block
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:   # program (n, s) takes the s-th of SPLIT_K equal runs of whole K tiles
        k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = tl.program_id(1) * k_per
        k_hi = tl.minimum(K, k_lo + k_per)
    pdl_begin(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)   # [BN, BK]
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        if DOT_F32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)                             # [BM, BN]
    pdl_late(PDL)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        # every program of a column block leaves its partial sum; the last to arrive adds them in
        # the order s = 0..SPLIT_K-1 (the result does not depend on which program is last) and
        # sets the block's arrival count back to 0 for the next call
        part = ws_ptr + (offs_m[:, None] + tl.program_id(1) * BLOCK_M) * N + offs_n[None, :]
        tl.store(part, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + (offs_m[:, None] + s * BLOCK_M) * N + offs_n[None, :], mask=out_mask,
                               other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=out_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=out_mask)


MAX_SPLIT_K = 8
_SCRATCH: dict = {}   # (device, N) -> (fp32 partials [MAX_SPLIT_K, MAX_M, N], int32 arrivals [cdiv(N, 16)])


def split_scratch(N: int, device: torch.device):
    """The split-K scratch of an output width on a device, made once and kept: the arrival counts
    are zero between calls (the last program of a column block resets its count), so launches on
    one stream, eager or replayed from a CUDA graph, share it. Kernels on other streams at the same
    time must not."""
    key = (device, N)
    got = _SCRATCH.get(key)
    if got is None:
        got = _SCRATCH[key] = (torch.empty((MAX_SPLIT_K, MAX_M, N), dtype=torch.float32, device=device),
                               torch.zeros(cdiv(N, 16), dtype=torch.int32, device=device))
    return got


_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk), num_warps=w, num_stages=s)
            for bn, bk, w, s, sk in [(16, 256, 4, 4, 1), (16, 512, 4, 3, 1), (16, 512, 4, 4, 1), (32, 256, 4, 4, 1),
                                     (32, 512, 4, 3, 1), (32, 128, 4, 6, 1), (64, 128, 4, 4, 1), (64, 256, 8, 3, 1),
                                     (16, 1024, 8, 2, 1), (16, 128, 2, 8, 1),
                                     (16, 256, 4, 4, 2), (16, 256, 4, 4, 4), (32, 256, 4, 4, 2), (32, 256, 4, 4, 4),
                                     (64, 256, 8, 3, 4), (64, 128, 4, 4, 8), (32, 512, 4, 3, 8)]]
# GPU: benchmark the configs on the first call of each (N, K) (the engine's warm-up makes that
# call before any timed step or CUDA-graph capture) and keep the fastest
_gemv_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "HAS_BIAS"])(_gemv_kernel)


def linear(x, weight, bias=None, *, backend: str = "triton"):
    """y = x @ weight.T + bias. x [M, K], weight [N, K] (rows contiguous), bias [N] or None.
    The kernel runs for M <= MAX_M with backend="triton"; otherwise (and for backend="torch")
    this is ``F.linear``."""
    key, ok = None, False
    if backend == "triton" and x.is_cuda:
        # the hit path (data pointers go to the C launcher as ints: no data_ptr call and pointer
        # check there)
        px, pw = x.data_ptr(), weight.data_ptr()
        if bias is None:
            pb, bias_key = pw, None
        else:
            pb, bias_key = bias.data_ptr(), (bias.shape, bias.stride(), bias.dtype, bias.device)
        ok = not (px | pw | pb) & 15                          # all 16-byte aligned (Triton specializes on it)
        # everything the checks and the compiled code (autotuned per N, K) depend on
        key = (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), weight.dtype, weight.device,
               bias_key, _common._pdl_mode, MAX_M)
        hit = _PLANS.get(key) if ok else None
        if hit is not None:
            plan, grid, split, shape = hit
            y = x.new_empty(shape)
            plan(grid, split, 1, px, pw, pb, y.data_ptr())
            return y
    check_backend(backend)
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
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if use_interpreter(x.device):
        ws = cnt = y      # (unused by SPLIT_K=1)
    else:
        ws, cnt = split_scratch(N, x.device)
    args = (x, weight, bias if bias is not None else weight, y, ws, cnt, M, N, K,
            x.stride(0), weight.stride(0), y.stride(0))
    meta = dict(HAS_BIAS=bias is not None, DOT_F32=dot_in_f32(x.dtype, x.device),
                DOT_PREC=dot_precision(x.dtype), BLOCK_M=MAX_M, **pdl_args(x.device))
    if use_interpreter(x.device):
        kernel_for(_gemv_kernel, x.device)[(cdiv(N, INTERPRET_CONFIG["BLOCK_N"]),)](
            *args, **meta, **INTERPRET_CONFIG)
    else:
        kernel = _gemv_tuned[lambda c: (cdiv(N, c["BLOCK_N"]), c["SPLIT_K"])](*args, **meta)
        best = getattr(_gemv_tuned, "best_config", None)
        if ok and best is not None:
            kwargs = dict(meta, **best.all_kwargs())
            plan = make_plan(kernel, _gemv_kernel, args, kwargs, 4, x.device)
            if plan is not None:
                _PLANS[key] = (plan, cdiv(N, best.kwargs["BLOCK_N"]), best.kwargs["SPLIT_K"], (M, N))
    return y


_PLANS: dict = {}  # key -> (plan, grid columns, split, output shape) (see _common.Plan)
