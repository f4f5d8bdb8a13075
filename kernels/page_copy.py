"""Whole pages of the KV pool, all layers, K and V: `page_copy` (copy-on-write, pool to pool) and
`page_move` (pool to host memory and back: swap-out / swap-in and the host tier of issue 14).

`page_move` reads or writes pinned host memory directly from the kernel (CUDA unified virtual
addressing: a pinned tensor's pointer is valid on the device), so a scattered set of pages moves
in one launch without a device staging buffer; experiments/host_copy_bench.py measures it against
a staging gather plus one `copy_` and against a contiguous pinned copy of the same bytes.
Host layout: `[P, num_layers, 2, page_size, H_kv, D]`, page i of the call contiguous."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INDEX_DTYPES, cdiv, check, check_backend, check_tensor, kernel_for, make_plan, plan_hit

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
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=ref)   # read unstrided
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
        # the hit path (data pointers go to the C launcher as ints; devices as indices: kv_pool's
        # type is the GPU, so an equal index is the same GPU)
        pp, ps, pd = kv_pool.data_ptr(), src_pages.data_ptr(), dst_pages.data_ptr()
        ok = not (pp | ps | pd) & 15                         # all 16-byte aligned (Triton specializes on it)
        ss = src_pages.shape
        key = (kv_pool.shape, kv_pool.stride(), kv_pool.dtype, kv_pool.get_device(), src_pages.dtype,
               src_pages.stride(), src_pages.get_device(), dst_pages.dtype, dst_pages.stride(), dst_pages.get_device(),
               ss == dst_pages.shape, page_size.__class__, page_size, id(PAGE_COPY_CONFIG))
        hit = plan_hit(_PLANS, key) if ok else None
        if hit is not None:
            plan, g1, g2 = hit
            if ss[0]:
                plan(ss[0], g1, g2, pp, ps, pd)
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


_PLANS: dict = {}  # key -> (plan, grid y, grid z) (see _common.Plan); None -> (the last key taken, its entry)


@triton.jit
def _page_move_kernel(
    pool_ptr,                # [L*2 planes, num_slots * H * D] (planes strided by stride_plane)
    pages_ptr,               # [P] pool page ids
    host_ptr,                # [N, L*2, page_elems] contiguous (pinned host memory on a GPU)
    rows_ptr,                # [P] host rows (HAS_ROWS), else row p
    stride_plane, page_elems, num_planes,
    TO_HOST: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    p = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    page = tl.load(pages_ptr + p).to(tl.int64)
    if HAS_ROWS:
        row = tl.load(rows_ptr + p).to(tl.int64)
    else:
        row = p.to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_elems
    dev = pool_ptr + plane * stride_plane + page * page_elems + offs
    host = host_ptr + (row * num_planes + plane) * page_elems + offs
    if TO_HOST:
        tl.store(host, tl.load(dev, mask=mask), mask=mask)
    else:
        tl.store(dev, tl.load(host, mask=mask), mask=mask)


def page_move_ref(kv_pool, pages, host, page_size: int, to_host: bool, host_rows=None) -> None:
    """Plain torch reference, in place (writes `host` when to_host, else the pool's pages)."""
    L, _, S, H, D = kv_pool.shape
    paged = kv_pool.view(L, 2, S // page_size, page_size, H, D)
    idx = pages.to(device=kv_pool.device, dtype=torch.long)
    rows = None if host_rows is None else host_rows.to(device=host.device, dtype=torch.long)
    if to_host:
        got = paged[:, :, idx].permute(2, 0, 1, 3, 4, 5).to(host.device)
        if rows is None:
            host.copy_(got)
        else:
            for i in range(len(rows)):  # in order: a row named twice keeps the last page
                host[rows[i]] = got[i]
    else:
        src = host if rows is None else host[rows]
        paged[:, :, idx] = src.to(kv_pool.device).permute(1, 2, 0, 3, 4, 5)


def page_move(kv_pool, pages, host, page_size: int, to_host: bool, *, host_rows=None,
              backend: str = "triton") -> None:
    """Copy pool pages ``pages[i]`` to host row ``r_i`` (to_host) or row ``r_i`` back onto them,
    every layer, K and V, where ``r_i = host_rows[i]`` (default ``i``). Asynchronous on the
    current stream like any kernel: synchronise (or record an event) before the host reads `host`
    or writes it again.

    kv_pool:   [num_layers, 2, num_slots, H_kv, D] (the pool `page_copy` takes)
    pages:     [P] int32/int64 page ids on the pool's device (distinct when copying back)
    host:      [N, num_layers, 2, page_size, H_kv, D] contiguous, the pool's dtype (N = P without
               host_rows); pinned CPU memory when the pool is on a GPU (the kernel reads/writes it
               directly), the pool's device in the interpreter
    host_rows: [P] int32/int64 rows of `host` on the pool's device, distinct when copying to host
    """
    check_backend(backend)
    _check(kv_pool, pages, pages, page_size)
    L, _, S, H, D = kv_pool.shape
    P = pages.shape[0]
    check_tensor("host", host, ndim=6, dtypes=(kv_pool.dtype,))
    N = P if host_rows is None else host.shape[0]
    check(tuple(host.shape) == (N, L, 2, page_size, H, D) and host.is_contiguous(),
          lambda: f"host must be a contiguous [{N}, {L}, 2, {page_size}, {H}, {D}] tensor, got {tuple(host.shape)}")
    if host_rows is not None:
        check_tensor("host_rows", host_rows, ndim=1, dtypes=INDEX_DTYPES, device=kv_pool, last_contiguous=False)
        check(host_rows.shape == pages.shape,
              lambda: f"host_rows {tuple(host_rows.shape)} must match pages {tuple(pages.shape)}")
    if kv_pool.is_cuda and backend == "triton":
        check(host.device.type == "cpu" and host.is_pinned(),
              lambda: "host must be pinned CPU memory (torch.empty(..., pin_memory=True)) for a GPU pool")
    if backend == "torch":
        return page_move_ref(kv_pool, pages, host, page_size, to_host, host_rows)
    if P == 0:
        return
    page_elems = page_size * H * D
    BLOCK = min(PAGE_COPY_CONFIG["BLOCK"], triton.next_power_of_2(page_elems))
    grid = (P, L * 2, cdiv(page_elems, BLOCK))
    kernel_for(_page_move_kernel, kv_pool.device)[grid](
        kv_pool, pages, host, pages if host_rows is None else host_rows, kv_pool.stride(1), page_elems, L * 2,
        TO_HOST=bool(to_host), HAS_ROWS=host_rows is not None, BLOCK=BLOCK, num_warps=PAGE_COPY_CONFIG["num_warps"])
