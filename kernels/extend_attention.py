"""Extend attention: prefill with a cached prefix, read through the page table.

A variable-length batch of new tokens (flattened, ``query_start_loc`` gives the boundaries).
New token j of request b sits at position ``prefix_b + j`` (``prefix_b = seq_len_b - q_len_b``)
and attends to positions ``[0, prefix_b + j]``. Covers plain prefill (empty prefix) and radix /
prefix-cache hits. Keys come from one of two sources:

- paged (default): the new tokens' K/V were already written into the cache by ``kv_write``, so
  every key, prefix or new, is read through the page table (or the slab, ``contiguous=True``).
- ragged (``k_new``/``v_new`` given, [T, H_kv, D] in q's row order, e.g. views into the fused
  qkv projection output): only the prefix ``[0, prefix_b)`` is read through the page table; the
  new keys are read straight from ``k_new``/``v_new`` row ``query_start_loc[b] + j`` by plain
  affine offsets, which the loads' software pipelining likes better. Same result: by contract
  k_new/v_new hold what kv_write put into the cache.

Each program owns BLOCK_M query rows of one request and one query head. Programs are laid out
over the flattened list of (request, query-block) pairs, decoded in-kernel from
``query_start_loc`` (no host sync, no extra launch), longest-running blocks first.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (ATTN_DTYPES, INDEX_DTYPES, cdiv, check, check_backend, check_tensor, dot_in_f32,
                      direct, dot_precision, kernel_for, make_plan, next_pow2, num_sms, page_log2, page_walk,
                      in_range, plan_hit, tile_pages, tile_slots)
from .decode_attention import (LOG2E, LOG2E_C, _add_sink, _gather_kv,
                               bounded_span, check_bounds, check_sinks, key_lo, key_lo_host, softmax_with_sinks)

# Default launch config per head dim (tuned on H200, see docs/kernels.md). Config keys: BLOCK_M,
# BLOCK_N, num_warps, num_stages, and RAGGED (0 forces the paged path even when k_new/v_new are
# given: an A/B knob for benchmark sweeps). The ragged path needs BLOCK_M % BLOCK_N == 0.
# TILE_WALK (default on where it applies): the page table walked a tile's pages at a time (`_cache_keys`).
EXTEND_CONFIG = {
    64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
}
# ragged path (H200, bf16, 32/8 heads): d=128 128x128 tiles: extend 4k over 4k +4% (400 vs 383
# TFLOP/s), prefill 8k the same (460); d=64 as the paged path
EXTEND_RAGGED_CONFIG = {
    64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
}
_DEFAULT_CONFIG = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
# Prefix split (split-KV over the cached prefix, `choose_prefix_splits`): pieces of at least this
# many keys, at most this many pieces
EXTEND_MIN_SPLIT_TOKENS = 128
EXTEND_MAX_SPLITS = 32
# ... and only while the unsplit launch leaves most SMs idle: fewer programs than this x SMs.
# Measured on an H200 (window_decode_bench --extend, 8B heads, bf16, page 16): a 64-token chunk
# over a 1k prefix, batch 1 (32 programs): 31.8 -> 19.1 us split; batch 8 (256 programs): 40.5 ->
# 66.8 us; the 8B step with a 512-token chunk over 1k (128 programs): extend 1.5 -> 2.8 ms plus a
# 1.6 ms merge. Decode's threshold (2 per SM) split all three.
EXTEND_NOSPLIT_PROGRAMS_PER_SM = 0.5
# ... and then into enough pieces for this many programs per SM. H200, 1B heads, a 64-token chunk
# over a 1k / 4k prefix in a launch sized for 16k (a mixed step's graph), extend + merge:
# 9 splits (this target) 172.7 / 344.6 GB/s, 17 (decode's target, 4) 135.4 / 309.4 GB/s
# (results/kernels/extend_splits_h200_2fffd6c.csv)
EXTEND_TARGET_PROGRAMS_PER_SM = 2


# Short chunks on the ragged path: smaller query tiles (more programs) where the launch would
# otherwise leave SMs idle. Short: at most EXTEND_SHORT_TOKENS new tokens per request on average (a
# prefix hit computing only the question, a multi-turn follow-up), or at most EXTEND_SHORT_TOTAL[d]
# new tokens in all (`short_chunks`). H200, bf16, 32/8 heads, a 64-token chunk over a 1k prefix, auto
# split (results/kernels/extend_config_sweep_h200.csv): d=128 42.8 -> 24.3 us at batch 1, 81.4 ->
# 48.5 us at batch 8; d=64 20.1 -> 17.5 and 40.7 -> 34.6 us. d=64, 48-400 new tokens over a 1.5k
# prefix in a launch sized for 16k, batch 1 and 2 (results/kernels/extend_short_h200_635be03.csv):
# three stages instead of two take unsplit launches from 39.6 to 27.4 us (96 tokens, batch 2) and
# cost at most 1 us on split ones; 64-row tiles up to 512 tokens in all take 160 / 240 / 400 new
# tokens at batch 1 from 37.8 / 43.2 / 44.0 to 27.3 / 28.1 / 33.9 us, a plain 160-token prefill
# from 23.1 to 9.6 us (no split: its programs fill the GPU), 240 x 2 from 43.3 to 33.5 us; at
# 400 x 2 the 128-row tiles stay faster (54.5 against 60.8 us). d=128 (8B heads, same launches,
# results/kernels/extend_short_d128_h200_5c3dbe1.csv): the short tiles (64x32) take 160 / 240 new
# tokens over 1.5k / 1.8k prefixes at batch 1 from 63.3 / 72.2 to 45.5 / 53.3 us, a plain 160-token
# prefill from 41.7 to 11.3 us (batch 2: 19.5 to 13.0), 160 x 2 within 3 % (53.2 against 51.8); from
# 400 tokens in all the 128x128 tiles are faster (400 x 1: 63.2 against 66.4, 240 x 2: 58.7 against 64.7)
EXTEND_SHORT_TOKENS = 128
EXTEND_SHORT_TOTAL = {64: 512, 128: 320}
EXTEND_SHORT_CONFIG = {
    64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    128: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
}


def short_chunks(num_tokens: int, batch: int, head_dim: int) -> bool:
    """Whether a ragged launch of `num_tokens` new tokens of `batch` requests takes the short-chunk
    config (EXTEND_SHORT_CONFIG)."""
    return num_tokens <= EXTEND_SHORT_TOKENS * batch or num_tokens <= EXTEND_SHORT_TOTAL.get(head_dim, 0)


def extend_config(head_dim: int, ragged: bool = False, config: dict | None = None, short: bool = False) -> dict:
    """The launch config a call uses: the per-head-dim default of its path (`short`: the ragged
    path's short-chunk table), updated by ``config``."""
    table = EXTEND_SHORT_CONFIG if short and ragged else EXTEND_RAGGED_CONFIG if ragged else EXTEND_CONFIG
    return dict(table.get(head_dim, _DEFAULT_CONFIG), **(config or {}))


@triton.jit
def _attend(q, k, v, m_i, l_i, acc, qk_scale, vis,
            MASKED: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block of the online softmax (log2 domain): returns the updated (m_i, l_i, acc).
    q [BM, BD], k/v [BN, BD]; vis [BM, BN] (or broadcastable) marks visible keys when MASKED."""
    if DOT_F32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)                 # [BM, BN] raw scores
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                     # running max
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)              # rows that see nothing yet
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s * qk_scale - m_use[:, None])                           # one FMA per score
    l_i = l_i * alpha + tl.sum(p, 1)
    p_lp = p.to(v.dtype)                                                 # P rounded to the V dtype
    if DOT_F32:
        p_lp = p_lp.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None]
    acc = tl.dot(p_lp, v, acc, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, lo, hi, klo,
                kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size, offs_d, d_mask,
                BLOCK_N: tl.constexpr, CONTIGUOUS: tl.constexpr, MASKED: tl.constexpr,
                DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, PAGE_LOG2: tl.constexpr,
                TILE_WALK: tl.constexpr = False):
    """Keys at positions [lo, hi) through the page table (or slab: slot0 + position).
    MASKED: key < hi, causal (key <= pos_m) and in the row's bound (key >= lo_m); else every row
    sees every key. Nothing outside [lo, hi) is loaded.
    TILE_WALK (a power-of-two page <= BLOCK_N, not CONTIGUOUS): lo is a page boundary (`_walk_lo`),
    a tile's BLOCK_N >> PAGE_LOG2 page ids are loaded once each, two tiles ahead (as decode's walk);
    keys before klo (the range's true start, lo <= klo) are masked too, so a range that starts
    mid-page must be MASKED up to klo (the callers' `_regions` see to it); unused otherwise."""
    if not CONTIGUOUS:
        if TILE_WALK:
            slot_nx = tile_slots(tile_pages(pt_row, lo, hi, BLOCK_N, PAGE_LOG2), BLOCK_N, PAGE_LOG2)   # [BN]
            page_nx = tile_pages(pt_row, lo + BLOCK_N, hi, BLOCK_N, PAGE_LOG2)   # [BN >> PAGE_LOG2]
        else:
            # page-table walk one block ahead of the K/V loads (see decode_attention.py: keeps the
            # K/V loads software-pipelined)
            slot_nx = page_walk(pt_row, lo + tl.arange(0, BLOCK_N), hi, page_size, PAGE_LOG2)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if CONTIGUOUS:
            slot = slot0 + offs_n
        elif TILE_WALK:
            slot = slot_nx
            slot_nx = tile_slots(page_nx, BLOCK_N, PAGE_LOG2)
            page_nx = tile_pages(pt_row, n0 + 2 * BLOCK_N, hi, BLOCK_N, PAGE_LOG2)
        else:
            slot = slot_nx
            slot_nx = page_walk(pt_row, offs_n + BLOCK_N, hi, page_size, PAGE_LOG2)
        if MASKED:
            if TILE_WALK:   # klo <= offs_n < hi (hi > klo wherever the loop runs)
                n_mask = in_range(offs_n, klo, hi)
            else:
                n_mask = offs_n < hi
            kv_mask = n_mask[:, None] & d_mask[None, :]
            vis = (offs_n[None, :] <= pos_m[:, None]) & (offs_n[None, :] >= lo_m[:, None]) & n_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
            vis = None
        k = tl.load(kc_base + slot[:, None] * stride_kcs + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(vc_base + slot[:, None] * stride_vcs + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, qk_scale, vis, MASKED, DOT_F32, DOT_PREC)
    return m_i, l_i, acc


@triton.jit
def _new_keys(q, m_i, l_i, acc, qk_scale, offs_m, jlo_m, lo, hi,
              kn_base, vn_base, stride_knt, stride_vnt, offs_d, d_mask,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """New keys j in [lo, hi) of this request, read from k_new/v_new rows by affine offsets.
    MASKED: j < hi, causal (j <= offs_m) and in the row's bound (j >= jlo_m); else every row sees
    every key."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = kn_base + offs_n[:, None].to(tl.int64) * stride_knt + offs_d[None, :]
    v_ptrs = vn_base + offs_n[:, None].to(tl.int64) * stride_vnt + offs_d[None, :]
    for _ in range(lo, hi, BLOCK_N):
        if MASKED:
            n_mask = offs_n < hi
            kv_mask = n_mask[:, None] & d_mask[None, :]
            vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= jlo_m[:, None]) & n_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
            vis = None
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, qk_scale, vis, MASKED, DOT_F32, DOT_PREC)
        offs_n += BLOCK_N
        k_ptrs += BLOCK_N * stride_knt
        v_ptrs += BLOCK_N * stride_vnt
    return m_i, l_i, acc


@triton.jit
def _regions(lo, lo_max, vis_end, hi, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of a query block as three runs: masked [lo, a) (some rows' bound is above
    them: keys below lo_max, the largest row bound), unmasked [a, b) (whole BLOCK_N blocks below
    vis_end <= hi, which every row sees) and masked [b, hi). Returns (lo, a, b)."""
    lo = tl.minimum(lo, hi)
    a = tl.minimum(lo + tl.cdiv(tl.maximum(lo_max - lo, 0), BLOCK_N) * BLOCK_N, hi)
    b = a + (tl.maximum(vis_end - a, 0) // BLOCK_N) * BLOCK_N
    return lo, a, b


@triton.jit
def _walk_lo(lo, hi, PAGE_LOG2: tl.constexpr, TILE_WALK: tl.constexpr):
    """Where a TILE_WALK range of keys [lo, hi) starts: lo rounded down to a page boundary while
    the range is not empty (its tiles then start on pages; the keys before lo are masked), else lo."""
    if TILE_WALK:
        return tl.where(lo < hi, lo & -(1 << PAGE_LOG2), lo)
    else:
        return lo


@triton.jit
def _new_part(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, offs_m, m0, last, prefix, lo_b, lo_u, q_start, kvh,
              kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
              kn_ptr, vn_ptr, stride_knt_a, stride_knh, stride_vnt_a, stride_vnh, offs_d, d_mask,
              BLOCK_N: tl.constexpr, CONTIGUOUS: tl.constexpr, RAGGED: tl.constexpr, NEW_ALIGN: tl.constexpr,
              DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, PAGE_LOG2: tl.constexpr,
              TILE_WALK: tl.constexpr = False):
    """The keys at positions >= prefix (the new tokens', up to the block's last row): from
    k_new/v_new (RAGGED) or through the page table."""
    if RAGGED:
        # new keys j (position prefix + j): unmasked below this block's first row (and at or
        # above every row's bound), masked around them and on the diagonal
        stride_knt = stride_knt_a * NEW_ALIGN
        stride_vnt = stride_vnt_a * NEW_ALIGN
        kn_base = kn_ptr + q_start.to(tl.int64) * stride_knt + kvh.to(tl.int64) * stride_knh
        vn_base = vn_ptr + q_start.to(tl.int64) * stride_vnt + kvh.to(tl.int64) * stride_vnh
        jlo_m = lo_m - prefix
        j_end = last + 1
        j0, j1, j2 = _regions(tl.maximum(lo_b - prefix, 0), tl.maximum(lo_u - prefix, 0), m0, j_end, BLOCK_N)
        m_i, l_i, acc = _new_keys(q, m_i, l_i, acc, qk_scale, offs_m, jlo_m, j0, j1,
                                  kn_base, vn_base, stride_knt, stride_vnt, offs_d, d_mask,
                                  BLOCK_N, True, DOT_F32, DOT_PREC)
        m_i, l_i, acc = _new_keys(q, m_i, l_i, acc, qk_scale, offs_m, jlo_m, j1, j2,
                                  kn_base, vn_base, stride_knt, stride_vnt, offs_d, d_mask,
                                  BLOCK_N, False, DOT_F32, DOT_PREC)
        # the diagonal: BLOCK_M / BLOCK_N blocks with the causal + length mask
        m_i, l_i, acc = _new_keys(q, m_i, l_i, acc, qk_scale, offs_m, jlo_m, j2, j_end,
                                  kn_base, vn_base, stride_knt, stride_vnt, offs_d, d_mask,
                                  BLOCK_N, True, DOT_F32, DOT_PREC)
    else:
        diag_end = prefix + last + 1
        klo = tl.maximum(lo_b, prefix)
        lo_max = lo_u
        if TILE_WALK:   # from the page of klo on: the keys before klo (the prefix's) in the masked run
            lo_max = tl.maximum(lo_u, klo)
        r0, r1, r2 = _regions(_walk_lo(klo, diag_end, PAGE_LOG2, TILE_WALK), lo_max, prefix + m0, diag_end, BLOCK_N)
        m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, r0, r1, klo,
                                    kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                    offs_d, d_mask, BLOCK_N, CONTIGUOUS, True, DOT_F32, DOT_PREC, PAGE_LOG2, TILE_WALK)
        m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, r1, r2, klo,
                                    kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                    offs_d, d_mask, BLOCK_N, CONTIGUOUS, False, DOT_F32, DOT_PREC, PAGE_LOG2, TILE_WALK)
        m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, r2, diag_end, klo,
                                    kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                    offs_d, d_mask, BLOCK_N, CONTIGUOUS, True, DOT_F32, DOT_PREC, PAGE_LOG2, TILE_WALK)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["B", "num_splits"], do_not_specialize_on_alignment=["qsl_ptr", "sink_ptr"])
def _extend_merge_kernel(
    po_ptr, plse_ptr,        # [T, H_q, S, D], [T, H_q, S] fp32
    o_ptr,                   # [T, H_q, D]
    qsl_ptr, B,              # rows from query_start_loc[B] on are not the batch's: left unwritten
    sink_ptr,                # [H_q] attention sinks (HAS_SINK; else unused)
    stride_ot, stride_oh, num_splits,
    H_Q: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SINK: tl.constexpr = False,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if t < tl.load(qsl_ptr + B):
        t64 = t.to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        d_mask = offs_d < D
        row0 = (t64 * H_Q + h) * num_splits
        lse = tl.load(plse_ptr + row0 + offs_s, mask=s_mask, other=float("-inf"))          # [BS]
        s_mask = s_mask & (lse > float("-inf"))   # (a split with no key wrote no partial output)
        m = tl.max(lse, 0)
        if HAS_SINK:
            sk = tl.load(sink_ptr + h).to(tl.float32) * LOG2E_C
            m = tl.maximum(m, sk)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)
        parts = tl.load(po_ptr + (row0 + offs_s)[:, None] * D + offs_d[None, :],
                        mask=s_mask[:, None] & d_mask[None, :], other=0.0)                  # [BS, BD]
        den = tl.sum(w, 0)
        if HAS_SINK:
            den += tl.exp2(sk - m)
        den = tl.where(den > 0, den, 1.0)
        out = tl.sum(parts * w[:, None], 0) / den
        tl.store(o_ptr + t64 * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)


# run-time sizes are not specialized on (==1, %16): each new value class would be a ~1 s
# just-in-time compile in the middle of a timed serving step. The k_new/v_new token strides are
# passed divided by NEW_ALIGN (a constexpr power of two, 16 for any usual layout), so the
# compiler still knows the rows are 16-element aligned and vectorizes their loads.
# Not specialized on: the ints that vary per step, and the alignment of the per-request arrays
# (page table, query_start_loc, seq_lens, and seq_lens passed as sink_ptr without sinks): a mixed
# step passes them sliced after its decode rows, at any 4-byte offset, and each alignment would
# be one more compiled variant, compiled inside a timed step (H200: a paged replay's first mixed
# steps took 3.8-4.7 s; tests/test_model_e2e.py checks the warm-up covers every variant).
@triton.jit(do_not_specialize=["stride_ptb", "page_size", "B", "stride_knt_a", "stride_vnt_a", "window", "chunk",
                               "split_tokens", "num_splits"],
            do_not_specialize_on_alignment=["pt_ptr", "qsl_ptr", "seqlen_ptr", "sink_ptr"])
def _extend_kernel(
    q_ptr,                   # [T, H_q, D]
    kc_ptr, vc_ptr,          # [num_slots, H_kv, D]
    kn_ptr, vn_ptr,          # [T, H_kv, D] new tokens' K/V (RAGGED; else unused)
    pt_ptr,                  # [B, max_pages]
    qsl_ptr,                 # [B + 1]
    seqlen_ptr,              # [B]
    o_ptr,                   # [T, H_q, D]            (not SPLIT)
    po_ptr, plse_ptr,        # [T, H_q, S, D], [T, H_q, S] fp32 partials (SPLIT: S = num_splits)
    sink_ptr,                # [H_q] attention sinks (HAS_SINK; else unused)
    qk_scale,                # sm_scale * log2(e)
    stride_qt, stride_qh,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    stride_knt_a, stride_knh, stride_vnt_a, stride_vnh,   # token strides / NEW_ALIGN
    stride_ptb,
    stride_ot, stride_oh,
    page_size, B,
    window, chunk,           # attention bounds (0 = none), see decode_attention.key_lo
    split_tokens, num_splits,  # SPLIT: the smallest piece; each request's prefix keys cut in num_splits pieces
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    CONTIGUOUS: tl.constexpr, RAGGED: tl.constexpr, NEW_ALIGN: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, HAS_SINK: tl.constexpr = False,
    PAGE_LOG2: tl.constexpr = -1, TILE_WALK: tl.constexpr = False,
):
    h = tl.program_id(0)                 # query head (fastest: heads of one KV group share K/V in L2)
    pid = tl.program_id(1)               # flattened (request, query block)
    # SPLIT: which piece of the cached prefix (the last also takes the new keys), counted from the
    # grid's last: the GPU dispatches programs in grid order, so the heaviest (the new keys' split)
    # starts in the first wave, not after it (H200, a 64-token chunk over 1k in a launch sized
    # for 16k: 17 splits, 1,088 programs, more than one wave)
    split = tl.num_programs(2) - 1 - tl.program_id(2)

    # ---- decode pid -> (request b, query block) from query_start_loc
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    qs_all = tl.load(qsl_ptr + offs_b, mask=b_mask, other=0)
    qe_all = tl.load(qsl_ptr + offs_b + 1, mask=b_mask, other=0)
    nblk = tl.where(b_mask, (qe_all - qs_all + BLOCK_M - 1) // BLOCK_M, 0)   # [BB]
    cum = tl.cumsum(nblk, 0)                                                 # inclusive
    total = tl.sum(nblk, 0)
    if pid < total:
        b = tl.sum((cum <= pid).to(tl.int32), 0)
        blk_before = tl.sum(tl.where(offs_b < b, nblk, 0), 0)
        nblk_b = tl.sum(tl.where(offs_b == b, nblk, 0), 0)
        mblk = nblk_b - 1 - (pid - blk_before)        # last (longest) blocks first
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        seq_len = tl.load(seqlen_ptr + b)
        prefix = seq_len - q_len
        kvh = h // G

        offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)                      # [BM] new-token index
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < D
        rows = (q_start + offs_m).to(tl.int64)
        pos_m = prefix + offs_m                                               # [BM] positions
        m0 = mblk * BLOCK_M
        last = tl.minimum(q_len, m0 + BLOCK_M) - 1                            # the block's last row
        # window / chunk bounds: row m sees keys [lo_m, pos_m]; the block as a whole [lo_b, ...)
        # (rows past q_len get larger bounds than lo_u: they are never stored)
        lo_m = key_lo(pos_m, window, chunk)                                   # [BM]
        lo_b = key_lo(prefix + m0, window, chunk)                             # first row's (smallest)
        lo_u = key_lo(prefix + last, window, chunk)                           # last row's (largest)
        if SPLIT:
            # split-KV over the cached prefix (short chunks over long prefixes: more programs):
            # this request's prefix keys [lo_b, prefix) in num_splits pieces of whole tiles, at
            # least split_tokens each (sized by the actual prefix, not the launch's upper bound:
            # a graph captured for a wide table still spreads a short prefix over every split);
            # split s reads [s_lo, s_hi); the last split also every key from the prefix on
            # (TILE_WALK: from lo_b's page on, so every piece starts on a page; keys below lo_b
            # are in split 0's masked run, below every row's bound)
            lo_s = _walk_lo(lo_b, prefix, PAGE_LOG2, TILE_WALK)
            piece = tl.cdiv(tl.cdiv(tl.maximum(prefix - lo_s, 0), num_splits), BLOCK_N) * BLOCK_N
            piece = tl.maximum(piece, split_tokens)
            s_lo = lo_s + split * piece
            s_hi = tl.minimum(prefix, s_lo + piece)
            # a split with no key (a launch sized for a longer prefix than this request's) loads
            # no query and leaves only its log-sum-exp, -inf: the merge reads no partial output there
            live_m = offs_m < tl.where((s_lo < s_hi) | (split == num_splits - 1), q_len, 0)   # [BM]
        else:
            live_m = m_mask
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=live_m[:, None] & d_mask[None, :], other=0.0)      # [BM, BD]
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        kc_base = kc_ptr + kvh.to(tl.int64) * stride_kch
        vc_base = vc_ptr + kvh.to(tl.int64) * stride_vch
        pt_row = pt_ptr + b.to(tl.int64) * stride_ptb
        slot0 = 0
        if CONTIGUOUS:
            slot0 = tl.load(pt_row).to(tl.int64) * page_size

        if SPLIT:
            c0, c1, c2 = _regions(s_lo, lo_u, s_hi, s_hi, BLOCK_N)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, c0, c1, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, True, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, c1, c2, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, False, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, c2, s_hi, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, True, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)
            if split == num_splits - 1:
                m_i, l_i, acc = _new_part(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, offs_m, m0, last, prefix,
                                          lo_b, lo_u, q_start, kvh, kc_base, vc_base, stride_kcs, stride_vcs,
                                          pt_row, slot0, page_size, kn_ptr, vn_ptr, stride_knt_a, stride_knh,
                                          stride_vnt_a, stride_vnh, offs_d, d_mask, BLOCK_N, CONTIGUOUS, RAGGED,
                                          NEW_ALIGN, DOT_F32, DOT_PREC, PAGE_LOG2, TILE_WALK)
        elif RAGGED:
            # 1. prefix [lo_b, prefix) through the page table: every prefix key is causally
            #    visible; masked where some row's bound is above it, and in the tail (key < prefix)
            c0, c1, c2 = _regions(_walk_lo(lo_b, prefix, PAGE_LOG2, TILE_WALK), lo_u, prefix, prefix, BLOCK_N)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, c0, c1, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, True, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, c1, c2, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, False, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, c2, prefix, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, True, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)
            # 2. the new keys
            m_i, l_i, acc = _new_part(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, offs_m, m0, last, prefix,
                                      lo_b, lo_u, q_start, kvh, kc_base, vc_base, stride_kcs, stride_vcs,
                                      pt_row, slot0, page_size, kn_ptr, vn_ptr, stride_knt_a, stride_knh,
                                      stride_vnt_a, stride_vnh, offs_d, d_mask, BLOCK_N, CONTIGUOUS, RAGGED,
                                      NEW_ALIGN, DOT_F32, DOT_PREC, PAGE_LOG2, TILE_WALK)
        else:
            # keys [lo_b, prefix + last]: masked below the largest row bound, then whole blocks
            # below the first row's position (visible to every row, no mask), then the diagonal
            diag_end = prefix + last + 1
            r0, r1, r2 = _regions(_walk_lo(lo_b, diag_end, PAGE_LOG2, TILE_WALK), lo_u, prefix + m0, diag_end,
                                  BLOCK_N)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, r0, r1, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, True, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, r1, r2, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, False, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)
            m_i, l_i, acc = _cache_keys(q, m_i, l_i, acc, qk_scale, pos_m, lo_m, r2, diag_end, lo_b,
                                        kc_base, vc_base, stride_kcs, stride_vcs, pt_row, slot0, page_size,
                                        offs_d, d_mask, BLOCK_N, CONTIGUOUS, True, DOT_F32, DOT_PREC,
                                        PAGE_LOG2, TILE_WALK)

        if HAS_SINK and not SPLIT:  # the sink: one more logit in the denominator (split: in the merge)
            m_i, l_i, acc = _add_sink(m_i, l_i, acc, sink_ptr, tl.zeros([BLOCK_M], tl.int32) + h, m_mask)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        if SPLIT:   # partials [T, H_q, S, D] / [T, H_q, S]: normalised output and log2-sum-exp
            prow = (rows * tl.num_programs(0) + h) * num_splits + split                 # [BM]
            tl.store(po_ptr + prow[:, None] * D + offs_d[None, :], out, mask=live_m[:, None] & d_mask[None, :])
            tl.store(plse_ptr + prow, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")), mask=m_mask)
        else:
            tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _check(q, k_cache, v_cache, page_table, query_start_loc, seq_lens, page_size):
    check_tensor("q", q, ndim=3, dtypes=ATTN_DTYPES)
    ref = q
    check_tensor("k_cache", k_cache, ndim=3, dtypes=(q.dtype,), device=ref)
    check_tensor("v_cache", v_cache, ndim=3, dtypes=(q.dtype,), device=ref)
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=ref)
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES, device=ref)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=ref)   # read unstrided
    T, Hq, D = q.shape
    S, Hkv, Dk = k_cache.shape
    B = seq_lens.shape[0]
    check(Dk == D, lambda: f"k_cache head dim {Dk} != q head dim {D} (k_cache must be [num_slots, H_kv, D])")
    check(tuple(v_cache.shape) == tuple(k_cache.shape),
          lambda: f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    check(Hq % Hkv == 0, lambda: f"H_q={Hq} must be a multiple of H_kv={Hkv} (grouped-query attention)")
    check(query_start_loc.shape[0] == B + 1,
          lambda: f"query_start_loc must be [B+1={B + 1}] (B from seq_lens), got {tuple(query_start_loc.shape)}")
    check(page_table.shape[0] == B, lambda: f"page_table must be [B={B}, max_pages], got {tuple(page_table.shape)}")
    check(isinstance(page_size, int) and page_size >= 1, lambda: f"page_size must be a positive int, got {page_size!r}")
    check(D <= 256, lambda: f"head dim {D} > 256 is not supported")


def extend_attention_ref(q, k_cache, v_cache, page_table, query_start_loc, seq_lens, page_size,
                         sm_scale=None, contiguous=False, *, window: int = 0, chunk: int = 0, sinks=None):
    """Plain torch reference (fp32 math). With a window / chunk bound, new token at position p
    sees keys [key_lo_host(p), p]; only keys from the first new token's bound on are read.
    sinks [H_q]: one more logit per head in each softmax, no value (decode_attention_ref)."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for b in range(seq_lens.shape[0]):
        qs, qe = qsl[b], qsl[b + 1]
        n_new, n = qe - qs, int(seq_lens[b])
        if n_new == 0:
            continue
        prefix = n - n_new
        lo = key_lo_host(prefix, window, chunk)                            # the first row's bound
        k, v = _gather_kv(k_cache, v_cache, page_table[b], n, page_size, contiguous, lo)
        k = k.float().repeat_interleave(G, dim=1)                          # [n - lo, H_q, D]
        v = v.float().repeat_interleave(G, dim=1)
        s = torch.einsum("mhd,nhd->hmn", q[qs:qe].float(), k) * scale      # [H_q, n_new, n - lo]
        pos = prefix + torch.arange(n_new, device=q.device)
        keys = torch.arange(lo, n, device=q.device)[None, :]
        vis = keys <= pos[:, None]                                         # [n_new, n - lo]
        if window > 0:
            vis &= keys > pos[:, None] - window
        if chunk > 0:
            vis &= keys >= pos[:, None] // chunk * chunk
        s = s.masked_fill(~vis[None], float("-inf"))
        p = softmax_with_sinks(s, sinks)
        out[qs:qe] = torch.einsum("hmn,nhd->mhd", p, v).to(q.dtype)
    return out


def _check_new(q, k_cache, k_new, v_new):
    check((k_new is None) == (v_new is None), "k_new and v_new must be given together (or neither)")
    if k_new is None:
        return
    T, Hkv, D = q.shape[0], k_cache.shape[1], q.shape[2]
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_tensor(name, t, ndim=3, dtypes=(q.dtype,), device=q)
        check(tuple(t.shape) == (T, Hkv, D),
              lambda: f"{name} must be [T={T}, H_kv={Hkv}, D={D}] (q's tokens, the cache's heads), "
                      f"got {tuple(t.shape)}")


def extend_attention(q, k_cache, v_cache, page_table, query_start_loc, seq_lens, page_size, sm_scale=None,
                     contiguous=False, *, window: int = 0, chunk: int = 0, k_new=None, v_new=None, out=None,
                     prefix_splits: int | None = None, max_seq_len: int | None = None, backend: str = "triton",
                     config: dict | None = None, sinks=None):
    """Causal attention of new tokens over their request's cached prefix and themselves.

    q:               [T, H_q, D]           new tokens of B requests, flattened
    k_cache/v_cache: [num_slots, H_kv, D]  the prefix's K/V (and, without k_new/v_new, the new
                                           tokens' K/V, already written by kv_write)
    page_table:      [B, max_pages] int32
    query_start_loc: [B + 1] int32         cumulative new-token counts (starts at 0)
    seq_lens:        [B] int32             prefix + new tokens per request
    contiguous:      slab fast path, slot = page_table[b, 0] * page_size + i
    window/chunk:    attention bounds (0 = none), as decode_attention: the token at position p sees
                     keys p - window < k <= p (sliding window) and/or p // chunk * chunk <= k <= p
                     (chunked); a query block starts at its first row's bound, so no key below
                     every row's bound is read
    k_new/v_new:     optional [T, H_kv, D] new tokens' K/V in q's row order (any token/head
                     stride, last dim contiguous; e.g. views into a fused qkv output): the
                     "ragged" path reads the new keys from here and only the prefix through the
                     page table. They must equal what kv_write stored in the cache: the torch
                     backend (the reference) ignores them and reads everything from the cache.
    out:             optional preallocated [T, H_q, D] output (q's dtype); may be q itself (the
                     output written over q, no allocation: each program reads its query block of
                     q before it writes the same rows of out, and no program reads rows another
                     writes; prefix-split partials are merged after every split read q); no
                     other overlap
    prefix_splits:   split the cached prefix's keys into this many pieces, one program each, merged
                     by a second kernel (None: `choose_prefix_splits` from the program count and
                     the SMs; 1: no split). Short chunks over long prefixes fill the GPU this way
    max_seq_len:     upper bound on seq_lens, sizes the prefix split (default max_pages * page_size;
                     no device sync either way)
    config:          launch overrides (BLOCK_M, BLOCK_N, num_warps, num_stages; RAGGED=0 forces
                     the paged path although k_new/v_new are given; PAGE_LOG2=-1 walks the page
                     table by division, default: by shift for a power-of-two page; TILE_WALK=0: a
                     token's page id at a time; default: a tile's page ids at a time wherever the
                     page is a power of two of at most BLOCK_N)
    sinks:           optional [H_q] attention sinks (gpt-oss), as decode_attention's; None: the
                     kernel is compiled without them
    returns o:       [T, H_q, D] in q's dtype (rows past query_start_loc[-1] are left unwritten)
    """
    key, ok = None, False
    if config is None and backend == "triton" and q.is_cuda and window.__class__ is int and chunk.__class__ is int \
            and window >= 0 and chunk >= 0 and (prefix_splits is None or prefix_splits.__class__ is int
                                                and prefix_splits >= 1):
        # the hit path: a key of everything the checks and the compiled code depend on but the token
        # and request counts (the entry's `calls` resolve them); data pointers go to the C launcher
        # as ints (no data_ptr call and pointer check there); only the pointers the kernels
        # specialize on need 16-byte alignment
        qs, kcs, ptsh = q.shape, k_cache.shape, page_table.shape
        pq, pk, pv, ppt, pqsl, psl = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), page_table.data_ptr(), \
            query_start_loc.data_ptr(), seq_lens.data_ptr()
        new = k_new is not None and v_new is not None
        if new:
            pkn, pvn = k_new.data_ptr(), v_new.data_ptr()
            new_key = (k_new.stride(), v_new.stride(), k_new.dtype, v_new.dtype, k_new.get_device(),
                       v_new.get_device())
        else:
            pkn, pvn, new_key = pk, pv, (k_new is None, v_new is None)
        if out is None:
            pout, out_key = 0, None
        elif out is q:           # written over q (q's shape, strides, dtype and device are in the key)
            pout, out_key = pq, True
        else:
            pout, out_key = out.data_ptr(), (out.shape == qs, out.stride(), out.dtype, out.get_device())
        if sinks is None:
            psk, sink_key = psl, None
        else:
            psk, sink_key = sinks.data_ptr(), (sinks.shape, sinks.stride(), sinks.dtype, sinks.get_device())
        pts, qsls, sls = page_table.stride(), query_start_loc.stride(), seq_lens.stride()
        try:   # (a size or stride a wrong-rank tensor lacks: no key, the checks below say what is wrong)
            T, Hq, D = qs
            B = seq_lens.numel()   # (with its stride tuple's length, 1 dim, in the key: its length)
            ok = not (pq | pk | pv | pkn | pvn | pout) & 15 and pts[-1] == 1 and qsls[-1] == 1 and sls[-1] == 1
            # (a one-element array may have any stride: it takes the checked path, correctly). Devices
            # as indices (q is on the GPU: an equal index is the same GPU); the caches (whole shapes in
            # the key) keyed on their strides only when not contiguous (a contiguous one's are the
            # shape's, but on dims of size 1, whose stride reads nothing)
            key = (Hq, D, q.stride(), q.dtype, q.get_device(), kcs, k_cache.is_contiguous() or k_cache.stride(),
                   k_cache.dtype, k_cache.get_device(), v_cache.shape, v_cache.is_contiguous() or v_cache.stride(),
                   v_cache.dtype, v_cache.get_device(), page_table.dtype, len(pts), ptsh[0] == B,
                   page_table.get_device(), query_start_loc.dtype, len(qsls), query_start_loc.numel() == B + 1,
                   query_start_loc.get_device(), seq_lens.dtype, len(sls), seq_lens.get_device(), new_key,
                   new and k_new.shape == (T, kcs[1], D) == v_new.shape, out_key, sink_key, page_size.__class__,
                   page_size, sm_scale, not contiguous, 64 if B <= 64 else next_pow2(B),
                   T <= EXTEND_SHORT_TOKENS * B or T <= EXTEND_SHORT_TOTAL.get(D, 0),   # (`short_chunks`)
                   id(EXTEND_CONFIG), id(EXTEND_RAGGED_CONFIG), id(EXTEND_SHORT_CONFIG), EXTEND_MIN_SPLIT_TOKENS,
                   EXTEND_MAX_SPLITS, EXTEND_NOSPLIT_PROGRAMS_PER_SM, EXTEND_TARGET_PROGRAMS_PER_SM)
        except (IndexError, ValueError):
            ok = False
        entry = plan_hit(_PLANS, key) if ok else None
        if entry is not None:
            if not (T and B):
                return torch.empty_like(q) if out is None else out
            call = (T, B, max_seq_len, ptsh[1] if max_seq_len is None else 0, prefix_splits, window, chunk)
            hit = entry[3].get(call) or _resolve_splits(entry, call, Hq, D, page_size, q.device)
            if hit is not None:
                # (the launches unwrapped, `_common.direct`: one Python call each; `post` holds the
                # call's sizes, bounds and the plan's constexprs)
                launch, stream, dev, pre, mid, post, ppo, pplse, blocks, S, merge = hit
                if out is None:
                    o = torch.empty_like(q)
                    pout = o.data_ptr()
                else:
                    o = out
                if ppo is None:          # one split: the partial buffers are unused, the output stands in
                    ppo = pplse = pout
                launch(Hq, blocks, S, stream(dev), *pre, pq, pk, pv, pkn, pvn, ppt, pqsl, psl, pout, ppo, pplse, psk,
                       *mid, pts[0], *post)
                if merge is not None:
                    launch, stream, dev, pre, post = merge
                    launch(T, Hq, 1, stream(dev), *pre, ppo, pplse, pout, pqsl, B, psk, *post)
                return o
    check_bounds(window, chunk)
    check(prefix_splits is None or prefix_splits.__class__ is int and prefix_splits >= 1,
          lambda: f"prefix_splits must be a positive int or None, got {prefix_splits!r}")
    check_backend(backend)
    _check(q, k_cache, v_cache, page_table, query_start_loc, seq_lens, page_size)
    _check_new(q, k_cache, k_new, v_new)
    check_sinks(sinks, q)
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), device=q.device)
        check(tuple(out.shape) == tuple(q.shape), lambda: f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    if backend == "torch":
        o = extend_attention_ref(q, k_cache, v_cache, page_table, query_start_loc, seq_lens, page_size,
                                 sm_scale, contiguous, window=window, chunk=chunk, sinks=sinks)
        return o if out is None else out.copy_(o)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    B = seq_lens.shape[0]
    dev = q.device
    o = torch.empty_like(q) if out is None else out
    if T == 0 or B == 0:
        return o
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    check(scale > 0, lambda: f"sm_scale must be > 0, got {scale}")
    ragged = k_new is not None and bool((config or {}).get("RAGGED", 1))
    cfg = extend_config(D, ragged, config, short=short_chunks(T, B, D))
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    pow2 = page_log2(page_size)
    plog = cfg.get("PAGE_LOG2", pow2)
    # TILE_WALK (default on): a tile's pages at a time (`_cache_keys`), for a power-of-two page of at
    # most a tile walked by shift; H200, two calls: 29 of 32 launches faster, up to 1.35x (docs/kernels.md)
    tile_walk = bool(cfg.get("TILE_WALK", True)) and not contiguous and plog == pow2 >= 0 and page_size <= BN
    if ragged:
        check(BM % BN == 0, lambda: f"the ragged path (k_new/v_new) needs BLOCK_M % BLOCK_N == 0, got "
                                    f"BLOCK_M={BM}, BLOCK_N={BN}")
        # largest power of two <= 16 dividing both token strides: the kernel gets stride / align
        # (not specialized) times align (constexpr), so row alignment survives for vector loads
        align = math.gcd(k_new.stride(0), v_new.stride(0), 16)
        kn, vn = k_new, v_new
        kn_strides = (k_new.stride(0) // align, k_new.stride(1), v_new.stride(0) // align, v_new.stride(1))
    else:
        align, kn, vn, kn_strides = 1, k_cache, v_cache, (0, 0, 0, 0)          # unused
    max_len = max_seq_len if max_seq_len is not None else page_table.shape[1] * page_size
    span = bounded_span(max_len, window, chunk)      # >= any query block's prefix keys
    S = prefix_splits if prefix_splits is not None else choose_prefix_splits(T, B, Hq, BM, span, dev)
    # the smallest piece (whole tiles): the heuristic's minimum, one tile when the count is given
    split_tokens = cdiv(EXTEND_MIN_SPLIT_TOKENS if prefix_splits is None else 1, BN) * BN
    S = min(S, cdiv(span, split_tokens))             # drop splits that would always be empty
    po, plse = _split_buffers(T * Hq * S, D, dev) if S > 1 else (o, o)   # (unused without a split)
    max_blocks = T // BM + B                      # >= sum_b cdiv(len_b, BM), no host sync needed
    head = (scale * LOG2E, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), *kn_strides)
    sk = seq_lens if sinks is None else sinks                               # unused without sinks
    args = (q, k_cache, v_cache, kn, vn, page_table, query_start_loc, seq_lens, o, po, plse, sk, *head,
            page_table.stride(0), o.stride(0), o.stride(1), page_size, B, window, chunk, split_tokens, S)
    kwargs = dict(G=Hq // Hkv, D=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_M=BM, BLOCK_N=BN,
                  BLOCK_B=max(64, next_pow2(B)),  # few buckets: few compiles
                  CONTIGUOUS=bool(contiguous), RAGGED=ragged, NEW_ALIGN=align,
                  DOT_F32=dot_in_f32(q.dtype, dev), DOT_PREC=dot_precision(q.dtype), SPLIT=S > 1,
                  HAS_SINK=sinks is not None, PAGE_LOG2=plog, TILE_WALK=tile_walk,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    kernel = kernel_for(_extend_kernel, dev)[(Hq, max_blocks, S)](*args, **kwargs)
    merge = None
    if S > 1:
        margs = (po, plse, o, query_start_loc, B, sk, o.stride(0), o.stride(1), S)
        mkwargs = dict(H_Q=Hq, D=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_S=max(2, next_pow2(S)),
                       HAS_SINK=sinks is not None, num_warps=4)
        mkernel = kernel_for(_extend_merge_kernel, dev)[(T, Hq)](*margs, **mkwargs)
        merge = make_plan(mkernel, _extend_merge_kernel, margs, mkwargs, len(margs), dev)
    if ok:
        run = make_plan(kernel, _extend_kernel, args, kwargs, len(args), dev)
        if run is not None and (S == 1 or merge is not None):
            _PLANS.setdefault(key, (BM, BN, {}, {}))[2][S] = (direct(run), None if merge is None else direct(merge),
                                                             head, (o.stride(0), o.stride(1)))
    return o


def _resolve_splits(entry, call: tuple, Hq: int, D: int, page_size: int, device):
    """The launch of a plan entry for a call's (tokens, requests, max_seq_len, page-table width,
    prefix_splits, window, chunk): its split count, smallest split, split buffers and grid (as the
    checked path computes them) with the plan made for that count, remembered in the entry; None
    when no plan has that count yet."""
    BM, BN, plans, calls = entry
    T, B, max_seq_len, width, prefix_splits, window, chunk = call
    max_len = max_seq_len if max_seq_len is not None else width * page_size
    span = bounded_span(max_len, window, chunk)
    S = prefix_splits if prefix_splits is not None else choose_prefix_splits(T, B, Hq, BM, span, device)
    split_tokens = cdiv(EXTEND_MIN_SPLIT_TOKENS if prefix_splits is None else 1, BN) * BN
    S = min(S, cdiv(span, split_tokens))
    plan = plans.get(S)
    if plan is None:
        return None
    (launch, stream, dev, pre, tail), merge, head, o_strides = plan
    # (the buffers stay allocated when they grow: a remembered pointer stays valid)
    po, plse = _split_buffers(T * Hq * S, D, device) if S > 1 else (None, None)
    if merge is not None:
        mlaunch, mstream, mdev, mpre, mtail = merge
        merge = (mlaunch, mstream, mdev, mpre, (*o_strides, S, *mtail))
    hit = (launch, stream, dev, pre, head, (*o_strides, page_size, B, window, chunk, split_tokens, S, *tail),
           None if po is None else po.data_ptr(), None if plse is None else plse.data_ptr(), T // BM + B, S, merge)
    if len(calls) >= 4096:   # (every batch shape of a long eager run: forget them now and then)
        calls.clear()
    calls[call] = hit
    return hit


# key -> (BLOCK_M, BLOCK_N, {splits: (plan, merge plan (both `_common.direct`'s unwrapped form), fixed
#         arguments, output strides)},
#         {call: resolved launch (_resolve_splits)}); None -> (the last key taken, its entry)
_PLANS: dict = {}

_SPLIT_BUFS: dict = {}
_OLD_SPLIT_BUFS: list = []   # never freed: a captured CUDA graph may still point at an old buffer


def _split_buffers(rows: int, head_dim: int, device: torch.device):
    """fp32 scratch for the prefix-split partials: ([>= rows * head_dim] outputs, [>= rows] lse),
    grown as needed and shared by every launch on the device (launches must not run
    concurrently on different streams)."""
    k = (device.type, device.index)
    bufs = _SPLIT_BUFS.get(k)
    if bufs is None or bufs[1].numel() < rows or bufs[0].numel() < rows * head_dim:
        if bufs is not None:
            _OLD_SPLIT_BUFS.append(bufs)
        n = max(rows, 1 << 16)
        n_o = max(rows * head_dim, 1 << 22)
        bufs = (torch.empty(n_o, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device))
        _SPLIT_BUFS[k] = bufs
    return bufs


def choose_prefix_splits(num_tokens: int, batch: int, num_heads: int, block_m: int, max_prefix: int,
                         device: torch.device) -> int:
    """Prefix split count for an extend launch (issue 12 §4): a short chunk over a long cached
    prefix is a handful of (head, query block) programs, each walking the whole prefix; split the
    prefix like decode's split-KV when the programs do not fill the GPU (decode's thresholds),
    never into pieces shorter than EXTEND_MIN_SPLIT_TOKENS."""
    blocks = max(cdiv(num_tokens, block_m), min(batch, num_tokens))   # query blocks (a lower bound)
    progs = num_heads * blocks
    sms = num_sms(device)
    if progs >= EXTEND_NOSPLIT_PROGRAMS_PER_SM * sms:
        return 1
    want = cdiv(EXTEND_TARGET_PROGRAMS_PER_SM * sms, progs)
    return int(max(1, min(want, max_prefix // EXTEND_MIN_SPLIT_TOKENS, EXTEND_MAX_SPLITS)))
