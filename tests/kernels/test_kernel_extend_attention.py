"""extend_attention (prefill over a cached prefix) against its torch reference."""
from __future__ import annotations

import pytest
import torch

from kvbench.kernels.extend_attention import extend_attention, extend_attention_ref
from kvbench.kernels.tolerances import assert_close
from kv_testlib import DTYPES_CPU, device, make_cache, nan_like, randn

SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)   # many blocks on tiny shapes
SMALL_RAGGED = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)   # 2 key blocks per diagonal
LAYOUTS = [(1, False), (16, False), (128, True)]
LAYOUT_IDS = ["page1", "page16", "slab128"]


def _batch(new_lens, prefix_lens, page_size, contiguous, Hkv, D, dtype, dev, seed):
    """A paged (or slab) cache holding each request's prefix + new tokens, and the batch's
    query_start_loc and seq_lens. Returns (gen, k_cache, v_cache, page_table, qsl, seq_lens)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [a + b for a, b in zip(new_lens, prefix_lens)]
    k_cache, v_cache, page_table = make_cache(seq_lens, page_size, Hkv, D, dtype, dev,
                                              contiguous=contiguous, gen=gen)
    qsl = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    return gen, k_cache, v_cache, page_table, qsl, torch.tensor(seq_lens, dtype=torch.int32, device=dev)


def _run(new_lens, prefix_lens, page_size, contiguous, Hq, Hkv, D, dtype, config=None, seed=0, dev=None,
         sm_scale=None):
    dev = dev or device()
    gen, k_cache, v_cache, page_table, qsl, sl = _batch(new_lens, prefix_lens, page_size, contiguous, Hkv, D,
                                                        dtype, dev, seed)
    T = sum(new_lens)
    q = randn(T, Hq, D, dtype=dtype, device=dev, gen=gen)
    out = nan_like(q)
    o = extend_attention(q, k_cache, v_cache, page_table, qsl, sl, page_size, sm_scale=sm_scale,
                         contiguous=contiguous, out=out, config=config)
    assert o.data_ptr() == out.data_ptr()
    ref = extend_attention_ref(q, k_cache, v_cache, page_table, qsl, sl, page_size, sm_scale=sm_scale,
                               contiguous=contiguous)
    assert_close(o, ref, dtype)
    return o


@pytest.mark.parametrize("page_size", [12, 16])
def test_extend_page_walk_by_shift_equals_by_division(page_size):
    """The prefix's page-table walk: by shift and mask for a power-of-two page, by division
    (PAGE_LOG2=-1) otherwise; both match the reference, and the same bits for a power of two."""
    o = _run([37, 1, 20], [0, 50, 33], page_size, False, Hq=4, Hkv=2, D=64, dtype=torch.float16, config=SMALL)
    div = _run([37, 1, 20], [0, 50, 33], page_size, False, Hq=4, Hkv=2, D=64, dtype=torch.float16,
               config=dict(SMALL, PAGE_LOG2=-1))
    assert torch.equal(o, div)


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_extend_ragged_prefix(dtype, layout):
    page_size, contiguous = layout
    # empty prefix (plain prefill), prefix hits of odd lengths, a 1-token extend, new lens not
    # multiples of the block or page size
    _run([37, 1, 20, 9], [0, 50, 33, 100], page_size, contiguous, Hq=4, Hkv=2, D=64, dtype=dtype, config=SMALL)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_extend_default_config(layout):
    page_size, contiguous = layout
    _run([100, 3], [0, 77], page_size, contiguous, Hq=8, Hkv=2, D=64, dtype=torch.float16)


def test_extend_plain_prefill_single_request():
    _run([70], [0], 16, False, Hq=4, Hkv=1, D=128, dtype=torch.bfloat16, config=SMALL)


def test_extend_request_without_new_tokens():
    # a request with 0 new tokens in the batch contributes no rows and must not break the mapping
    _run([5, 0, 18], [3, 40, 0], 16, False, Hq=4, Hkv=2, D=64, dtype=torch.float16, config=SMALL, sm_scale=0.2)


def _error_case():
    """Valid small inputs (2 requests of 5 new tokens each) for the input-error tests to break:
    q [10, 4, 64] fp16, one [64, 2, 64] cache for K and V, page table, seq_lens, query_start_loc."""
    dev = device()
    return (dev, torch.zeros(10, 4, 64, dtype=torch.float16, device=dev),
            torch.zeros(64, 2, 64, dtype=torch.float16, device=dev),
            torch.zeros(2, 4, dtype=torch.int32, device=dev), torch.full((2,), 5, dtype=torch.int32, device=dev),
            torch.tensor([0, 5, 10], dtype=torch.int32, device=dev))


def test_extend_input_errors():
    dev, q, kc, pt, sl, qsl = _error_case()
    with pytest.raises(ValueError, match="query_start_loc must be"):
        extend_attention(q, kc, kc, pt, qsl[:2], sl, 16)
    with pytest.raises(ValueError, match="v_cache dtype"):
        extend_attention(q, kc, kc.float(), pt, qsl, sl, 16)
    with pytest.raises(ValueError, match="page_size"):
        extend_attention(q, kc, kc, pt, qsl, sl, 0)



# ------------------------------------------------------------------ ragged path (k_new / v_new)
def _slots(page_table_row, pos, page_size, contiguous):
    if contiguous:
        return page_table_row[0].long() * page_size + pos
    return page_table_row[pos // page_size].long() * page_size + pos % page_size


def _run_ragged(new_lens, prefix_lens, page_size, contiguous, Hq, Hkv, D, dtype, config=SMALL_RAGGED, seed=0,
                dev=None, fused=True):
    """k_new/v_new hold the new tokens' K/V (as views into a fused qkv tensor when ``fused``); the
    reference reads them from the cache, the kernel must not: their cache slots are poisoned
    (NaN) before the kernel runs."""
    dev = dev or device()
    gen, k_cache, v_cache, page_table, qsl, sl = _batch(new_lens, prefix_lens, page_size, contiguous, Hkv, D,
                                                        dtype, dev, seed)
    T = sum(new_lens)
    # the new tokens' slots, in q's row order
    new_slots = torch.cat([_slots(page_table[b], torch.arange(p, p + n, device=dev), page_size, contiguous)
                           for b, (n, p) in enumerate(zip(new_lens, prefix_lens))])
    if fused:   # [T, (Hq + 2 Hkv) * D], as a qkv projection writes it
        qkv = randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, device=dev, gen=gen)
        q = qkv[:, : Hq * D].view(T, Hq, D)
        k_new = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
        v_new = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
        k_new.copy_(k_cache[new_slots])
        v_new.copy_(v_cache[new_slots])
    else:
        q = randn(T, Hq, D, dtype=dtype, device=dev, gen=gen)
        k_new, v_new = k_cache[new_slots], v_cache[new_slots]
    ref = extend_attention_ref(q, k_cache, v_cache, page_table, qsl, sl, page_size, contiguous=contiguous)
    k_cache[new_slots] = float("nan")
    v_cache[new_slots] = float("nan")
    out = nan_like(q)
    o = extend_attention(q, k_cache, v_cache, page_table, qsl, sl, page_size, contiguous=contiguous,
                         k_new=k_new, v_new=v_new, out=out, config=config)
    assert o.data_ptr() == out.data_ptr()
    assert_close(o[:T], ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_extend_ragged_new_kv(dtype, layout):
    page_size, contiguous = layout
    # empty prefix; prefixes off the BLOCK_N (16) and page grid, one a whole block; a 1-token
    # extend; new lens off the BLOCK_M (32) grid and one spanning several query blocks
    _run_ragged([70, 1, 20, 9, 33], [0, 50, 33, 16, 5], page_size, contiguous, Hq=4, Hkv=2, D=64, dtype=dtype)


def test_extend_ragged_contiguous_new_kv_and_zero_new_tokens():
    # plain (unfused) k_new/v_new; a request with no new tokens sits between two others
    _run_ragged([5, 0, 40], [3, 40, 17], 16, False, Hq=4, Hkv=1, D=32, dtype=torch.float16, fused=False)


def test_extend_ragged_default_config_mha():
    # default config (BLOCK_M=64, BLOCK_N=32 for D=48: padded head dim), H_q == H_kv
    _run_ragged([100, 3], [0, 77], 16, False, Hq=2, Hkv=2, D=48, dtype=torch.bfloat16, config=None)


def test_extend_short_chunks_by_total_tokens():
    """A launch of at most EXTEND_SHORT_TOTAL[d] new tokens (512 at d=64, 320 at d=128) takes the
    short-chunk tiles whatever its request count; more takes them only at <= EXTEND_SHORT_TOKENS a
    request. The default config then gives the reference's output on chunks short by their total
    alone (300 tokens over a prefix: 64-row tiles, 5 query blocks; at d=128, 64x32 tiles)."""
    from kvbench.kernels import extend_attention as ea
    assert ea.EXTEND_SHORT_TOTAL == {64: 512, 128: 320} and ea.EXTEND_SHORT_TOKENS == 128
    assert [ea.short_chunks(t, b, 64) for t, b in ((400, 1), (512, 1), (513, 1), (800, 2), (1024, 8))] == \
        [True, True, False, False, True]
    assert [ea.short_chunks(t, b, 128) for t, b in ((128, 1), (320, 1), (321, 1), (400, 1), (480, 2), (512, 4))] == \
        [True, True, False, False, False, True]
    assert ea.short_chunks(300, 1, 96) is False   # (a head dim without a total bound: per request only)
    for d, (bm, bn) in ((64, (64, 64)), (128, (64, 32))):
        short = ea.extend_config(d, ragged=True, short=True)
        assert (short["BLOCK_M"], short["BLOCK_N"]) == (bm, bn)
        assert ea.extend_config(d, ragged=True, short=False)["BLOCK_M"] == 128
    _run_ragged([300], [45], 16, False, Hq=2, Hkv=1, D=64, dtype=torch.float32, config=None)
    _run_ragged([300], [45], 16, False, Hq=2, Hkv=1, D=128, dtype=torch.float32, config=None)


def test_extend_ragged_paged_override_matches():
    # config RAGGED=0 ignores k_new/v_new and reads the cache (here: intact, so the same result)
    dev = device()
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, pt = make_cache([30], 16, 1, 32, torch.float32, dev, gen=gen)
    q = randn(30, 2, 32, dtype=torch.float32, device=dev, gen=gen)
    qsl = torch.tensor([0, 30], dtype=torch.int32, device=dev)
    sl = torch.tensor([30], dtype=torch.int32, device=dev)
    slots = _slots(pt[0], torch.arange(30, device=dev), 16, False)
    kw = dict(k_new=k_cache[slots], v_new=v_cache[slots])
    a = extend_attention(q, k_cache, v_cache, pt, qsl, sl, 16, config=dict(SMALL_RAGGED, RAGGED=0), **kw)
    b = extend_attention(q, k_cache, v_cache, pt, qsl, sl, 16, config=SMALL_RAGGED, **kw)
    assert_close(a, extend_attention_ref(q, k_cache, v_cache, pt, qsl, sl, 16))
    assert_close(b, a)


def test_extend_ragged_input_errors():
    dev, q, kc, pt, sl, qsl = _error_case()
    kn = torch.zeros(10, 2, 64, dtype=torch.float16, device=dev)
    with pytest.raises(ValueError, match="k_new and v_new must be given together"):
        extend_attention(q, kc, kc, pt, qsl, sl, 16, k_new=kn)
    with pytest.raises(ValueError, match="k_new and v_new must be given together"):
        extend_attention(q, kc, kc, pt, qsl, sl, 16, v_new=kn)
    with pytest.raises(ValueError, match=r"k_new must be \[T=10, H_kv=2, D=64\]"):
        extend_attention(q, kc, kc, pt, qsl, sl, 16, k_new=kn[:9], v_new=kn)
    with pytest.raises(ValueError, match=r"v_new must be \[T=10, H_kv=2, D=64\]"):
        extend_attention(q, kc, kc, pt, qsl, sl, 16, k_new=kn, v_new=torch.zeros(10, 4, 64, dtype=q.dtype, device=dev))
    with pytest.raises(ValueError, match="v_new dtype"):
        extend_attention(q, kc, kc, pt, qsl, sl, 16, k_new=kn, v_new=kn.float())
    with pytest.raises(ValueError, match="k_new must be contiguous in its last dim"):
        extend_attention(q, kc, kc, pt, qsl, sl, 16, k_new=kn.transpose(0, 2).contiguous().transpose(0, 2),
                         v_new=kn)
    with pytest.raises(ValueError, match="BLOCK_M % BLOCK_N == 0"):
        extend_attention(q, kc, kc, pt, qsl, sl, 16, k_new=kn, v_new=kn, config=dict(BLOCK_M=48, BLOCK_N=32))

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_extend_gpu_prefill_4k(dtype):
    _run([4096], [0], 16, False, Hq=32, Hkv=8, D=128, dtype=dtype, dev=torch.device("cuda"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", [(1, False), (16, False), (256, False), (4096, True)],
                         ids=["page1", "page16", "page256", "slab"])
def test_extend_gpu_prefix_hit(layout):
    page_size, contiguous = layout
    _run([2048, 300, 1], [2048, 1000, 3000], page_size, contiguous, Hq=32, Hkv=8, D=128,
         dtype=torch.bfloat16, dev=torch.device("cuda"))


@pytest.mark.gpu
@gpu
def test_extend_gpu_d64_ragged():
    _run([513, 64, 1000], [0, 17, 129], 16, False, Hq=16, Hkv=4, D=64, dtype=torch.bfloat16,
         dev=torch.device("cuda"))


@pytest.mark.gpu
@gpu
def test_extend_gpu_ragged_prefill_4k():
    _run_ragged([4096], [0], 16, False, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, config=None,
                dev=torch.device("cuda"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", [(1, False), (16, False), (4096, True)], ids=["page1", "page16", "slab"])
def test_extend_gpu_ragged_prefix_hit(layout):
    page_size, contiguous = layout
    _run_ragged([2048, 300, 1, 0, 77], [2048, 1000, 3000, 5, 0], page_size, contiguous, Hq=32, Hkv=8, D=128,
                dtype=torch.bfloat16, config=None, dev=torch.device("cuda"))
