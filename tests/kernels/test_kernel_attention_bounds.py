"""Sliding-window and chunked attention bounds (issue 16) in decode_attention and extend_attention,
against their torch references, with every key outside the bound poisoned (NaN in K and V): a
kernel (or reference) that loads one of them returns NaN, which `assert_close` refuses. The
references are checked against an independent dense masked softmax as well."""
from __future__ import annotations

import math

import pytest
import torch

from kvbench.kernels.decode_attention import (bounded_span, decode_attention, decode_attention_ref,
                                              key_lo_host)
from kvbench.kernels.extend_attention import extend_attention, extend_attention_ref
from kvbench.kernels.tolerances import assert_close
from kv_testlib import device, make_cache, nan_like, randn

SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
SMALL_RAGGED = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)


def _slots(row, pos, page_size, contiguous):
    pos = pos.to(row.device)
    return row[0].long() * page_size + pos if contiguous else row[pos // page_size].long() * page_size + pos % page_size


def _poison_outside(k_cache, v_cache, page_table, first_visible, page_size, contiguous):
    """NaN into K and V of positions [0, first_visible[b]) of every request b."""
    for b, lo in enumerate(first_visible):
        if lo > 0:
            s = _slots(page_table[b], torch.arange(lo, device=k_cache.device), page_size, contiguous)
            k_cache[s] = float("nan")
            v_cache[s] = float("nan")


def _dense(q_rows, pos_rows, k, v, window, chunk, scale, G):
    """Independent reference: every key of the request [n, H_kv, D] (finite), a dense boolean mask."""
    dev = q_rows.device
    q_rows, k, v = q_rows.cpu(), k.cpu(), v.cpu()   # (on a GPU run: the dense check runs on the host)
    n = k.shape[0]
    keys = torch.arange(n)[None, :]
    p = torch.tensor(pos_rows)[:, None]
    vis = keys <= p
    if window:
        vis &= keys > p - window
    if chunk:
        vis &= keys >= p // chunk * chunk
    kk, vv = k.float().cpu().repeat_interleave(G, 1), v.float().cpu().repeat_interleave(G, 1)
    s = torch.einsum("mhd,nhd->hmn", q_rows.float().cpu(), kk) * scale
    s = s.masked_fill(~vis[None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", torch.softmax(s, -1), vv).to(dev)


def test_key_lo_host_matches_the_hf_mask():
    # HF sliding window: p - window < k <= p; chunked: same chunk as p
    assert [key_lo_host(p, 4) for p in (0, 3, 4, 10)] == [0, 0, 1, 7]
    assert [key_lo_host(p, 0, 8) for p in (0, 7, 8, 17)] == [0, 0, 8, 16]
    assert key_lo_host(17, 4, 8) == 16 and key_lo_host(13, 4, 8) == 10
    assert bounded_span(32768, 512) == 512 and bounded_span(300, 512) == 300 and bounded_span(300, 0, 64) == 64


# ------------------------------------------------------------------------------------------ decode
def _decode(seq_lens, page_size, contiguous, window, chunk, *, Hq=4, Hkv=2, D=32, dtype=torch.float32,
            num_splits=None, config=None, seed=0, dev=None, dense=True, max_seq_len=None):
    dev = dev or device()
    gen = torch.Generator().manual_seed(seed)
    kc, vc, pt = make_cache(seq_lens, page_size, Hkv, D, dtype, dev, contiguous=contiguous, gen=gen)
    dense_k, dense_v = kc.clone(), vc.clone()
    _poison_outside(kc, vc, pt, [key_lo_host(n - 1, window, chunk) for n in seq_lens], page_size, contiguous)
    q = randn(len(seq_lens), Hq, D, dtype=dtype, device=dev, gen=gen)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    out = nan_like(q)
    o = decode_attention(q, kc, vc, pt, sl, page_size, contiguous=contiguous, window=window, chunk=chunk,
                         num_splits=num_splits, out=out, config=config, max_seq_len=max_seq_len)
    ref = decode_attention_ref(q, kc, vc, pt, sl, page_size, contiguous=contiguous, window=window, chunk=chunk)
    assert torch.isfinite(ref.float()).all(), "the reference read a poisoned key"
    assert_close(o, ref, dtype)
    for b, n in enumerate(seq_lens if dense else ()):   # the reference against a dense mask over all keys
        s = _slots(pt[b], torch.arange(n), page_size, contiguous)
        dense = _dense(q[b:b + 1], [n - 1], dense_k[s], dense_v[s], window, chunk, 1 / math.sqrt(D), Hq // Hkv)
        assert_close(ref[b], dense[0], dtype)
    return o


# window < context, = context, > context, not a multiple of the page size; 1-token requests
@pytest.mark.parametrize("layout", [(16, False), (1, False), (16, True)], ids=["page16", "page1", "slab16"])
@pytest.mark.parametrize("window", [1, 13, 40, 100])
def test_decode_window(layout, window):
    _decode([1, 40, 97, 64], *layout, window, 0)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_decode_window_split_kv_covers_only_the_window(num_splits):
    # splits partition [n - window, n): with 5 splits of a 37-token window some splits are empty
    _decode([300, 37, 5], 16, False, 37, 0, num_splits=num_splits)
    _decode([300, 37, 5], 16, False, 37, 0, num_splits=num_splits, config=dict(FUSED_MERGE=1), seed=1)
    for tile_walk in (False, True):   # (the walk a tile's pages at a time starts a page before the window)
        _decode([300, 37, 5], 16, False, 37, 0, num_splits=num_splits, config=dict(TILE_WALK=tile_walk), seed=2)


@pytest.mark.parametrize("num_splits", [None, 6])
def test_decode_splits_follow_each_requests_length(num_splits):
    """A launch bound far above the contexts (a CUDA graph's bucket): each request's range is cut
    into the launch's pieces by its own length; with and without a window."""
    _decode([200, 37, 5], 16, False, 0, 0, num_splits=num_splits, max_seq_len=4096)
    _decode([200, 37, 5], 16, False, 50, 0, num_splits=num_splits, max_seq_len=4096, config=dict(FUSED_MERGE=1))


@pytest.mark.parametrize("layout", [(16, False), (16, True)], ids=["page16", "slab16"])
@pytest.mark.parametrize("chunk", [16, 24, 64])
def test_decode_chunk(layout, chunk):
    # lengths at, just past and inside chunk boundaries
    _decode([1, 16, 17, 64, 65, 100], *layout, 0, chunk)


def test_decode_window_and_chunk_bf16():
    _decode([90, 33], 16, False, 20, 32, dtype=torch.bfloat16, num_splits=2)


def test_decode_bound_errors():
    q = torch.zeros(1, 4, 32)
    kc = torch.zeros(16, 2, 32)
    pt = torch.zeros(1, 1, dtype=torch.int32)
    sl = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        decode_attention(q, kc, kc, pt, sl, 16, window=-1)
    with pytest.raises(ValueError, match="chunk must be an int >= 0"):
        decode_attention(q, kc, kc, pt, sl, 16, chunk=2.0)


# ------------------------------------------------------------------------------------------ extend
def _extend(new_lens, prefix_lens, page_size, contiguous, window, chunk, *, ragged, Hq=2, Hkv=1, D=32,
            dtype=torch.float32, config="small", seed=0, prefix_splits=None, max_seq_len=None, dev=None, dense=True):
    dev = dev or device()
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [a + b for a, b in zip(new_lens, prefix_lens)]
    kc, vc, pt = make_cache(seq_lens, page_size, Hkv, D, dtype, dev, contiguous=contiguous, gen=gen)
    dense_k, dense_v = kc.clone(), vc.clone()
    qsl = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    T = sum(new_lens)
    q = randn(T, Hq, D, dtype=dtype, device=dev, gen=gen)
    new_slots = torch.cat([_slots(pt[b], torch.arange(p, p + n), page_size, contiguous)
                           for b, (n, p) in enumerate(zip(new_lens, prefix_lens))])
    k_new = v_new = None
    if ragged:
        k_new, v_new = kc[new_slots].clone(), vc[new_slots].clone()
    # the first key any new token of request b sees is key_lo(prefix_b): poison everything before
    _poison_outside(kc, vc, pt, [key_lo_host(p, window, chunk) for p in prefix_lens], page_size, contiguous)
    ref = extend_attention_ref(q, kc, vc, pt, qsl, sl, page_size, contiguous=contiguous, window=window, chunk=chunk)
    assert torch.isfinite(ref.float()).all(), "the reference read a poisoned key"
    if ragged:   # the kernel must read the new keys from k_new/v_new, not the cache
        kc[new_slots] = float("nan")
        vc[new_slots] = float("nan")
    out = nan_like(q)
    o = extend_attention(q, kc, vc, pt, qsl, sl, page_size, contiguous=contiguous, window=window, chunk=chunk,
                         k_new=k_new, v_new=v_new, out=out, prefix_splits=prefix_splits, max_seq_len=max_seq_len,
                         config=(SMALL_RAGGED if ragged else SMALL) if config == "small" else config)
    assert_close(o, ref, dtype)
    for b, (n, p) in enumerate(zip(new_lens, prefix_lens) if dense else ()):
        s = _slots(pt[b], torch.arange(n + p), page_size, contiguous)
        qs = int(qsl[b])
        dense = _dense(q[qs:qs + n], list(range(p, p + n)), dense_k[s], dense_v[s], window, chunk,
                       1 / math.sqrt(D), Hq // Hkv)
        assert_close(ref[qs:qs + n], dense, dtype)
    return o


# prefill (no prefix), prefix hits, 1-token extend, chunks crossing the window; window smaller
# than a block, not a multiple of the page or block size, larger than every context
@pytest.mark.parametrize("ragged", [False, True], ids=["paged", "ragged"])
@pytest.mark.parametrize("layout", [(16, False), (16, True)], ids=["page16", "slab16"])
@pytest.mark.parametrize("window", [5, 37])
def test_extend_window(layout, window, ragged):
    _extend([45, 1, 20, 0], [0, 70, 33, 9], *layout, window, 0, ragged=ragged)


@pytest.mark.parametrize("ragged", [False, True], ids=["paged", "ragged"])
def test_extend_window_larger_than_context(ragged):
    _extend([45, 1], [0, 70], 16, False, 500, 0, ragged=ragged)


@pytest.mark.parametrize("ragged", [False, True], ids=["paged", "ragged"])
@pytest.mark.parametrize("chunk", [16, 24])
def test_extend_chunk(chunk, ragged):
    _extend([45, 1, 20], [0, 70, 19], 1, False, 0, chunk, ragged=ragged)


def test_extend_window_and_chunk_bf16_default_config():
    _extend([70, 9], [0, 130], 16, False, 48, 64, ragged=True, dtype=torch.bfloat16, D=64,
            config=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2))


# ------------------------------------------------------------------ extend: split over the prefix (issue 12)
@pytest.mark.parametrize("ragged", [False, True], ids=["paged", "ragged"])
def test_extend_prefix_splits(ragged):
    """Split-KV over the cached prefix (5 pieces), merged by a second kernel: exact against the
    reference, with empty pieces (short prefixes), a plain prefill, a 1-token extend, a request
    with no new tokens, and a window (keys outside it poisoned) on the slab path."""
    _extend([16, 1, 20, 0], [70, 45, 0, 9], 16, False, 0, 0, ragged=ragged, prefix_splits=5)
    _extend([16], [70], 16, True, 37, 0, ragged=ragged, prefix_splits=2, seed=1)
    # a launch bound far above the prefixes (a graph captured for a wide table): pieces follow
    # each request's own prefix
    _extend([16, 3], [70, 20], 16, False, 0, 0, ragged=ragged, prefix_splits=3, max_seq_len=4000, seed=2)


def test_extend_prefix_splits_chunk_bf16():
    _extend([20, 5], [60, 40], 4, False, 0, 48, ragged=True, dtype=torch.bfloat16, prefix_splits=3, Hq=1)


@pytest.mark.parametrize("tile_walk", [1, 0], ids=["tiles", "tokens"])
@pytest.mark.parametrize("ragged", [False, True], ids=["paged", "ragged"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_extend_tile_walk(page_size, ragged, tile_walk):
    """TILE_WALK=1 (the default: a tile's page ids at a time from a page boundary): ranges that start
    mid-page (windows, chunks, the new keys of a split's last piece on the paged path) mask the keys
    before their start, which are poisoned here; TILE_WALK=0 walks a token's page id at a time."""
    tw = dict(BLOCK_M=32 if ragged else 16, BLOCK_N=16, num_warps=4, num_stages=2, TILE_WALK=tile_walk)
    _extend([16, 1, 20, 0, 7], [70, 45, 0, 9, 19], page_size, False, 13, 0, ragged=ragged, config=tw)
    _extend([20, 5], [61, 37], page_size, False, 0, 24, ragged=ragged, config=tw, prefix_splits=3, seed=1)
    _extend([16, 3], [70, 21], page_size, False, 37, 0, ragged=ragged, config=tw, prefix_splits=5, seed=2)


def test_extend_prefix_split_heuristic():
    """One short chunk over a long prefix is split by default (the interpreter counts 4 SMs); a
    launch with programs for half the SMs or more is not; the split never makes pieces under the minimum."""
    from kvbench.kernels import extend_attention as emod
    from kvbench.kernels.extend_attention import EXTEND_MIN_SPLIT_TOKENS, choose_prefix_splits
    cpu = torch.device("cpu")
    assert choose_prefix_splits(16, 1, 1, 16, 300, cpu) == 300 // EXTEND_MIN_SPLIT_TOKENS == 2
    assert choose_prefix_splits(16, 1, 2, 16, 100, cpu) == 1          # prefix too short to split
    assert choose_prefix_splits(64, 4, 4, 16, 4096, cpu) == 1         # 16 programs >= 0.5 per SM: no split
    assert choose_prefix_splits(16, 1, 1, 16, 4096, cpu) == 8         # 2 per SM x 4 SMs
    emod._SPLIT_BUFS.clear()
    _extend([16], [300], 16, False, 0, 0, ragged=True, Hq=1, Hkv=1)   # auto (1 program): 2 splits
    assert emod._SPLIT_BUFS, "the split path did not run"


# ------------------------------------------------------------------------------- GPU, real shapes
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bound", [(512, 0), (100, 0), (0, 2048)], ids=["window512", "window100", "chunk2048"])
@pytest.mark.parametrize("num_splits", [None, 1, 16])
def test_decode_bounds_gpu_real_shape(bound, num_splits):
    _decode([8192, 4096, 513, 17], 16, False, *bound, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16,
            num_splits=num_splits, dev=torch.device("cuda"), dense=False)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bound", [(512, 0), (0, 1024), (0, 0)], ids=["window512", "chunk1024", "full"])
@pytest.mark.parametrize("prefix_splits", [None, 1, 8])
@pytest.mark.parametrize("ragged", [False, True], ids=["paged", "ragged"])
def test_extend_bounds_and_prefix_splits_gpu(bound, prefix_splits, ragged):
    # the issue-12 shape: 64-token chunks over 1k / 4k prefixes (1B heads), and a 2k prefill
    _extend([64, 64, 2048], [1024, 4096, 0], 16, False, *bound, ragged=ragged, Hq=32, Hkv=8, D=64,
            dtype=torch.bfloat16, config=None, prefix_splits=prefix_splits, dev=torch.device("cuda"), dense=False)
