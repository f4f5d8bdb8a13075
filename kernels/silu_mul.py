"""SwiGLU's activation: out = silu(gate) * up over a fused [T, 2I] gate|up projection, one launch.

Rounding follows ``F.silu(gate) * up`` in the activation dtype: silu in fp32, rounded, then the
product rounded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._common import (ATTN_DTYPES, cdiv, check, check_backend, check_tensor, kernel_for, make_plan,
                      pdl_args, pdl_begin, pdl_late, plan_hit)

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, o_ptr, stride_x, stride_o, I: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    pdl_late(PDL)
    s = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, (s * u).to(o_ptr.dtype.element_ty), mask=mask)


def silu_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(x, *, backend: str = "triton", num_warps: int = 4):
    """x: [T, 2I] (gate | up), last dim contiguous -> [T, I] in x's dtype."""
    key, ok = None, False
    if backend == "triton" and x.is_cuda and x.ndim == 2:
        # the hit path (data pointers go to the C launcher as ints; x's device as its index: its
        # type is the GPU)
        T, W = x.shape
        px = x.data_ptr()
        ok = not px & 15                                     # 16-byte aligned (Triton specializes on it)
        key = (x.dtype, W, x.stride(), x.get_device(), num_warps, _common._pdl_mode)
        hit = plan_hit(_PLANS, key) if ok else None
        if hit is not None:
            plan, I, blocks = hit
            out = x.new_empty(T, I)   # (sizes as arguments: a tuple costs new_empty ~0.8 us more to parse)
            if T:
                plan(T, blocks, 1, px, out.data_ptr())
            return out
    check_backend(backend)
    check_tensor("x", x, ndim=2, dtypes=ATTN_DTYPES)
    check(x.shape[1] % 2 == 0, lambda: f"x must be [T, 2I] (gate | up), got {tuple(x.shape)}")
    if backend == "torch":
        return silu_mul_ref(x)
    T, I = x.shape[0], x.shape[1] // 2
    out = torch.empty((T, I), dtype=x.dtype, device=x.device)
    if T:
        args = (x, out, x.stride(0), out.stride(0))
        kwargs = dict(I=I, BLOCK=BLOCK, num_warps=num_warps, **pdl_args(x.device))
        kernel = kernel_for(_silu_mul_kernel, x.device)[(T, cdiv(I, BLOCK))](*args, **kwargs)
        if ok:
            plan = make_plan(kernel, _silu_mul_kernel, args, kwargs, 2, x.device)
            if plan is not None:
                _PLANS[key] = (plan, I, cdiv(I, BLOCK))
    return out


_PLANS: dict = {}  # key -> (plan, I, column blocks) (see _common.Plan); None -> (the last key taken, its entry)
