"""Paged decode attention: one query token per request against its cached K/V via the page table.

Grouped-query attention (each program handles the G = H_q / H_kv query heads that share one KV
head, padded to a tensor-core tile), fp32 accumulation, any page size, a contiguous (slab) fast
path, and split-KV (flash-decoding) for long contexts / small batches: stage 1 writes each
split's normalised partial output and log-sum-exp, stage 2 (a small second kernel, or with
``config={"FUSED_MERGE": 1}`` the last split program of each KV head) merges them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common
from ._common import (ATTN_DTYPES, INDEX_DTYPES, cdiv, check, check_backend, check_tensor, dot_in_f32, dot_precision,
                      direct, kernel_for, make_plan, next_pow2, num_sms, page_log2, page_walk, pdl_args, pdl_begin,
                      in_range, pdl_late, plan_hit, tile_pages, tile_slots)

LOG2E = 1.4426950408889634

# Default launch config, tuned on H200 (see docs/kernels.md). BLOCK_N = KV tokens per iteration;
# MERGE_CHUNK (default 4) = splits merged per step by the fused merge.
# FUSED_MERGE=1: split-KV partials are merged by the last split program (no second launch).
DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=2, FUSED_MERGE=0)
# Split-KV heuristic: no split when B * H_kv already gives NOSPLIT_PROGRAMS_PER_SM programs per SM;
# otherwise split up to TARGET_PROGRAMS_PER_SM, keeping >= MIN_SPLIT_TOKENS per split.
NOSPLIT_PROGRAMS_PER_SM = 2
TARGET_PROGRAMS_PER_SM = 4
MIN_SPLIT_TOKENS = 64   # 256 left a 2k-context batch-1 decode at 72 programs: 11 us a layer on an H200
MAX_SPLITS = 128


@triton.jit
def key_lo(pos, window, chunk):
    """First key position a query at `pos` sees: ``pos - window + 1`` (sliding window, HF's mask:
    ``pos - window < k <= pos``), ``pos // chunk * chunk`` (chunked attention), the larger of the
    two, never below 0; 0 = no bound. Works on scalars and on [BM] position vectors."""
    pos = tl.maximum(pos, 0)
    lo = tl.where(window > 0, pos - window + 1, 0)
    lo = tl.maximum(lo, tl.where(chunk > 0, (pos // tl.maximum(chunk, 1)) * chunk, 0))
    return tl.maximum(lo, 0)


LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)


@triton.jit
def _add_sink(m_i, l_i, acc, sink_ptr, heads, h_mask):
    """Attention sinks (gpt-oss): each head's learned logit joins the softmax's denominator
    (with no value). m_i [BH] (log2 domain, scaled scores), l_i [BH], acc [BH, BD] of the online
    softmax; returns them with the sink folded in (a row that saw no key gets l = 1, acc = 0)."""
    sk = tl.load(sink_ptr + heads, mask=h_mask, other=0.0).to(tl.float32) * LOG2E_C   # [BH] log2 domain
    m_f = tl.maximum(m_i, sk)
    alpha = tl.exp2(m_i - m_f)
    return m_f, l_i * alpha + tl.exp2(sk - m_f), acc * alpha[:, None]


# run-time sizes are not specialized on (==1, %16): each new value class would be a ~1 s
# just-in-time compile in the middle of a timed serving step
@triton.jit(do_not_specialize=["stride_ptb", "page_size", "split_tokens", "num_splits", "window", "chunk"])
def _decode_kernel(
    q_ptr,                   # [B, H_q, D]
    kc_ptr, vc_ptr,          # [num_slots, H_kv, D]
    pt_ptr,                  # [B, max_pages] int32
    seqlen_ptr,              # [B] int32
    o_ptr,                   # [B, H_q, D]            (not SPLIT)
    po_ptr, plse_ptr,        # [B, H_q, S, D], [B, H_q, S] fp32  (SPLIT: S = num_splits)
    lock_ptr,                # [>= B * H_kv] int32 zeros (FUSED_MERGE ticket counters)
    sink_ptr,                # [H_q] attention sinks (HAS_SINK; else unused)
    qk_scale,                # sm_scale * log2(e)
    stride_qb, stride_qh,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    stride_ptb,
    stride_ob, stride_oh,
    page_size, split_tokens, num_splits,
    window, chunk,           # attention bounds (0 = none): keys in [max(n - window, n-1 // chunk * chunk), n)
    G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, CONTIGUOUS: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    FUSED_MERGE: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_CHUNK: tl.constexpr, PDL: tl.constexpr,
    PIECE_ALIGN: tl.constexpr, HAS_SINK: tl.constexpr = False, PAGE_LOG2: tl.constexpr = -1,
    TILE_WALK: tl.constexpr = False,
):
    pdl_begin(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b64 = b.to(tl.int64)

    seq_len = tl.load(seqlen_ptr + b)
    lo = key_lo(seq_len - 1, window, chunk)                               # first visible key
    # TILE_WALK (the launcher sets it only for a power-of-two page <= BLOCK_N dividing PIECE_ALIGN):
    # tiles start on a page boundary, so a tile's BLOCK_N >> PAGE_LOG2 page ids are loaded once each
    # (not once per token) and the table walk runs two tiles ahead; the splits then cover [lo rounded
    # down to a page, seq_len) and the keys before lo are masked off
    lo_w = lo
    if TILE_WALK:
        lo_w = lo & -(1 << PAGE_LOG2)
    # splits cover [lo, seq_len) only, in pieces sized by this request's own length (multiples of
    # PIECE_ALIGN tokens, whole tiles by default; at least split_tokens): a launch sized for a
    # longer bound (a CUDA graph's bucket) still spreads a shorter context over every split
    piece = tl.maximum(tl.cdiv(tl.cdiv(seq_len - lo_w, num_splits), PIECE_ALIGN) * PIECE_ALIGN, split_tokens)
    start = lo_w + split * piece
    end = tl.minimum(seq_len, start + piece)

    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = kvh * G + offs_g                                              # [BH]
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)        # [BH, BD]
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

    kc_base = kc_ptr + kvh.to(tl.int64) * stride_kch
    vc_base = vc_ptr + kvh.to(tl.int64) * stride_vch
    pt_row = pt_ptr + b64 * stride_ptb
    if CONTIGUOUS:
        slot0 = tl.load(pt_row).to(tl.int64) * page_size
    elif TILE_WALK:
        # Slots of this tile, page ids of the next: the pipeliner issues tile i + 1's K/V copies in
        # iteration i, so their page ids must come from a load of iteration i - 1 (a load in the
        # same iteration puts its latency before the copies, every iteration).
        slot_nx = tile_slots(tile_pages(pt_row, start, end, BLOCK_N, PAGE_LOG2), BLOCK_N, PAGE_LOG2)   # [BN]
        page_nx = tile_pages(pt_row, start + BLOCK_N, end, BLOCK_N, PAGE_LOG2)   # [BN >> PAGE_LOG2]
    else:
        # The page-table walk runs one block ahead of the K/V loads (slots carried through the
        # loop): a K/V address that depends on a load of the same iteration stops Triton's
        # software pipeliner from keeping several K/V tiles in flight.
        slot_nx = page_walk(pt_row, start + tl.arange(0, BLOCK_N), end, page_size, PAGE_LOG2)   # [BN]

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)                               # [BN] token positions
        if TILE_WALK:   # lo <= offs_n < end (end > lo wherever the loop runs)
            n_mask = in_range(offs_n, lo, end)
        else:
            n_mask = offs_n < end
        if CONTIGUOUS:
            slot = slot0 + offs_n
        elif TILE_WALK:
            slot = slot_nx
            slot_nx = tile_slots(page_nx, BLOCK_N, PAGE_LOG2)
            page_nx = tile_pages(pt_row, n0 + 2 * BLOCK_N, end, BLOCK_N, PAGE_LOG2)
        else:
            slot = slot_nx
            slot_nx = page_walk(pt_row, offs_n + BLOCK_N, end, page_size, PAGE_LOG2)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(kc_base + slot[:, None] * stride_kcs + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(vc_base + slot[:, None] * stride_vcs + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)             # [BH, BN] raw scores
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                 # running max (log2 domain)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])                       # one FMA per score
        l_i = l_i * alpha + tl.sum(p, 1)
        p_lp = p.to(v.dtype)
        if DOT_F32:
            p_lp = p_lp.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p_lp, v, acc, input_precision=DOT_PREC)
        m_i = m_new

    pdl_late(PDL)
    if HAS_SINK and not SPLIT:  # the sink: one more logit in the denominator (split: in the merge)
        m_i, l_i, acc = _add_sink(m_i, l_i, acc, sink_ptr, heads, g_mask)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if not SPLIT:
        tl.store(o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partial buffers are contiguous [B, H_q, S, D] / [B, H_q, S]
        row = (b64 * (G * tl.num_programs(1)) + heads) * num_splits + split   # [BH]
        tl.store(po_ptr + row[:, None] * D + offs_d[None, :], out, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(plse_ptr + row, lse, mask=g_mask)
        if FUSED_MERGE:
            # The last split program of (b, kvh) to finish merges all splits of its G heads, so no
            # second launch is needed. Ticket counter: every thread's partial stores happen-before
            # the release of the atomic (barrier first); the winner reads partials through L2 (.cg).
            tl.debug_barrier()
            lock = lock_ptr + b64 * tl.num_programs(1) + kvh
            ticket = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:
                tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")          # reset for the next launch
                rows0 = (b64 * (G * tl.num_programs(1)) + heads) * num_splits  # [BH]
                offs_s = tl.arange(0, BLOCK_S)
                lse_all = tl.load(plse_ptr + rows0[:, None] + offs_s[None, :],
                                  mask=g_mask[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"),
                                  cache_modifier=".cg")                      # [BH, BS]
                m_all = tl.max(lse_all, 1)
                if HAS_SINK:
                    sk = tl.load(sink_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * LOG2E_C
                    m_all = tl.maximum(m_all, sk)
                m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
                den = tl.sum(tl.exp2(lse_all - m_all[:, None]), 1)
                if HAS_SINK:
                    den += tl.exp2(sk - m_all)
                den = tl.where(den > 0, den, 1.0)
                acc2 = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
                offs_c = tl.arange(0, MERGE_CHUNK)
                for s0 in range(0, num_splits, MERGE_CHUNK):
                    cs = s0 + offs_c
                    cm = g_mask[:, None] & (cs < num_splits)[None, :]         # [BH, MC]
                    lc = tl.load(plse_ptr + rows0[:, None] + cs[None, :], mask=cm, other=float("-inf"),
                                 cache_modifier=".cg")
                    w = tl.exp2(lc - m_all[:, None])                           # [BH, MC]
                    part = tl.load(po_ptr + (rows0[:, None, None] + cs[None, :, None]) * D + offs_d[None, None, :],
                                   mask=cm[:, :, None] & d_mask[None, None, :], other=0.0,
                                   cache_modifier=".cg")                       # [BH, MC, BD]
                    acc2 += tl.sum(part * w[:, :, None], 1)
                tl.store(o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         (acc2 / den[:, None]).to(o_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    po_ptr, plse_ptr,        # [B, H_q, S, D], [B, H_q, S] fp32
    o_ptr,                   # [B, H_q, D]
    sink_ptr,                # [H_q] attention sinks (HAS_SINK; else unused)
    stride_ob, stride_oh, num_splits,
    H_Q: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
    HAS_SINK: tl.constexpr = False,
):
    pdl_begin(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < D
    row0 = (b * H_Q + h) * num_splits
    lse = tl.load(plse_ptr + row0 + offs_s, mask=s_mask, other=float("-inf"))          # [BS]
    m = tl.max(lse, 0)
    if HAS_SINK:
        sk = tl.load(sink_ptr + h).to(tl.float32) * LOG2E_C
        m = tl.maximum(m, sk)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)                                                                # [BS]
    parts = tl.load(po_ptr + (row0 + offs_s)[:, None] * D + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)                  # [BS, BD]
    pdl_late(PDL)
    den = tl.sum(w, 0)
    if HAS_SINK:
        den += tl.exp2(sk - m)
    den = tl.where(den > 0, den, 1.0)
    out = tl.sum(parts * w[:, None], 0) / den
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)


_LOCKS: dict = {}
_OLD_LOCKS: list = []   # never freed: a captured CUDA graph may still point at an old buffer


def _lock_buffer(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 ticket counters for the fused split-KV merge; every launch leaves them zero.
    Launches that share a device must not run concurrently on different streams."""
    key = (device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OLD_LOCKS.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split-KV count: enough programs to fill the GPU, never splits shorter than MIN_SPLIT_TOKENS."""
    progs = batch * num_kv_heads
    sms = num_sms(device)
    if progs >= NOSPLIT_PROGRAMS_PER_SM * sms:
        return 1
    want = cdiv(TARGET_PROGRAMS_PER_SM * sms, max(progs, 1))
    cap = max(1, max_seq_len // MIN_SPLIT_TOKENS)
    return int(max(1, min(want, cap, MAX_SPLITS)))


def check_bounds(window, chunk) -> None:
    """`window` and `chunk` are ints >= 0 (0 = no bound)."""
    for name, v in (("window", window), ("chunk", chunk)):
        check(v.__class__ is int and v >= 0,
              lambda: f"{name} must be an int >= 0 (0 = no bound), got {v!r}")


def key_lo_host(pos, window: int = 0, chunk: int = 0):
    """`key_lo` on the host: the first key position a query at `pos` attends to (an int, or
    elementwise over an int numpy array of positions)."""
    lo = pos - window + 1 if window > 0 else pos * 0
    if chunk > 0:
        lo = np.maximum(lo, pos // chunk * chunk)
    return np.maximum(lo, 0)


def bounded_span(max_len: int, window: int = 0, chunk: int = 0) -> int:
    """Upper bound on the keys one decode query attends to: what sizes the split-KV."""
    if window > 0:
        max_len = min(max_len, window)
    if chunk > 0:
        max_len = min(max_len, chunk)
    return max(int(max_len), 1)


def _check(q, k_cache, v_cache, page_table, seq_lens, page_size):
    check_tensor("q", q, ndim=3, dtypes=ATTN_DTYPES)
    ref = q
    check_tensor("k_cache", k_cache, ndim=3, dtypes=(q.dtype,), device=ref)
    check_tensor("v_cache", v_cache, ndim=3, dtypes=(q.dtype,), device=ref)
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=ref)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=ref)   # read unstrided
    B, Hq, D = q.shape
    S, Hkv, Dk = k_cache.shape
    check(Dk == D, lambda: f"k_cache head dim {Dk} != q head dim {D} (k_cache must be [num_slots, H_kv, D])")
    check(tuple(v_cache.shape) == tuple(k_cache.shape),
          lambda: f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    check(Hq % Hkv == 0, lambda: f"H_q={Hq} must be a multiple of H_kv={Hkv} (grouped-query attention)")
    check(page_table.shape[0] == B, lambda: f"page_table must be [B={B}, max_pages], got {tuple(page_table.shape)}")
    check(seq_lens.shape[0] == B, lambda: f"seq_lens must be [B={B}], got {tuple(seq_lens.shape)}")
    check(isinstance(page_size, int) and page_size >= 1, lambda: f"page_size must be a positive int, got {page_size!r}")
    check(D <= 256, lambda: f"head dim {D} > 256 is not supported")


def _gather_kv(k_cache, v_cache, page_table_row, n, page_size, contiguous, lo=0):
    """K/V of positions [lo, n) (nothing outside is read)."""
    pos = torch.arange(lo, n, device=k_cache.device)
    if contiguous:
        slots = page_table_row[0].long() * page_size + pos
    else:
        slots = page_table_row[pos // page_size].long() * page_size + pos % page_size
    return k_cache[slots], v_cache[slots]                                  # [n, H_kv, D]


def softmax_with_sinks(s: torch.Tensor, sinks=None) -> torch.Tensor:
    """softmax over the last dim of fp32 scores s [H, ..., n]; with sinks [H], each head's sink
    joins as one more logit and its probability is dropped (rows then sum to < 1)."""
    if sinks is None:
        return torch.softmax(s, dim=-1)
    sk = sinks.float().reshape(-1, *([1] * (s.dim() - 1))).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, sk], dim=-1), dim=-1)[..., :-1]


def check_sinks(sinks, q) -> None:
    """sinks: None or a [H_q] float tensor on q's device, contiguous."""
    if sinks is None:
        return
    check_tensor("sinks", sinks, ndim=1, dtypes=ATTN_DTYPES, device=q)
    check(sinks.shape[0] == q.shape[1], lambda: f"sinks must be [H_q={q.shape[1]}], got {tuple(sinks.shape)}")


def decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, page_size, sm_scale=None,
                         contiguous=False, num_splits=None, *, window: int = 0, chunk: int = 0, sinks=None):
    """Plain torch reference (fp32 math); num_splits is ignored. Reads only the keys the query at
    position n - 1 sees (``key_lo_host``): [n - window, n) with a window, the current chunk with chunk.
    sinks [H_q]: one more logit per head in the softmax (HF gpt-oss's eager attention), no value."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            out[b] = 0
            continue
        k, v = _gather_kv(k_cache, v_cache, page_table[b], n, page_size, contiguous,
                          key_lo_host(n - 1, window, chunk))
        k = k.float().repeat_interleave(G, dim=1)                          # [n - lo, H_q, D]
        v = v.float().repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale           # [H_q, n]
        p = softmax_with_sinks(s, sinks)
        out[b] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out


def page_walk_choice(page_size: int, num_splits: int, contiguous: bool, block_n: int, align: int,
                     cfg: dict) -> tuple[bool, int]:
    """The page-table walk of a launch, as (TILE_WALK, PAGE_LOG2); the config keys, where given,
    override. Measured on an H200 (bench_kernels, 303c827 against a92b9d4's tree, fraction of copy;
    docs/kernels.md, session 45): split launches and pages of 1 walk a tile's pages at a time (1 x 32k
    p16: 0.78-0.79 against 0.777 by shift; 256 x 1k p1: 0.99 against 0.77 by shift); launches without
    splits over larger pages walk by division (256 x 1k p16 / p64: 0.985 / 0.985, by shift 0.914 /
    0.928, by tiles 0.946-0.968 / 0.951-0.981). A tile walk needs a power-of-two page of at most a
    tile that divides PIECE_ALIGN; a split launch that cannot take it walks by shift."""
    pow2 = page_log2(page_size)
    plog = cfg.get("PAGE_LOG2")
    tile_walk = cfg.get("TILE_WALK")
    if tile_walk is None:
        tile_walk = num_splits > 1 or page_size == 1
    tile_walk = bool(tile_walk) and not contiguous and pow2 >= 0 and plog in (None, pow2) and page_size <= block_n \
        and align % page_size == 0
    if plog is None:
        plog = pow2 if tile_walk or num_splits > 1 else -1
    return tile_walk, plog


def decode_attention(q, k_cache, v_cache, page_table, seq_lens, page_size, sm_scale=None,
                     contiguous=False, num_splits=None, *, window: int = 0, chunk: int = 0,
                     max_seq_len: int | None = None, out=None, backend: str = "triton",
                     config: dict | None = None, sinks=None):
    """Decode attention over the paged KV cache.

    q:          [B, H_q, D]            bf16 / fp16 / fp32
    k_cache:    [num_slots, H_kv, D]   (``kv_pool[l, 0]``); v_cache likewise
    page_table: [B, max_pages] int32   token i -> slot page_table[b, i // page_size] * page_size + i % page_size
    seq_lens:   [B] int32              tokens in cache incl. the current one (already written)
    contiguous: slab fast path, slot = page_table[b, 0] * page_size + i (no table walk)
    window:     sliding window (0 = full): the query at position p = n - 1 attends to keys
                p - window < k <= p only (HF's sliding-window mask; Gemma-3, gpt-oss)
    chunk:      chunked attention (0 = none; Llama-4): keys p // chunk * chunk <= k <= p
                (both given: the narrower bound). Keys outside are never read: the split-KV
                partition covers [lo, n) only, sized by min(max_seq_len, window, chunk)
    num_splits: split-KV count; None picks one from the shape
    max_seq_len: upper bound on seq_lens used to size splits (default max_pages * page_size;
                 no device sync either way)
    out:        optional preallocated [B, H_q, D] output (q's dtype), e.g. for CUDA graphs; may be
                q itself (the output written over q, no allocation: each program reads its rows
                of q before it writes the same rows of out, and no program reads rows another
                writes; split-KV partials are merged after every split read q); no other overlap
    sinks:      optional [H_q] attention sinks (gpt-oss): per head, a logit added to the softmax's
                denominator only (in the scaled-score domain, not multiplied by sm_scale).
                None: the kernel is compiled without them (HAS_SINK=False)
    config:     launch overrides (BLOCK_N, num_warps, num_stages, FUSED_MERGE, MERGE_CHUNK;
                PIECE_ALIGN: a split's tokens are a multiple of it, default BLOCK_N; PAGE_LOG2: -1
                walks the page table by division, log2 of the page by shift; TILE_WALK: a tile's
                pages at a time; the defaults: `page_walk_choice`)
    returns o:  [B, H_q, D] in q's dtype
    """
    key, ok = None, False
    if config is None and backend == "triton" and q.is_cuda and window.__class__ is int and chunk.__class__ is int \
            and window >= 0 and chunk >= 0:
        # the hit path: a key of everything the checks and the compiled code depend on but the
        # page-table width and the context length (they only size the split-KV: the entry's
        # `calls` resolve them); data pointers go to the C launcher as ints (no data_ptr call and
        # pointer check there)
        pq, pk, pv, ppt, psl = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), page_table.data_ptr(), \
            seq_lens.data_ptr()
        if out is None:
            pout, out_key = 0, None
        elif out is q:           # written over q (q's shape, strides, dtype and device are in the key)
            pout, out_key = pq, True
        else:
            pout, out_key = out.data_ptr(), (out.shape, out.is_contiguous() or out.stride(), out.dtype, out.get_device())
        if sinks is None:
            psk, sink_key = psl, None
        else:
            psk, sink_key = sinks.data_ptr(), (sinks.shape, sinks.stride(), sinks.dtype, sinks.get_device())
        qs, pts, ptsh = q.shape, page_table.stride(), page_table.shape
        try:   # (a stride a wrong-rank tensor lacks: no key, the checks below say what is wrong)
            ok = not (pq | pk | pv | ppt | psl | pout | psk) & 15 and pts[-1] == 1   # (a width-1 table may
            # have any stride: it takes the checked path, correctly, every call). Devices as indices (q
            # is on the GPU: an equal index is the same GPU); seq_lens' stride tuple has one item per
            # dim, so with its numel it stands for its shape; the caches and out (whole shapes in the key) are
            # keyed on their strides only when not contiguous (a contiguous one's are the shape's, but
            # on dims of size 1, whose stride reads nothing)
            key = (qs, q.stride(), q.dtype, q.get_device(), k_cache.shape, k_cache.is_contiguous() or k_cache.stride(),
                   k_cache.dtype, k_cache.get_device(), v_cache.shape, v_cache.is_contiguous() or v_cache.stride(),
                   v_cache.dtype, v_cache.get_device(), page_table.dtype, len(pts), ptsh[0], page_table.get_device(),
                   seq_lens.dtype, seq_lens.numel(), seq_lens.stride(), seq_lens.get_device(), out_key, sink_key,
                   page_size.__class__, page_size, sm_scale, not contiguous, _common._pdl_mode, id(DECODE_CONFIG),
                   MIN_SPLIT_TOKENS, NOSPLIT_PROGRAMS_PER_SM, TARGET_PROGRAMS_PER_SM)
        except IndexError:
            ok = False
        entry = plan_hit(_PLANS, key) if ok else None
        if entry is not None:
            B = qs[0]
            if B == 0:
                return torch.empty_like(q) if out is None else out
            call = (max_seq_len, ptsh[1] if max_seq_len is None else 0, num_splits, num_splits.__class__,
                    window, chunk)
            hit = entry[0].get(call) or _resolve_splits(entry, call, B, k_cache.shape[1], page_size, q.device)
            if hit is not None:
                # (the launches unwrapped, `_common.direct`: one Python call each; `post` holds the
                # call's sizes, bounds and the plan's constexprs)
                launch, stream, dev, pre, mid, post, ppo, pplse, plock, Hkv, S, merge = hit
                if out is None:
                    o = torch.empty_like(q)
                    pout = o.data_ptr()
                else:
                    o = out
                if ppo is None:          # one split: the partial buffers are unused, the output stands in
                    ppo = pplse = pout
                launch(B, Hkv, S, stream(dev), *pre, pq, pk, pv, ppt, psl, pout, ppo, pplse,
                       psl if plock is None else plock, psk, *mid, pts[0], *post)
                if merge is not None:
                    launch, stream, dev, pre, post, Hq = merge
                    launch(B, Hq, 1, stream(dev), *pre, ppo, pplse, pout, psk, *post)
                return o
    check_bounds(window, chunk)
    check_backend(backend)
    _check(q, k_cache, v_cache, page_table, seq_lens, page_size)
    check_sinks(sinks, q)
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), device=q.device)
        check(tuple(out.shape) == tuple(q.shape), lambda: f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    if backend == "torch":
        o = decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, page_size, sm_scale, contiguous,
                                 window=window, chunk=chunk, sinks=sinks)
        return o if out is None else out.copy_(o)
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    dev = q.device
    o = torch.empty_like(q) if out is None else out
    if B == 0:
        return o
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    check(scale > 0, lambda: f"sm_scale must be > 0, got {scale}")
    cfg = dict(DECODE_CONFIG, **(config or {}))
    BLOCK_N = cfg["BLOCK_N"]
    max_len = max_seq_len if max_seq_len is not None else page_table.shape[1] * page_size
    max_len = bounded_span(max_len, window, chunk)     # the keys one query can see
    explicit = num_splits is not None
    if not explicit:
        num_splits = choose_num_splits(B, Hkv, max_len, dev)
    check(isinstance(num_splits, int) and num_splits >= 1, lambda: f"num_splits must be a positive int, got {num_splits!r}")
    align = cfg.get("PIECE_ALIGN", BLOCK_N)
    check(align.__class__ is int and align >= 1, lambda: f"config PIECE_ALIGN must be an int >= 1, got {align!r}")
    num_splits = cdiv(max_len, cdiv(cdiv(max_len, num_splits), align) * align)   # drop always-empty splits
    # each request's range is cut in-kernel into num_splits pieces of whole tiles, at least this long
    split_tokens = align if explicit else cdiv(MIN_SPLIT_TOKENS, BLOCK_N) * BLOCK_N
    BLOCK_H = max(16, next_pow2(G))
    BLOCK_D = max(16, next_pow2(D))
    tile_walk, plog = page_walk_choice(page_size, num_splits, contiguous, BLOCK_N, align, cfg)
    fused = bool(cfg.get("FUSED_MERGE", 0)) and num_splits > 1
    BLOCK_S = max(2, next_pow2(num_splits))
    if num_splits > 1:
        po = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=dev)
        plse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=dev)
    else:
        po = plse = o                                                       # unused
    lock = _lock_buffer(B * Hkv, dev) if fused else seq_lens               # unused unless fused
    head = (scale * LOG2E, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
    sk = seq_lens if sinks is None else sinks                               # unused without sinks
    args = (q, k_cache, v_cache, page_table, seq_lens, o, po, plse, lock, sk, *head,
            page_table.stride(0), o.stride(0), o.stride(1), page_size, split_tokens, num_splits, window, chunk)
    kwargs = dict(G=G, BLOCK_H=BLOCK_H, D=D, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, SPLIT=num_splits > 1,
                  CONTIGUOUS=bool(contiguous), DOT_F32=dot_in_f32(q.dtype, dev), DOT_PREC=dot_precision(q.dtype),
                  FUSED_MERGE=fused, BLOCK_S=BLOCK_S, MERGE_CHUNK=cfg.get("MERGE_CHUNK", 4),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], HAS_SINK=sinks is not None,
                  PIECE_ALIGN=align, PAGE_LOG2=plog, TILE_WALK=tile_walk, **pdl_args(dev))
    kernel = kernel_for(_decode_kernel, dev)[(B, Hkv, num_splits)](*args, **kwargs)
    merge = None
    if num_splits > 1 and not fused:
        margs = (po, plse, o, sk, o.stride(0), o.stride(1), num_splits)
        mkwargs = dict(H_Q=Hq, D=D, BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S, num_warps=4, HAS_SINK=sinks is not None,
                       **pdl_args(dev))
        mkernel = kernel_for(_decode_merge_kernel, dev)[(B, Hq)](*margs, **mkwargs)
        merge = make_plan(mkernel, _decode_merge_kernel, margs, mkwargs, len(margs), dev)
    if ok:
        run = make_plan(kernel, _decode_kernel, args, kwargs, len(args), dev)
        if run is not None and (merge is not None or num_splits == 1 or fused):
            # the plan keeps this call's split buffers: a later call of the same key and split
            # count reuses them, so (as with the lock buffer) launches sharing a plan must not
            # run concurrently on different streams
            split = num_splits > 1
            _PLANS.setdefault(key, ({}, {}))[1][num_splits] = (
                direct(run), None if merge is None else direct(merge), po.data_ptr() if split else None,
                plse.data_ptr() if split else None, lock.data_ptr() if fused else None, head,
                (o.stride(0), o.stride(1)), Hkv, Hq, (po, plse, lock) if split else None)   # (the buffers, kept alive)
    return o


def _resolve_splits(entry, call: tuple, B: int, Hkv: int, page_size: int, device):
    """The launch of a plan entry for a call's (max_seq_len, page-table width, num_splits, window,
    chunk): its split count and smallest split (as the checked path computes them) with the plan
    made for that count, remembered in the entry; None when no plan has that count yet."""
    max_seq_len, width, num_splits, _, window, chunk = call
    max_len = max(int(max_seq_len if max_seq_len is not None else width * page_size), 1)
    if window or chunk:
        max_len = bounded_span(max_len, window, chunk)
    explicit = num_splits is not None
    if not explicit:
        num_splits = choose_num_splits(B, Hkv, max_len, device)
    check(isinstance(num_splits, int) and num_splits >= 1,
          lambda: f"num_splits must be a positive int, got {num_splits!r}")
    bn = DECODE_CONFIG["BLOCK_N"]
    S = cdiv(max_len, cdiv(cdiv(max_len, num_splits), bn) * bn)
    plan = entry[1].get(S)
    if plan is None:
        return None
    (launch, stream, dev, pre, tail), merge, ppo, pplse, plock, head, o_strides, hkv, hq, _ = plan
    split_tokens = bn if explicit else cdiv(MIN_SPLIT_TOKENS, bn) * bn
    if merge is not None:
        mlaunch, mstream, mdev, mpre, mtail = merge
        merge = (mlaunch, mstream, mdev, mpre, (*o_strides, S, *mtail), hq)
    hit = (launch, stream, dev, pre, head, (*o_strides, page_size, split_tokens, S, window, chunk, *tail), ppo, pplse,
           plock, hkv, S, merge)
    calls = entry[0]
    if len(calls) >= 4096:   # (every context length of a long eager run: forget them now and then)
        calls.clear()
    calls[call] = hit
    return hit


# key -> ({call: resolved launch (_resolve_splits)}, {num_splits: (plan, merge plan (both `_common.direct`'s
# unwrapped form), split-buffer and lock pointers, fixed args, output strides, H_kv, H_q, the buffers)});
# None -> (the last key taken, its entry)
_PLANS: dict = {}
