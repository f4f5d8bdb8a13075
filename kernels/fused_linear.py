"""Decode-size projections fused with the elementwise kernel before them (issue 12 §3).

A Llama decode layer launches about nine kernels; inside a CUDA graph each small one costs 2-3 us
whatever its bytes (H200), so at batch 1 the small kernels are ~0.8 of a 4.6 ms step. Two of
them disappear into the projection that reads their output:

    silu_mul_linear(gate_up, W)            = linear(silu_mul(gate_up), W)
    rms_norm_linear(x, g, eps, W, b, res)  = linear(rms_norm(x, g, eps, res), W, b), and the new res

Both are `linear`'s gemv (kernels/linear.py: BLOCK_N output columns per program over the whole
K, x padded to one 16-row tile) whose x tile is computed while it is loaded, in exactly the
rounding of the kernel it replaces, so the outputs are bit-identical to the unfused path:

- silu: from the gate|up rows [M, 2I], s = silu(g) in fp32 rounded to the dtype, x = s * u rounded
  (kernels/silu_mul.py).
- rms: a first pass over K computes each row's inverse RMS (the row as one vector of
  next_pow2(K) elements and num_warps of `rms_norm`'s launch, so the sum of squares is reduced in
  the same order: for sm_90 with Triton 3.6 and 3.9 the same PTX as rms_norm's, element for
  element), then x = g * (row * inv) with the roundings of kernels/rms_norm.py. With a
  residual the row is x + residual rounded to the dtype; program 0 writes it to a new tensor
  (returned), every program reads only the inputs, so nothing is read after another program wrote
  it, and repeated launches (autotuning) compute the same thing.

The GPU test in tests/kernels/test_kernel_fused_linear.py checks the bits at 8B shapes.
What a fused launch adds, per program (compiled for sm_90 with Triton 3.9, counting the SASS of
the K loop: 4 warps, BLOCK_N 16, BLOCK_K 256; `linear`'s loop is 117
instructions):

- silu: the activation math of its M rows (computed on next_pow2(M) rows in the loads' layout,
  not on the dot operand's, where every warp would compute all 16): 183 / 270 / 585 instructions
  at M = 1 / 4 / 16. At 16 the issue slots of ~2 programs an SM exceed the time their weight
  tiles take at the copy rate, hence ``SILU_MAX_M`` = 8.
- rms: 8*M*K bytes from L2 (the first pass and the tiles read x and the residual) against
  2*BLOCK_N*K of weights, and the first pass's latency before the weights stream (per row an L2
  round trip and a block reduction; the next row's loads overlap the reduction): that grows with
  M while the launch it saves does not, hence ``NORM_MAX_M`` = 4. The K loop is 129 / 156
  instructions at M = 1 / 4 (8 warps).

Both limits are estimates: experiments/fused_decode_bench.py times each fused op against the
unfused pair at M = 1..16 on the GPU. The fused path runs for 1 <= M <= its limit (and <=
``linear.MAX_M``) on the "triton" backend; otherwise, and for backend="torch", these are the
unfused ops.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from . import _common
from . import linear as _lin
from . import rms_norm as _rms
from . import silu_mul as _silu
from .linear import _prefetch_l2
from ._common import (ATTN_DTYPES, cdiv, check, check_backend, check_tensor, dot_in_f32, dot_precision, kernel_for,
                      make_plan, next_pow2, pdl_args, pdl_begin, pdl_late, use_interpreter)

SILU_MAX_M = 8      # silu_mul fused into the down projection for M <= this (module doc)
NORM_MAX_M = 4      # rms_norm fused into qkv / gate_up for M <= this (module doc)
TILE_M = 16         # x padded to one 16-row tile, as in `linear`: no limit above this
PREFETCH_TILES = 0  # 1, 2, 4: each program prefetches its first tiles of W into L2 before it waits on
                    # the kernel before it (PDL) and runs the norm's first pass (0: off, until measured)
# interpreter: linear's BLOCK_K (the dot's K order; in numpy a tile is one matmul), wider N tiles
# (columns are independent: fewer programs for the interpreter to run)
INTERPRET_CONFIG = dict(BLOCK_N=64, BLOCK_K=_lin.INTERPRET_CONFIG["BLOCK_K"])
MODE_SILU, MODE_RMS = 1, 2


@triton.jit
def _fused_gemv_kernel(
    x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, ro_ptr,   # see the launchers; unused pointers alias w
    M, N, K,
    stride_xm, stride_rm, stride_wn, stride_ym, stride_om,
    eps,
    MODE: tl.constexpr, ADD: tl.constexpr, NORM_N: tl.constexpr, NORM_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, N] = xt @ W[N, K]^T (+ b), xt computed from x while loading:
    MODE 1: x [M, 2K] (gate | up): xt = silu(gate) * up.
    MODE 2: xt = g * rmsnorm(x (+ r)); with ADD program 0 stores x + r to ro [M, K].
    The activation math runs on ROWS = next_pow2(M) rows in the loads' layout (spread over the
    threads), then the tile is padded to BLOCK_M rows for the dot: computed on the dot operand's
    layout it would run on all 16 rows in every warp. Its loads are issued one K tile ahead (they
    are too small for the pipeliner's async copies)."""
    dt = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, ROWS)
    offs_kk = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    r_mask = offs_r < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if PREFETCH > 0:   # W is no kernel's output: ask L2 for the first tiles before waiting on the last kernel
        _prefetch_l2(w_ptr, offs_n, N, K, stride_wn, PREFETCH * BLOCK_K)
    pdl_begin(PDL)
    inv = tl.zeros([ROWS], tl.float32)
    if MODE == 2:
        # first pass: each row's inverse RMS, as kernels/rms_norm.py computes it for one row
        # (row m + 1 loaded while row m is reduced, under a branch: the mask stays the constant one
        # rms_norm's has, so the loads vectorize and lay out alike)
        offs = tl.arange(0, NORM_BLOCK)
        mask = offs < NORM_N
        nx = tl.load(x_ptr + offs, mask=mask, other=0.0)
        nr = nx
        if ADD:
            nr = tl.load(r_ptr + offs, mask=mask, other=0.0)
        for m in range(0, M):
            row, res = nx, nr
            if m + 1 < M:
                nx = tl.load(x_ptr + (m + 1) * stride_xm + offs, mask=mask, other=0.0)
                if ADD:
                    nr = tl.load(r_ptr + (m + 1) * stride_rm + offs, mask=mask, other=0.0)
            if ADD:
                row = (row.to(tl.float32) + res.to(tl.float32)).to(dt)
                if pid == 0:
                    tl.store(ro_ptr + m * stride_om + offs, row, mask=mask)
            rf = row.to(tl.float32)
            inv = tl.where(offs_r == m, tl.rsqrt(tl.sum(rf * rf, 0) / NORM_N + eps), inv)
    # a: gate (silu) or x (rms); b: up (silu) or the residual (rms with ADD); gv: the norm's weight
    a_ptrs = x_ptr + offs_r[:, None] * stride_xm + offs_kk[None, :]                             # [R, BK]
    if MODE == 1:
        b_ptrs = a_ptrs + K
    else:
        b_ptrs = r_ptr + offs_r[:, None] * stride_rm + offs_kk[None, :]
    xm = r_mask[:, None] & (offs_kk < K)[None, :]
    a = tl.load(a_ptrs, mask=xm, other=0.0)
    b = a
    if MODE == 1 or ADD:
        b = tl.load(b_ptrs, mask=xm, other=0.0)
    gv = tl.zeros([BLOCK_K], dt)                                                                 # [BK]
    if MODE == 2:
        gv = tl.load(g_ptr + offs_kk, mask=offs_kk < K, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kk
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)   # [BN, BK]
        ca, cb, cg = a, b, gv
        nxt = offs_k + BLOCK_K < K                                                              # the next tile
        a = tl.load(a_ptrs + (k0 + BLOCK_K), mask=r_mask[:, None] & nxt[None, :], other=0.0)
        if MODE == 1 or ADD:
            b = tl.load(b_ptrs + (k0 + BLOCK_K), mask=r_mask[:, None] & nxt[None, :], other=0.0)
        if MODE == 1:   # kernels/silu_mul.py's rounding
            gf = ca.to(tl.float32)
            s = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
            x = (s * cb.to(tl.float32)).to(dt)                                                   # [R, BK]
        else:           # kernels/rms_norm.py's rounding
            gv = tl.load(g_ptr + (offs_k + BLOCK_K), mask=nxt, other=0.0)
            x = ca
            if ADD:
                x = (ca.to(tl.float32) + cb.to(tl.float32)).to(dt)
            h = (x.to(tl.float32) * inv[:, None]).to(dt).to(tl.float32)
            x = (cg.to(tl.float32)[None, :] * h).to(dt)                                         # [R, BK]
        if ROWS < BLOCK_M:  # pad to the dot's rows: the R rows repeated, all but the first copy zeroed
            x = tl.reshape(tl.broadcast_to(x[None, :, :], (BLOCK_M // ROWS, ROWS, BLOCK_K)), (BLOCK_M, BLOCK_K))
            x = tl.where(offs_m[:, None] < ROWS, x, 0.0)                                       # [BM, BK]
        if DOT_F32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)                             # [BM, BN]
    pdl_late(PDL)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & n_mask[None, :])


def _norm_warps() -> int:
    """num_warps of `rms_norm`'s launch as the model calls it (its default): the first pass must
    reduce with the same layout to give the same sum of squares bit for bit."""
    return inspect.signature(_rms.rms_norm).parameters["num_warps"].default


# The dot accumulates K in order in every config (mma k-steps in sequence), so any config gives
# linear's bits; the rms configs run with rms_norm's warps (see _norm_warps).
_silu_tuned = triton.autotune(configs=_lin._CONFIGS, key=["N", "K", "HAS_BIAS"])(_fused_gemv_kernel)
_NORM_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=_norm_warps(), num_stages=s)
                 for bn, bk, s in [(16, 256, 4), (16, 512, 3), (32, 256, 4), (32, 512, 3), (64, 128, 4),
                                   (64, 256, 3), (16, 1024, 2)]]
_rms_tuned = triton.autotune(configs=_NORM_CONFIGS, key=["N", "K", "HAS_BIAS"])(_fused_gemv_kernel)


def _launch(mode, key, ok, x, r, g, weight, bias, y, ro, M, N, K, strides, eps, add):
    """Compile / autotune / interpret one fused launch and make its plan (GPU, aligned inputs)."""
    w = weight
    args = (x, r if r is not None else w, g if g is not None else w, w, bias if bias is not None else w, y,
            ro if ro is not None else w, M, N, K, *strides, float(eps))
    meta = dict(MODE=mode, ADD=add, NORM_N=K if mode == MODE_RMS else 0,
                NORM_BLOCK=next_pow2(K) if mode == MODE_RMS else 1, ROWS=next_pow2(M), HAS_BIAS=bias is not None,
                DOT_F32=dot_in_f32(x.dtype, x.device), DOT_PREC=dot_precision(x.dtype), BLOCK_M=TILE_M,
                PREFETCH=0 if use_interpreter(x.device) else PREFETCH_TILES, **pdl_args(x.device))
    if use_interpreter(x.device):
        kernel = kernel_for(_fused_gemv_kernel, x.device)[(cdiv(N, INTERPRET_CONFIG["BLOCK_N"]),)](
            *args, **meta, **INTERPRET_CONFIG)
        kwargs, block_n = dict(meta, **INTERPRET_CONFIG), INTERPRET_CONFIG["BLOCK_N"]
    else:
        tuned = _rms_tuned if mode == MODE_RMS else _silu_tuned
        kernel = tuned[lambda c: (cdiv(N, c["BLOCK_N"]),)](*args, **meta)
        best = getattr(tuned, "best_config", None)
        if best is None:
            return
        kwargs, block_n = dict(meta, **best.all_kwargs()), best.kwargs["BLOCK_N"]
    if ok:  # (make_plan: None on the CPU; the CPU plan tests replace it)
        plan = make_plan(kernel, _fused_gemv_kernel, args, kwargs, 7, x.device)
        if plan is not None:
            _PLANS[key] = (plan, cdiv(N, block_n))


def silu_mul_linear(gate_up, weight, bias=None, *, backend: str = "triton"):
    """linear(silu_mul(gate_up), weight, bias), bit for bit, in one launch for decode-sized inputs.

    gate_up: [M, 2I] (gate | up), last dim contiguous; weight [N, I] rows contiguous; bias [N] or
    None; all one dtype. Returns y [M, N] (new). Nothing is mutated. Fused for
    1 <= M <= min(SILU_MAX_M, linear.MAX_M) on backend "triton"; otherwise the two unfused ops."""
    key, ok = None, False
    if backend == "triton" and gate_up.is_cuda and gate_up.dim() == 2:
        M = gate_up.shape[0]
        px, pw = gate_up.data_ptr(), weight.data_ptr()
        pb = pw if bias is None else bias.data_ptr()
        ok = not (px | pw | pb) & 15
        key = (MODE_SILU, gate_up.shape, gate_up.stride(), gate_up.dtype, gate_up.get_device(), weight.shape,
               weight.stride(), weight.dtype, weight.get_device(),
               None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.get_device()),
               _common._pdl_mode, _limit(SILU_MAX_M), PREFETCH_TILES)
        hit = _PLANS.get(key) if ok else None
        if hit is not None:
            plan, grid = hit
            y = gate_up.new_empty(M, weight.shape[0])
            plan(grid, 1, 1, px, pw, pw, pw, pb, y.data_ptr(), pw)
            return y
    check_backend(backend)
    M = gate_up.shape[0] if gate_up.dim() == 2 else 0
    if backend == "torch" or not 1 <= M <= _limit(SILU_MAX_M):
        return _lin.linear(_silu.silu_mul(gate_up, backend=backend), weight, bias, backend=backend)
    check_tensor("gate_up", gate_up, ndim=2, dtypes=ATTN_DTYPES)
    check(gate_up.shape[1] % 2 == 0, lambda: f"gate_up must be [M, 2I] (gate | up), got {tuple(gate_up.shape)}")
    K = gate_up.shape[1] // 2
    N = _check_weights(gate_up, K, weight, bias)
    y = torch.empty((M, N), dtype=gate_up.dtype, device=gate_up.device)
    strides = (gate_up.stride(0), 0, weight.stride(0), y.stride(0), 0)
    _launch(MODE_SILU, key, ok, gate_up, None, None, weight, bias,
            y, None, M, N, K, strides, 0.0, False)
    return y


def rms_norm_linear(x, norm_weight, eps: float, weight, bias=None, residual=None, *, backend: str = "triton"):
    """linear(rms_norm(x, norm_weight, eps, residual), weight, bias), bit for bit, in one launch
    for decode-sized inputs; returns (y [M, N], the residual stream after the add).

    x: [M, K] last dim contiguous; norm_weight [K]; weight [N, K] rows contiguous; bias [N] or None;
    residual [M, K] or None; all one dtype. Without a residual the stream is x itself (returned).
    With one, the returned stream is x + residual: a new tensor on the fused path (``residual``
    untouched), ``residual`` itself updated in place on the unfused path (as `rms_norm` does).
    Callers use the returned tensor and rely on neither. Fused for 1 <= M <=
    min(NORM_MAX_M, linear.MAX_M) on backend "triton"; otherwise the two unfused ops."""
    key, ok = None, False
    if backend == "triton" and x.is_cuda and x.dim() == 2:
        M = x.shape[0]
        px, pg, pw = x.data_ptr(), norm_weight.data_ptr(), weight.data_ptr()
        pb = pw if bias is None else bias.data_ptr()
        pr = pw if residual is None else residual.data_ptr()
        ok = not (px | pg | pw | pb | pr) & 15
        key = (MODE_RMS, x.shape, x.stride(), x.dtype, x.get_device(), norm_weight.shape, norm_weight.stride(),
               norm_weight.dtype, norm_weight.get_device(), weight.shape, weight.stride(), weight.dtype,
               weight.get_device(),
               None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.get_device()),
               None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.get_device()),
               eps, _common._pdl_mode, _limit(NORM_MAX_M), PREFETCH_TILES)
        hit = _PLANS.get(key) if ok else None
        if hit is not None:
            plan, grid = hit
            y = x.new_empty(M, weight.shape[0])
            if residual is None:
                plan(grid, 1, 1, px, pw, pg, pw, pb, y.data_ptr(), pw)
                return y, x
            ro = x.new_empty(M, x.shape[1])
            plan(grid, 1, 1, px, pr, pg, pw, pb, y.data_ptr(), ro.data_ptr())
            return y, ro
    check_backend(backend)
    M = x.shape[0] if x.dim() == 2 else 0
    if backend == "torch" or not 1 <= M <= _limit(NORM_MAX_M):
        h = _rms.rms_norm(x, norm_weight, eps, residual, backend=backend)
        return _lin.linear(h, weight, bias, backend=backend), (x if residual is None else residual)
    check_tensor("x", x, ndim=2, dtypes=ATTN_DTYPES)
    K = x.shape[1]
    check_tensor("norm_weight", norm_weight, ndim=1, dtypes=(x.dtype,), device=x)
    check(norm_weight.shape[0] == K, lambda: f"norm_weight is [{norm_weight.shape[0]}], x rows are [{K}]")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x)
        check(residual.shape == x.shape, lambda: f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    N = _check_weights(x, K, weight, bias)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    ro = None if residual is None else torch.empty((M, K), dtype=x.dtype, device=x.device)
    strides = (x.stride(0), 0 if residual is None else residual.stride(0), weight.stride(0), y.stride(0),
               0 if ro is None else ro.stride(0))
    _launch(MODE_RMS, key, ok, x, residual, norm_weight, weight, bias, y, ro,
            M, N, K, strides, eps, residual is not None)
    return y, (x if ro is None else ro)


def _limit(fused_max_m: int) -> int:
    """The largest M the fused kernel takes: its own limit, `linear`'s (read per call: an A/B run
    sets linear.MAX_M = 0 for cuBLAS) and the one row tile."""
    return min(fused_max_m, _lin.MAX_M, TILE_M)


def _check_weights(x, K, weight, bias) -> int:
    """Check weight [N, K] and bias [N] against x; returns N."""
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x)
    check(weight.shape[1] == K, lambda: f"weight is {tuple(weight.shape)}, x rows have K={K}")
    N = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x)
        check(bias.shape[0] == N, lambda: f"bias is [{bias.shape[0]}], expected [{N}]")
    return N


_PLANS: dict = {}  # key -> (plan, grid) (see _common.Plan)
