"""Page copy for copy-on-write: copy every slot of each src page onto its dst page, all layers, K and V."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import INDEX_DTYPES, aligned, cdiv, check, check_backend, check_tensor, kernel_for, make_plan

PAGE_COPY_CONFIG = dict(BLOCK=4096, num_warps=4)


@triton.jit
def _page_copy_kernel(
    pool_ptr,                # [L*2 planes, num_slots * H * D] (planes strided by stride_plane)
    src_ptr, dst_ptr,        # [P]
    stride_plane,            # elements between (layer, k/v) planes
    page_elems,              # page_size * H * D
    BLOCK: tl.constexpr,
):
    p = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    src = tl.load(src_ptr + p).to(tl.int64)
    dst = tl.load(dst_ptr + p).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_elems
    base = pool_ptr + plane * stride_plane
    x = tl.load(base + src * page_elems + offs, mask=mask)
    tl.store(base + dst * page_elems + offs, x, mask=mask)


def _check(kv_pool, src_pages, dst_pages, page_size):
    check_tensor("kv_pool", kv_pool, ndim=5)
    ref = kv_pool
    L, two, S, H, D = kv_pool.shape
    check(two == 2, lambda: f"kv_pool must be [num_layers, 2, num_slots, H_kv, D], got {tuple(kv_pool.shape)}")
    check(kv_pool.stride(4) == 1 and kv_pool.stride(3) == D and kv_pool.stride(2) == H * D,
          lambda: f"kv_pool must be contiguous within each [num_slots, H_kv, D] plane, got strides {kv_pool.stride()}")
    check(kv_pool.stride(0) == 2 * kv_pool.stride(1) or L == 1,
          lambda: f"kv_pool planes must be evenly strided (layer stride = 2 * k/v stride), got strides {kv_pool.stride()}")
    check(isinstance(page_size, int) and page_size >= 1, lambda: f"page_size must be a positive int, got {page_size!r}")
    check(S % page_size == 0, lambda: f"num_slots={S} is not a multiple of page_size={page_size}")
    for name, t in (("src_pages", src_pages), ("dst_pages", dst_pages)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=ref, last_contiguous=False)
    check(src_pages.shape == dst_pages.shape,
          lambda: f"src_pages {tuple(src_pages.shape)} and dst_pages {tuple(dst_pages.shape)} must have the same length")


def page_copy_ref(kv_pool, src_pages, dst_pages, page_size) -> None:
    """Plain torch reference, in place."""
    L, _, S, H, D = kv_pool.shape
    paged = kv_pool.view(L, 2, S // page_size, page_size, H, D)
    paged[:, :, dst_pages.long()] = paged[:, :, src_pages.long()].clone()


def page_copy(kv_pool, src_pages, dst_pages, page_size: int, *, backend: str = "triton",
              config: dict | None = None) -> None:
    """Copy pages ``src_pages[i] -> dst_pages[i]`` in every layer, K and V, in place.

    kv_pool:   [num_layers, 2, num_slots, H_kv, D]
    src_pages, dst_pages: [P] int32/int64 page ids (dst pages must be distinct and not in src).
    """
    key, ok = None, False
    if config is None and backend == "triton" and kv_pool.is_cuda:
        ok = aligned(kv_pool, src_pages, dst_pages)
        key = (kv_pool.shape, kv_pool.stride(), kv_pool.dtype, kv_pool.device, src_pages.dtype, src_pages.dim(),
               src_pages.device, dst_pages.dtype, dst_pages.dim(), dst_pages.device, src_pages.shape == dst_pages.shape,
               page_size.__class__, page_size, ok, id(PAGE_COPY_CONFIG))
        hit = _PLANS.get(key)
        if hit is not None:
            plan, g1, g2 = hit
            if src_pages.shape[0]:
                plan(src_pages.shape[0], g1, g2, kv_pool, src_pages, dst_pages)
            return
    check_backend(backend)
    _check(kv_pool, src_pages, dst_pages, page_size)
    if backend == "torch":
        return page_copy_ref(kv_pool, src_pages, dst_pages, page_size)
    P = src_pages.shape[0]
    if P == 0:
        return
    L, _, S, H, D = kv_pool.shape
    cfg = dict(PAGE_COPY_CONFIG, **(config or {}))
    page_elems = page_size * H * D
    BLOCK = min(cfg["BLOCK"], triton.next_power_of_2(page_elems))
    grid = (P, L * 2, cdiv(page_elems, BLOCK))
    args = (kv_pool, src_pages, dst_pages, kv_pool.stride(1), page_elems)
    kwargs = dict(BLOCK=BLOCK, num_warps=cfg["num_warps"])
    kernel = kernel_for(_page_copy_kernel, kv_pool.device)[grid](*args, **kwargs)
    if ok:
        plan = make_plan(kernel, _page_copy_kernel, args, kwargs, 3, kv_pool.device)
        if plan is not None:
            _PLANS[key] = (plan, grid[1], grid[2])


_PLANS: dict = {}  # key -> (plan, grid y, grid z) (see _common.Plan)
