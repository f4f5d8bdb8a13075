"""KV write: scatter the new tokens' K and V into their pool slots (slot mapping).

Used for a whole prefill chunk (T = chunk tokens) and for decode (T = one token per request).
A negative slot means "skip this token" (padding).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _common
from ._common import (INDEX_DTYPES, cdiv, check, check_backend, check_tensor, kernel_for, make_plan,
                      next_pow2, pdl_args, pdl_begin, pdl_late, plan_hit)

# Default launch config (tuned on H100 for H_kv*D = 1024 bf16 rows).
# (Evict-first loads with streaming stores measured 76 % of copy against 81 %: docs/kernels.md.)
KV_WRITE_CONFIG = dict(BLOCK_T=4, num_warps=4)
_BLOCK_T, _NUM_WARPS = KV_WRITE_CONFIG["BLOCK_T"], KV_WRITE_CONFIG["num_warps"]   # (read once: the hit path's key)


# run-time sizes are not specialized on (==1, %16): each new value class would be a ~1 s
# just-in-time compile in the middle of a timed serving step
@triton.jit(do_not_specialize=["T"])
def _kv_write_kernel(
    k_ptr, v_ptr,            # [T, H, D]
    kc_ptr, vc_ptr,          # [num_slots, H, D]
    slot_ptr,                # [T]
    T,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    H: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)                      # [BT]
    t_mask = offs_t < T
    slot = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1).to(tl.int64)  # [BT]
    valid = t_mask & (slot >= 0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hd_mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)             # [BH, BD]
    mask = valid[:, None, None] & hd_mask[None, :, :]                   # [BT, BH, BD]
    t64 = offs_t.to(tl.int64)

    src_k = k_ptr + t64[:, None, None] * stride_kt + offs_h[None, :, None] * stride_kh + offs_d[None, None, :]
    dst_k = kc_ptr + slot[:, None, None] * stride_kcs + offs_h[None, :, None] * stride_kch + offs_d[None, None, :]
    src_v = v_ptr + t64[:, None, None] * stride_vt + offs_h[None, :, None] * stride_vh + offs_d[None, None, :]
    dst_v = vc_ptr + slot[:, None, None] * stride_vcs + offs_h[None, :, None] * stride_vch + offs_d[None, None, :]
    # the loads do not wait for the slot load: their mask leaves out `slot >= 0`
    ld_mask = t_mask[:, None, None] & hd_mask[None, :, :]
    kk = tl.load(src_k, mask=ld_mask)
    vv = tl.load(src_v, mask=ld_mask)
    pdl_late(PDL)
    tl.store(dst_k, kk, mask=mask)
    tl.store(dst_v, vv, mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping):
    check_tensor("k", k, ndim=3)
    ref = k
    check_tensor("v", v, ndim=3, dtypes=(k.dtype,), device=ref)
    check_tensor("k_cache", k_cache, ndim=3, dtypes=(k.dtype,), device=ref)
    check_tensor("v_cache", v_cache, ndim=3, dtypes=(k.dtype,), device=ref)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=ref)   # read unstrided
    T, H, D = k.shape
    check(tuple(v.shape) == (T, H, D), lambda: f"v shape {tuple(v.shape)} must equal k shape {(T, H, D)}")
    check(k_cache.shape[1:] == (H, D), lambda: f"k_cache must be [num_slots, {H}, {D}], got {tuple(k_cache.shape)}")
    check(tuple(v_cache.shape) == tuple(k_cache.shape),
          lambda: f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    check(slot_mapping.shape[0] == T, lambda: f"slot_mapping must be [T={T}], got {tuple(slot_mapping.shape)}")


def kv_write_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Plain torch reference: ``k_cache[slot_mapping[t]] = k[t]`` (negative slots skipped), in place."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots] = k[keep]
    v_cache[slots] = v[keep]


def kv_write(k, v, k_cache, v_cache, slot_mapping, *, backend: str = "triton", config: dict | None = None) -> None:
    """Write new K/V into the cache, in place.

    k, v:          [T, H_kv, D]        (any token/head strides, last dim contiguous)
    k_cache/v_cache: [num_slots, H_kv, D]  (e.g. ``kv_pool[l, 0]`` / ``kv_pool[l, 1]``)
    slot_mapping:  [T] int32/int64; slot < 0 skips the token.
    """
    key, ok = None, False
    if config is None and backend == "triton" and k.is_cuda:
        # the hit path: a key of everything the checks and the compiled code depend on but the
        # token count (each tensor's device as its index: k is on the GPU, so an equal index is
        # the same GPU); data pointers go to the C launcher as ints (no data_ptr call and pointer
        # check there)
        ks = k.shape
        pk, pv, pkc, pvc, pslot = k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), \
            slot_mapping.data_ptr()
        ok = not (pk | pv | pkc | pvc | pslot) & 15          # all 16-byte aligned (Triton specializes on it)
        try:   # (k not 3-D: no key, the checks below say what is wrong)
            T, H, D = ks
            # (slot_mapping's stride tuple has one item for each dim: its numel is its length; a
            # cache whose whole shape is in the key is keyed on its strides only when not contiguous:
            # a contiguous one's are the shape's, but on dims of size 1, whose stride reads nothing)
            key = (H, D, k.stride(), k.dtype, k.get_device(), v.shape == ks, v.stride(), v.dtype, v.get_device(),
                   k_cache.shape, k_cache.is_contiguous() or k_cache.stride(), k_cache.dtype, k_cache.get_device(),
                   v_cache.shape, v_cache.is_contiguous() or v_cache.stride(), v_cache.dtype, v_cache.get_device(),
                   slot_mapping.numel() == T, slot_mapping.stride(), slot_mapping.dtype, slot_mapping.get_device(),
                   _common._pdl_mode, _BLOCK_T, _NUM_WARPS)
        except ValueError:
            ok = False
        hit = plan_hit(_PLANS, key) if ok else None
        if hit is not None:
            if T:
                hit(-(-T // _BLOCK_T), 1, 1, pk, pv, pkc, pvc, pslot, T)
            return
    check_backend(backend)
    _check(k, v, k_cache, v_cache, slot_mapping)
    if backend == "torch":
        return kv_write_ref(k, v, k_cache, v_cache, slot_mapping)
    T, H, D = k.shape
    if T == 0:
        return
    cfg = dict(KV_WRITE_CONFIG, **(config or {}))
    BT = cfg["BLOCK_T"]
    args = (k, v, k_cache, v_cache, slot_mapping, T,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
    kwargs = dict(H=H, D=D, BLOCK_T=BT, BLOCK_H=next_pow2(H), BLOCK_D=next_pow2(D),
                  num_warps=cfg["num_warps"], **pdl_args(k.device))
    kernel = kernel_for(_kv_write_kernel, k.device)[(cdiv(T, BT),)](*args, **kwargs)
    if ok and BT == _BLOCK_T and cfg["num_warps"] == _NUM_WARPS:   # (a changed KV_WRITE_CONFIG: no plans)
        plan = make_plan(kernel, _kv_write_kernel, args, kwargs, 6, k.device)
        if plan is not None:
            _PLANS[key] = plan


_PLANS: dict = {}  # launch plans by key (see _common.Plan); None -> (the last key taken, its plan)
