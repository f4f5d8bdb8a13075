"""Rotary embedding of q and k, fused with the KV write: one launch per layer instead of seven.

Works on the fused projection output ``qkv [T, (H_q + 2 H_kv) * D]`` (q | k | v heads): rotates
the q and k heads in place (HF's rotate_half convention, cos/sin with repeated halves) and
scatters the rotated k and the v heads into their pool slots (``slot < 0`` skips the write, as
``kv_write`` does). Rounding follows HF's ``q * cos + rotate_half(q) * sin`` in the activation
dtype: each product and the sum are rounded. One program handles one token, all heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (ATTN_DTYPES, INDEX_DTYPES, check, check_backend, check_tensor, kernel_for, make_plan, next_pow2,
                      pdl_args, pdl_begin, pdl_late)
from .kv_write import kv_write_ref


@triton.jit
def _rotate(x_ptrs, c, s, HALF: tl.constexpr, mask):
    """Rotate the [heads, D] rows at x_ptrs in place; return them (activation dtype)."""
    x1 = tl.load(x_ptrs, mask=mask, other=0.0)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = ((a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    tl.store(x_ptrs, o1, mask=mask)
    tl.store(x_ptrs + HALF, o2, mask=mask)
    return o1, o2


@triton.jit
def _rope_kv_write_kernel(
    qkv_ptr,                 # [T, (H_q + 2 H_kv) * D]
    cos_ptr, sin_ptr,        # [T, >= D/2]
    kc_ptr, vc_ptr,          # [num_slots, H_kv, D]
    slot_ptr,                # [T]
    stride_t, stride_c, stride_s,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    H_Q: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    c = tl.load(cos_ptr + t * stride_c + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * stride_s + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    row = qkv_ptr + t * stride_t
    hq = tl.arange(0, BLOCK_HQ)
    _rotate(row + hq[:, None] * D + offs[None, :], c, s, HALF, (hq[:, None] < H_Q) & d_mask[None, :])
    hk = tl.arange(0, BLOCK_HKV)
    k_mask = (hk[:, None] < H_KV) & d_mask[None, :]
    k1, k2 = _rotate(row + (H_Q + hk[:, None]) * D + offs[None, :], c, s, HALF, k_mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    pdl_late(PDL)
    if slot >= 0:
        kdst = kc_ptr + slot * stride_kcs + hk[:, None] * stride_kch + offs[None, :]
        tl.store(kdst, k1, mask=k_mask)
        tl.store(kdst + HALF, k2, mask=k_mask)
        vsrc = row + (H_Q + H_KV + hk[:, None]) * D + offs[None, :]
        vdst = vc_ptr + slot * stride_vcs + hk[:, None] * stride_vch + offs[None, :]
        tl.store(vdst, tl.load(vsrc, mask=k_mask), mask=k_mask)
        tl.store(vdst + HALF, tl.load(vsrc + HALF, mask=k_mask), mask=k_mask)


def rope_ref(x, cos, sin):
    """x [T, H, D]; cos, sin [T, D] (halves repeated): HF's x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def split_qkv(qkv, num_heads: int, num_kv_heads: int):
    """Views q [T, H_q, D], k [T, H_kv, D], v [T, H_kv, D] of a fused projection output."""
    T, W = qkv.shape
    D = W // (num_heads + 2 * num_kv_heads)
    q, k, v = qkv.view(T, num_heads + 2 * num_kv_heads, D).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    return q, k, v


def rope_kv_write_ref(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads):
    q, k, v = split_qkv(qkv, num_heads, num_kv_heads)
    q.copy_(rope_ref(q, cos, sin))
    k.copy_(rope_ref(k, cos, sin))
    kv_write_ref(k, v, k_cache, v_cache, slot_mapping)
    return q, k, v


def rope_kv_write(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads: int, num_kv_heads: int, *,
                  backend: str = "triton", num_warps: int = 4):
    """Rotate q and k of ``qkv`` in place, write k and v into the cache; return views (q, k, v).

    qkv:             [T, (H_q + 2 H_kv) * D] q | k | v heads, last dim contiguous
    cos, sin:        [T, D] (HF layout: the two halves equal; only the first D/2 are read)
    k_cache/v_cache: [num_slots, H_kv, D]
    slot_mapping:    [T] int32/int64, slot < 0 skips the token's write (it is still rotated)
    """
    key, ok = None, False
    if backend == "triton" and qkv.is_cuda and qkv.ndim == 2:
        # the hit path: a key of everything the checks and the compiled code depend on but the token
        # count; data pointers go to the C launcher as ints (no data_ptr call, no pointer check there)
        T, W = qkv.shape
        pq, pc, ps = qkv.data_ptr(), cos.data_ptr(), sin.data_ptr()
        pk, pv, pslot = k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr()
        ok = not (pq | pc | ps | pk | pv | pslot) & 15   # all 16-byte aligned (Triton specializes on it)
        try:   # (a shape index a wrong-rank tensor lacks: no key, the checks below say what is wrong)
            key = (qkv.dtype, W, qkv.stride(), qkv.device, cos.dtype, cos.shape[1], cos.stride(), cos.device,
                   sin.dtype, sin.shape[1], sin.stride(), sin.device, T == cos.shape[0] == sin.shape[0] ==
                   slot_mapping.shape[0], k_cache.dtype, k_cache.shape, k_cache.stride(), k_cache.device,
                   v_cache.dtype, v_cache.shape, v_cache.stride(), v_cache.device, slot_mapping.dtype,
                   slot_mapping.stride(), slot_mapping.device, num_heads.__class__, num_heads,
                   num_kv_heads.__class__, num_kv_heads, num_warps, _common._pdl_mode)
        except IndexError:
            ok = False
        hit = _PLANS.get(key) if ok else None
        if hit is not None:
            plan, shapes_q, shapes_kv, strides, strides_1, k_at, v_at = hit
            if T:
                plan(T, 1, 1, pq, pc, ps, pk, pv, pslot)
            # views q [T, H_q, D], k, v [T, H_kv, D] of qkv, one call each: exactly split_qkv's
            # (whose view gives a single row the contiguous stride)
            at = qkv.storage_offset()
            if T <= 1:
                strides = strides_1
            return (qkv.as_strided((T, *shapes_q), strides, at), qkv.as_strided((T, *shapes_kv), strides, at + k_at),
                    qkv.as_strided((T, *shapes_kv), strides, at + v_at))
    check_backend(backend)
    check_tensor("qkv", qkv, ndim=2, dtypes=ATTN_DTYPES)
    check(isinstance(num_heads, int) and isinstance(num_kv_heads, int) and num_heads > 0 and num_kv_heads > 0
          and qkv.shape[1] % (num_heads + 2 * num_kv_heads) == 0,
          lambda: f"qkv width {qkv.shape[1]} is not (num_heads {num_heads} + 2 * num_kv_heads {num_kv_heads}) * D")
    T, W = qkv.shape
    D = W // (num_heads + 2 * num_kv_heads)
    check(D % 2 == 0, lambda: f"head dim {D} must be even for rotary embeddings")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, dtypes=(qkv.dtype,), device=qkv)
        check(t.shape[0] == T and t.shape[1] >= D // 2, lambda: f"{name} must be [T={T}, D={D}], got {tuple(t.shape)}")
    check_tensor("k_cache", k_cache, ndim=3, dtypes=(qkv.dtype,), device=qkv)
    check(tuple(k_cache.shape[1:]) == (num_kv_heads, D),
          lambda: f"k_cache must be [num_slots, {num_kv_heads}, {D}], got {tuple(k_cache.shape)}")
    check_tensor("v_cache", v_cache, ndim=3, dtypes=(qkv.dtype,), device=qkv)
    check(tuple(v_cache.shape) == tuple(k_cache.shape),
          lambda: f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=qkv)   # read unstrided
    check(slot_mapping.shape[0] == T, lambda: f"slot_mapping must be [T={T}], got {tuple(slot_mapping.shape)}")
    if backend == "torch":
        return rope_kv_write_ref(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    if T:
        args = (qkv, cos, sin, k_cache, v_cache, slot_mapping,
                qkv.stride(0), cos.stride(0), sin.stride(0),
                k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
        kwargs = dict(H_Q=num_heads, H_KV=num_kv_heads, D=D, HALF=D // 2, BLOCK_HQ=next_pow2(num_heads),
                      BLOCK_HKV=next_pow2(num_kv_heads), BLOCK_HALF=next_pow2(D // 2), num_warps=num_warps,
                      **pdl_args(qkv.device))
        kernel = kernel_for(_rope_kv_write_kernel, qkv.device)[(T,)](*args, **kwargs)
        if ok:
            plan = make_plan(kernel, _rope_kv_write_kernel, args, kwargs, 6, qkv.device)
            if plan is not None:
                _PLANS[key] = (plan, (num_heads, D), (num_kv_heads, D), (qkv.stride(0), D, 1), (W, D, 1),
                               num_heads * D, (num_heads + num_kv_heads) * D)
    return split_qkv(qkv, num_heads, num_kv_heads)


# key -> (plan, q's and k's/v's [heads, D], the views' strides (more than one row, one row), k's and
# v's offsets in a row)
_PLANS: dict = {}
