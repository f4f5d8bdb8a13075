"""kv_write and page_copy against their torch references (exact copies)."""
from __future__ import annotations

import pytest
import torch

from kvbench.kernels.kv_write import kv_write, kv_write_ref
from kvbench.kernels.page_copy import page_copy, page_copy_ref, page_move, page_move_ref
from kv_testlib import DTYPES_CPU, device, randn


def _kv_case(T, S, H, D, dtype, dev, gen, idx_dtype=torch.int64, skip=()):
    k = randn(T, H, D, dtype=dtype, device=dev, gen=gen)
    v = randn(T, H, D, dtype=dtype, device=dev, gen=gen)
    slots = torch.randperm(S, generator=gen)[:T]
    for t in skip:
        slots[t] = -1
    return k, v, slots.to(idx_dtype).to(dev)


def _write_and_compare(k, v, slots, S, gen):
    """kv_write into a pool of random old contents, against kv_write_ref on a copy: exact."""
    H, D = k.shape[1:]
    kc = randn(S, H, D, dtype=k.dtype, device=k.device, gen=gen)        # poison: random old contents
    vc = randn(S, H, D, dtype=k.dtype, device=k.device, gen=gen)
    kr, vr = kc.clone(), vc.clone()
    kv_write(k, v, kc, vc, slots)
    kv_write_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T", [1, 5, 37])
def test_kv_write(dtype, T):
    dev = device()
    gen = torch.Generator().manual_seed(T)
    S, H, D = 96, 2, 64
    k, v, slots = _kv_case(T, S, H, D, dtype, dev, gen, idx_dtype=torch.int32 if T % 2 else torch.int64)
    _write_and_compare(k, v, slots, S, gen)


def test_kv_write_into_pool_views_noncontiguous_src_and_skips():
    dev = device()
    gen = torch.Generator().manual_seed(7)
    L, S, H, D, T = 3, 64, 4, 128, 11
    pool = randn(L, 2, S, H, D, dtype=torch.bfloat16, device=dev, gen=gen)
    qkv = randn(T, 8 + 2 * H, D, dtype=torch.bfloat16, device=dev, gen=gen)    # fused projection
    k, v = qkv[:, 8:8 + H], qkv[:, 8 + H:]
    slots = torch.randperm(S, generator=gen)[:T].to(dev)
    slots[3] = -1
    slots[7] = -1
    ref = pool.clone()
    kv_write(k, v, pool[1, 0], pool[1, 1], slots)
    kv_write_ref(k, v, ref[1, 0], ref[1, 1], slots)
    assert torch.equal(pool, ref)


def test_kv_write_odd_head_count_and_dim():
    dev = device()
    gen = torch.Generator().manual_seed(8)
    k, v, slots = _kv_case(9, 40, 3, 80, torch.float16, dev, gen)
    _write_and_compare(k, v, slots, 40, gen)


def test_kv_write_errors():
    dev = device()
    k = torch.zeros(4, 2, 64, dtype=torch.float16, device=dev)
    kc = torch.zeros(16, 2, 64, dtype=torch.float16, device=dev)
    slots = torch.arange(4, device=dev)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        kv_write(k, k, kc, kc, slots[:3])
    with pytest.raises(ValueError, match="k_cache must be"):
        kv_write(k, k, kc[:, :1], kc[:, :1], slots)
    with pytest.raises(ValueError, match="slot_mapping dtype"):
        kv_write(k, k, kc, kc, slots.float())
    with pytest.raises(ValueError, match="v dtype"):
        kv_write(k, k.float(), kc, kc, slots)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_page_copy(page_size, idx_dtype):
    dev = device()
    gen = torch.Generator().manual_seed(page_size)
    L, P, H, D = 3, 10, 2, 64
    pool = randn(L, 2, P * page_size, H, D, dtype=torch.bfloat16, device=dev, gen=gen)
    src = torch.tensor([0, 4, 4, 9], dtype=idx_dtype, device=dev)
    dst = torch.tensor([2, 5, 7, 1], dtype=idx_dtype, device=dev)
    ref = pool.clone()
    page_copy(pool, src, dst, page_size)
    page_copy_ref(ref, src, dst, page_size)
    assert torch.equal(pool, ref)
    view = pool.view(L, 2, P, page_size, H, D)
    assert torch.equal(view[:, :, 5], view[:, :, 4])


@pytest.mark.parametrize("page_size", [1, 16])
def test_page_move_round_trip(page_size):
    """Pages out to host and back into other pages: exact bytes, and only the named pages change."""
    dev = device()
    gen = torch.Generator().manual_seed(7 + page_size)
    L, P, H, D = 3, 10, 2, 32
    pool = randn(L, 2, P * page_size, H, D, dtype=torch.bfloat16, device=dev, gen=gen)
    out = torch.tensor([6, 1, 8], dtype=torch.int32, device=dev)
    pin = dev.type == "cuda"
    host = torch.empty(3, L, 2, page_size, H, D, dtype=pool.dtype, pin_memory=pin)
    host = host if pin else host.to(dev)
    page_move(pool, out, host, page_size, to_host=True)
    if pin:
        torch.cuda.synchronize()
    ref = torch.empty_like(host)
    page_move_ref(pool, out, ref, page_size, to_host=True)
    assert torch.equal(host, ref)
    view = pool.view(L, 2, P, page_size, H, D)
    assert torch.equal(host[1, 2, 1].to(dev), view[2, 1, 1])      # page 1, layer 2, V: byte for byte
    back = torch.tensor([0, 3, 9], dtype=torch.int64, device=dev)
    before = pool.clone()
    page_move(pool, back, host, page_size, to_host=False)
    expect = before.clone()
    page_move_ref(expect, back, ref, page_size, to_host=False)
    assert torch.equal(pool, expect)
    assert torch.equal(view[:, :, [0, 3, 9]], before.view(L, 2, P, page_size, H, D)[:, :, [6, 1, 8]])
    untouched = [p for p in range(P) if p not in (0, 3, 9)]
    assert torch.equal(view[:, :, untouched], before.view(L, 2, P, page_size, H, D)[:, :, untouched])


def test_page_move_host_rows():
    """Scattered host rows (a host tier's pages): each named row gets its page, the others stay."""
    dev = device()
    L, P, H, D, ps = 2, 8, 2, 32, 4
    pool = randn(L, 2, P * ps, H, D, dtype=torch.float16, device=dev, gen=torch.Generator().manual_seed(3))
    pin = dev.type == "cuda"
    host = torch.zeros(5, L, 2, ps, H, D, dtype=pool.dtype, pin_memory=pin)
    host = host if pin else host.to(dev)
    pages = torch.tensor([7, 2, 5], device=dev)
    rows = torch.tensor([4, 0, 2], device=dev)
    page_move(pool, pages, host, ps, True, host_rows=rows)
    if pin:
        torch.cuda.synchronize()
    view = pool.view(L, 2, P, ps, H, D)
    for page, row in ((7, 4), (2, 0), (5, 2)):
        assert torch.equal(host[row].to(dev), view[:, :, page])
    assert not host[1].any() and not host[3].any()
    ref = torch.zeros_like(host)
    page_move_ref(pool, pages, ref, ps, True, host_rows=rows)
    assert torch.equal(ref, host)
    back = pool.clone()
    page_move(pool, torch.tensor([0, 1], device=dev), host, ps, False, host_rows=torch.tensor([2, 4], device=dev))
    assert torch.equal(view[:, :, 0], back.view(L, 2, P, ps, H, D)[:, :, 5])
    assert torch.equal(view[:, :, 1], back.view(L, 2, P, ps, H, D)[:, :, 7])
    with pytest.raises(ValueError, match="host_rows"):
        page_move(pool, pages, host, ps, True, host_rows=torch.tensor([0, 1], device=dev))


def test_page_move_errors():
    dev = device()
    pool = torch.zeros(2, 2, 32, 2, 64, dtype=torch.float16, device=dev)
    pages = torch.tensor([0, 1], device=dev)
    with pytest.raises(ValueError, match="host must be a contiguous"):
        page_move(pool, pages, torch.zeros(2, 2, 2, 8, 2, 64, dtype=torch.float16, device=dev), 16, True)
    with pytest.raises(ValueError, match="host dtype"):
        page_move(pool, pages, torch.zeros(2, 2, 2, 16, 2, 64, dtype=torch.float32, device=dev), 16, True)


def test_page_copy_errors():
    dev = device()
    pool = torch.zeros(2, 2, 32, 2, 64, dtype=torch.float16, device=dev)
    src = torch.tensor([0], device=dev)
    with pytest.raises(ValueError, match="multiple of page_size"):
        page_copy(pool, src, src + 1, 5)
    with pytest.raises(ValueError, match="same length"):
        page_copy(pool, src, torch.tensor([1, 2], device=dev), 16)
    with pytest.raises(ValueError, match=r"num_layers, 2"):
        page_copy(pool[:, :1], src, src + 1, 16)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_kv_write_gpu_chunk_8k():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(9)
    S = 65536
    k, v, slots = _kv_case(8192, S, 8, 128, torch.bfloat16, dev, gen)
    _write_and_compare(k, v, slots, S, gen)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_page_copy_gpu(page_size):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(10)
    L, P = 4, 4096 // page_size * 4
    pool = randn(L, 2, P * page_size, 8, 128, dtype=torch.bfloat16, device=dev, gen=gen)
    perm = torch.randperm(P, generator=gen)
    src, dst = perm[: P // 4].to(dev), perm[P // 4: P // 2].int().to(dev)
    ref = pool.clone()
    page_copy(pool, src, dst, page_size)
    page_copy_ref(ref, src, dst, page_size)
    assert torch.equal(pool, ref)
