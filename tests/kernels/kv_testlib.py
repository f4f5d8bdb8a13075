"""Builders shared by the kernel tests: paged / slab caches with poisoned unused slots."""
from __future__ import annotations

import torch

DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16)


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def randn(*shape, dtype, device, gen=None):
    return torch.randn(*shape, generator=gen, device="cpu").to(dtype=dtype, device=device)


def make_cache(seq_lens, page_size, num_kv_heads, head_dim, dtype, device, *, contiguous=False,
               gen=None, extra_pages=3):
    """A pool whose unused slots hold NaN, and a page table per request.

    Returns (k_cache [S, H_kv, D], v_cache, page_table [B, max_pages] int32).
    Paged: each request's pages are a random permutation of the pool. Slab (contiguous): each
    request owns a consecutive run of pages, runs placed in shuffled order with gaps.
    Page-table entries past a request's length point at a NaN page, so reading them shows.
    """
    B = len(seq_lens)
    max_len = max(max(seq_lens), 1)
    max_pages = -(-max_len // page_size)
    num_pages = B * max_pages + extra_pages
    S = num_pages * page_size
    k_cache = torch.full((S, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full((S, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    page_table = torch.empty((B, max_pages), dtype=torch.int32)
    poison_page = num_pages - 1                                    # never owned by anybody
    if contiguous:
        order = torch.randperm(B, generator=gen)
        for b in range(B):
            first = 1 + int(order[b]) * max_pages                  # gap at page 0
            page_table[b] = torch.arange(first, first + max_pages, dtype=torch.int32)
    else:
        perm = torch.randperm(num_pages - 1, generator=gen)[: B * max_pages].to(torch.int32)
        page_table.copy_(perm.view(B, max_pages))
    for b, n in enumerate(seq_lens):
        pos = torch.arange(n)
        slots = page_table[b, pos // page_size].long() * page_size + pos % page_size
        k_cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        used = -(-n // page_size)
        if not contiguous:
            page_table[b, used:] = poison_page
    return k_cache.to(device), v_cache.to(device), page_table.to(device)


def nan_like(t):
    return torch.full_like(t, float("nan"))
