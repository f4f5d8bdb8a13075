"""extend_attention (prefill over a cached prefix) against its torch reference."""
from __future__ import annotations

import pytest
import torch

from kvbench.kernels.extend_attention import extend_attention, extend_attention_ref
from kvbench.kernels.tolerances import assert_close
from kv_testlib import DTYPES_CPU, device, make_cache, nan_like, randn

SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)   # many blocks on tiny shapes
LAYOUTS = [(1, False), (16, False), (128, True)]
LAYOUT_IDS = ["page1", "page16", "slab128"]


def _run(new_lens, prefix_lens, page_size, contiguous, Hq, Hkv, D, dtype, config=None, seed=0, dev=None,
         sm_scale=None):
    dev = dev or device()
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [a + b for a, b in zip(new_lens, prefix_lens)]
    k_cache, v_cache, page_table = make_cache(seq_lens, page_size, Hkv, D, dtype, dev,
                                              contiguous=contiguous, gen=gen)
    T = sum(new_lens)
    q = randn(T, Hq, D, dtype=dtype, device=dev, gen=gen)
    qsl = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    out = nan_like(q)
    o = extend_attention(q, k_cache, v_cache, page_table, qsl, sl, page_size, sm_scale=sm_scale,
                         contiguous=contiguous, out=out, config=config)
    assert o.data_ptr() == out.data_ptr()
    ref = extend_attention_ref(q, k_cache, v_cache, page_table, qsl, sl, page_size, sm_scale=sm_scale,
                               contiguous=contiguous)
    assert_close(o, ref, dtype)


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


def test_extend_input_errors():
    dev = device()
    q = torch.zeros(10, 4, 64, dtype=torch.float16, device=dev)
    kc = torch.zeros(64, 2, 64, dtype=torch.float16, device=dev)
    pt = torch.zeros(2, 4, dtype=torch.int32, device=dev)
    sl = torch.full((2,), 5, dtype=torch.int32, device=dev)
    qsl = torch.tensor([0, 5, 10], dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="query_start_loc must be"):
        extend_attention(q, kc, kc, pt, qsl[:2], sl, 16)
    with pytest.raises(ValueError, match="v_cache dtype"):
        extend_attention(q, kc, kc.float(), pt, qsl, sl, 16)
    with pytest.raises(ValueError, match="page_size"):
        extend_attention(q, kc, kc, pt, qsl, sl, 0)


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
