"""decode_attention against its torch reference (CPU: Triton interpreter; GPU: real shapes)."""
from __future__ import annotations

import pytest
import torch

from kvbench.kernels._common import page_log2
from kvbench.kernels.decode_attention import DECODE_CONFIG, decode_attention, decode_attention_ref, page_walk_choice
from kvbench.kernels.tolerances import assert_close
from kv_testlib import DTYPES_CPU, device, make_cache, nan_like, randn

# (page_size, contiguous): page 1, page 16, a slab extent (one page spans the whole request)
LAYOUTS = [(1, False), (16, False), (128, True), (16, True)]
LAYOUT_IDS = ["page1", "page16", "slab128", "slab-pages16"]


def _run(seq_lens, page_size, contiguous, Hq, Hkv, D, dtype, num_splits=None, sm_scale=None, seed=0,
         dev=None, q_noncontig=False, config=None):
    dev = dev or device()
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, page_table = make_cache(seq_lens, page_size, Hkv, D, dtype, dev,
                                              contiguous=contiguous, gen=gen)
    B = len(seq_lens)
    if q_noncontig:   # a slice of a fused qkv projection: token stride > H_q * D
        qkv = randn(B, Hq + 2 * Hkv, D, dtype=dtype, device=dev, gen=gen)
        q = qkv[:, :Hq]
    else:
        q = randn(B, Hq, D, dtype=dtype, device=dev, gen=gen)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    out = nan_like(q.contiguous())
    o = decode_attention(q, k_cache, v_cache, page_table, sl, page_size, sm_scale=sm_scale,
                         contiguous=contiguous, num_splits=num_splits, out=out, config=config)
    assert o.data_ptr() == out.data_ptr() and o.dtype == q.dtype and o.shape == q.shape
    ref = decode_attention_ref(q, k_cache, v_cache, page_table, sl, page_size, sm_scale=sm_scale,
                               contiguous=contiguous)
    assert_close(o, ref, dtype)
    return o


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_decode_gqa_ragged(dtype, layout):
    page_size, contiguous = layout
    # ragged, includes 1 token, lengths not a multiple of the page size, one full slab
    _run([1, 37, 128, 90], page_size, contiguous, Hq=8, Hkv=2, D=64, dtype=dtype)


@pytest.mark.parametrize("page_size", [12, 16, 64])
def test_decode_page_walk_by_shift_equals_by_division(page_size):
    """A power-of-two page is walked by shift and mask (PAGE_LOG2 = log2), any other by division
    (-1): both match the reference, and a power of two gives the division's bits (the same slots)."""
    assert page_log2(page_size) == {12: -1, 16: 4, 64: 6}[page_size]
    lens = [1, 37, 200, 90]
    o = _run(lens, page_size, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, num_splits=3,
             config=dict(DECODE_CONFIG, TILE_WALK=False))
    div = _run(lens, page_size, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, num_splits=3,
               config=dict(DECODE_CONFIG, TILE_WALK=False, PAGE_LOG2=-1))
    assert torch.equal(o, div)


def test_decode_page_walk_choice():
    """Which walk a launch takes, (TILE_WALK, PAGE_LOG2): tiles for split launches and pages of 1, division
    for unsplit launches over larger pages, shift for a split launch the tile walk cannot take; config
    keys override, and a walk they make impossible is not taken."""
    assert page_walk_choice(16, 64, False, 64, 64, {}) == (True, 4)
    assert page_walk_choice(1, 1, False, 64, 64, {}) == (True, 0)
    assert page_walk_choice(16, 1, False, 64, 64, {}) == (False, -1)
    assert page_walk_choice(12, 3, False, 64, 64, {}) == (False, -1)
    assert page_walk_choice(128, 3, False, 64, 64, {}) == (False, 7)     # a page over a tile
    assert page_walk_choice(16, 3, False, 64, 8, {}) == (False, 4)       # splits not on page boundaries
    assert page_walk_choice(16, 3, True, 64, 64, {}) == (False, 4)       # a slab walks no table
    assert page_walk_choice(16, 1, False, 64, 64, {"TILE_WALK": True}) == (True, 4)
    assert page_walk_choice(16, 3, False, 64, 64, {"TILE_WALK": False}) == (False, 4)
    assert page_walk_choice(16, 3, False, 64, 64, {"PAGE_LOG2": -1}) == (False, -1)


@pytest.mark.parametrize("page_size", [1, 16, 32, 64])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_tile_walk_reads_the_token_walks_slots(page_size, num_splits):
    """The walk a tile's pages at a time, two tiles ahead (TILE_WALK: the launcher's choice for split
    launches and pages of 1) matches the reference and gives the walk a token at a time's bits: the same
    slots, in the same tiles, for lengths that end mid-page and mid-tile (a window's first key mid-page:
    test_kernel_attention_bounds)."""
    lens = [1, 37, 200, 90]
    tile = _run(lens, page_size, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, num_splits=num_splits,
                config=dict(DECODE_CONFIG, TILE_WALK=True))
    token = _run(lens, page_size, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, num_splits=num_splits,
                 config=dict(DECODE_CONFIG, TILE_WALK=False))
    assert torch.equal(tile, token)


@pytest.mark.parametrize("page_size,num_splits", [(1, 1), (16, 3)])
def test_decode_tile_walk_takes_int64_seq_lens(page_size, num_splits):
    """The tile walk's key mask with int64 seq_lens (the launcher takes them): the int32 lengths' bits."""
    gen = torch.Generator().manual_seed(3)
    lens = [1, 37, 200, 90]
    k_cache, v_cache, pt = make_cache(lens, page_size, 2, 64, torch.float16, device(), gen=gen)
    q = randn(4, 8, 64, dtype=torch.float16, device=device(), gen=gen)
    o32, o64 = (decode_attention(q, k_cache, v_cache, pt, torch.tensor(lens, dtype=dt, device=device()), page_size,
                                 num_splits=num_splits) for dt in (torch.int32, torch.int64))
    assert torch.equal(o32, o64)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 40])
def test_decode_split_kv(num_splits):
    # 40 splits > tokens of the short requests: empty splits must merge away
    _run([5, 200, 64], 16, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, num_splits=num_splits)


@pytest.mark.parametrize("num_splits,align", [(3, 16), (7, 16), (13, 1)])
def test_decode_split_kv_piece_align(num_splits, align):
    """Splits cut in multiples of `PIECE_ALIGN` tokens rather than of a tile: pieces then start
    mid-tile and mid-page (200 tokens in 13 splits of 16: the last piece holds 8)."""
    o = _run([5, 200, 64], 16, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, num_splits=num_splits,
             config=dict(BLOCK_N=32, num_warps=4, num_stages=2, PIECE_ALIGN=align))
    whole = _run([5, 200, 64], 16, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, num_splits=1)
    assert_close(o, whole, torch.float16)


@pytest.mark.parametrize("num_splits", [2, 5, 40])
def test_decode_split_kv_fused_merge(num_splits):
    """Split-KV with the in-kernel merge (last split program merges); run twice: the ticket
    counters must be left at zero for the next launch."""
    for seed in (0, 1):
        _run([5, 200, 64], 16, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, num_splits=num_splits,
             config=dict(FUSED_MERGE=1), seed=seed)


@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 64), (32, 8, 128), (8, 1, 128)], ids=["mha", "gqa32-8-d128", "mqa"])
def test_decode_head_shapes(Hq, Hkv, D):
    _run([3, 70], 16, False, Hq=Hq, Hkv=Hkv, D=D, dtype=torch.bfloat16, num_splits=2)


def test_decode_custom_scale_and_noncontiguous_q():
    _run([33, 9], 4, False, Hq=8, Hkv=2, D=64, dtype=torch.float16, sm_scale=0.3, q_noncontig=True)


def test_decode_kv_pool_views():
    """k_cache / v_cache as kv_pool[l, 0] / kv_pool[l, 1] views, int64 page table."""
    dev = device()
    gen = torch.Generator().manual_seed(1)
    L, Hq, Hkv, D, ps = 2, 8, 2, 64, 16
    seq_lens = [20, 45]
    k_cache, v_cache, pt = make_cache(seq_lens, ps, Hkv, D, torch.float16, dev, gen=gen)
    pool = torch.zeros((L, 2) + tuple(k_cache.shape), dtype=torch.float16, device=dev)
    pool[1, 0], pool[1, 1] = k_cache, v_cache
    q = randn(2, Hq, D, dtype=torch.float16, device=dev, gen=gen)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    o = decode_attention(q, pool[1, 0], pool[1, 1], pt.long(), sl, ps)
    assert_close(o, decode_attention_ref(q, k_cache, v_cache, pt, sl, ps))


def test_decode_torch_backend_is_reference():
    dev = device()
    gen = torch.Generator().manual_seed(2)
    kc, vc, pt = make_cache([10, 3], 4, 2, 64, torch.float32, dev, gen=gen)
    q = randn(2, 4, 64, dtype=torch.float32, device=dev, gen=gen)
    sl = torch.tensor([10, 3], dtype=torch.int32, device=dev)
    torch.testing.assert_close(decode_attention(q, kc, vc, pt, sl, 4, backend="torch"),
                               decode_attention_ref(q, kc, vc, pt, sl, 4))


def test_decode_input_errors():
    dev = device()
    q = torch.zeros(2, 8, 64, dtype=torch.float16, device=dev)
    kc = torch.zeros(64, 2, 64, dtype=torch.float16, device=dev)
    pt = torch.zeros(2, 4, dtype=torch.int32, device=dev)
    sl = torch.ones(2, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="k_cache dtype"):
        decode_attention(q, kc.float(), kc, pt, sl, 16)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        decode_attention(q[:, :7], kc, kc, pt, sl, 16)
    with pytest.raises(ValueError, match="page_table must be"):
        decode_attention(q, kc, kc, pt[:1], sl, 16)
    with pytest.raises(ValueError, match="page_table dtype"):
        decode_attention(q, kc, kc, pt.float(), sl, 16)
    with pytest.raises(ValueError, match="head dim"):
        decode_attention(q, kc[..., :32], kc[..., :32], pt, sl, 16)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kc, kc, pt, sl, 16)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, kc, kc, pt, sl, 16, backend="cuda")
    for align in (0, -16, 2.5):
        with pytest.raises(ValueError, match="PIECE_ALIGN must be an int >= 1"):
            decode_attention(q, kc, kc, pt, sl, 16, num_splits=2, config=dict(PIECE_ALIGN=align))


# ------------------------------------------------------------------------------- GPU, real shapes
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", [(1, False), (16, False), (64, False), (256, False), (4096, True)],
                         ids=["page1", "page16", "page64", "page256", "slab"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_gpu_real_shape(layout, dtype):
    page_size, contiguous = layout
    gen = torch.Generator().manual_seed(3)
    lens = [4096] * 6 + torch.randint(1, 4096, (10,), generator=gen).tolist()   # 16 requests, ragged
    _run(lens, page_size, contiguous, Hq=32, Hkv=8, D=128, dtype=dtype, dev=torch.device("cuda"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused", [0, 1], ids=["merge-kernel", "fused-merge"])
@pytest.mark.parametrize("num_splits", [None, 1, 64])
def test_decode_gpu_long_context(num_splits, fused):
    for seed in (0, 1):   # twice: fused-merge counters must be reset
        _run([32768, 5000], 16, False, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, num_splits=num_splits,
             dev=torch.device("cuda"), config=dict(FUSED_MERGE=fused), seed=seed)


@pytest.mark.gpu
@gpu
def test_decode_gpu_d64():
    _run([1000, 4096, 17], 16, False, Hq=32, Hkv=8, D=64, dtype=torch.bfloat16, dev=torch.device("cuda"))
