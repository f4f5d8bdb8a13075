#!/usr/bin/env python3
"""Benchmark the shared Triton kernel set on one GPU, against a device-to-device copy and peers.

One run, one device: first the bandwidth of a >= 1 GiB device-to-device copy (bytes read +
written), then each kernel at the shapes of issue 3, with peers where they exist on the machine
(torch SDPA on contiguous K/V, FlexAttention with a paged block mask). Every row names the device.

    PYTHONPATH=. python3 experiments/bench_kernels.py            # full run, writes results/kernels/
    PYTHONPATH=. python3 experiments/bench_kernels.py --sweep    # also sweep launch configs

Writes ``<out>/kernels_<device>.csv``, ``<out>/kernels_<device>.png`` and, with --sweep,
``<out>/sweep_<device>.csv``. Times are medians of ``triton.testing.do_bench`` (which flushes
L2 between repetitions, so every input is read cold).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import itertools
import os
import pathlib
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "--smoke" in sys.argv           # tiny shapes on CPU through the Triton interpreter (checks the script)
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from checkout import use_checkout  # noqa: E402  (experiments/checkout.py)

use_checkout()



import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kvbench.kernels import _common  # noqa: E402
from kvbench.kernels import decode_attention as dmod  # noqa: E402
from kvbench.kernels import extend_attention as emod  # noqa: E402
from kvbench.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from kvbench.kernels.extend_attention import extend_attention  # noqa: E402
from kvbench.kernels.kv_write import kv_write, kv_write_ref  # noqa: E402
from kvbench.kernels.page_copy import page_copy  # noqa: E402
from kvbench.kernels.tolerances import compare  # noqa: E402

DATE = datetime.date.today().isoformat()
ROWS: list[dict] = []
SWEEP: list[dict] = []
FIELDS = ["device", "date", "kernel", "impl", "shape", "dtype", "page_size", "config", "median_ms",
          "gbps", "tflops", "ratio_to_copy", "vs_sdpa", "correct", "note"]


def _empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(*a):
    print(*a, flush=True)


def bench(fn, rep=200):
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


# Issue 3 shapes; --smoke shrinks them so the script itself can be checked on a CPU.
SZ = dict(copy_gib=2.0, dec_B=64, dec_L=4096, wide_B=256, wide_L=1024, long_L=32768, pre_T=8192, ext_new=4096, ext_prefix=4096,
          kvw_T=8192, kvw_S=64 * 4096, pc_L=32, pc_P=4096, pc_n=1024, Hq=32, Hkv=8, D=128,
          rot_dec=3, rot_long=6, rot_kvw=8, lin_H=4096, lin_I=14336, lin_rot_bytes=256 << 20)
if SMOKE:
    SZ.update(copy_gib=0.01, dec_B=4, dec_L=256, wide_B=8, wide_L=128, long_L=1024, pre_T=256, ext_new=128, ext_prefix=128,
              kvw_T=256, kvw_S=4096, pc_L=2, pc_P=64, pc_n=8, Hq=8, Hkv=2, D=64, rot_dec=2, rot_long=2, rot_kvw=2,
              lin_H=128, lin_I=256, lin_rot_bytes=1 << 16)


def add_row(**kw):
    row = {k: "" for k in FIELDS}
    row.update(device=DEVICE, date=DATE)
    row.update(kw)
    ROWS.append(row)
    log("  " + " | ".join(f"{k}={row[k]}" for k in
                          ("kernel", "impl", "page_size", "config", "median_ms", "gbps", "tflops",
                           "ratio_to_copy", "vs_sdpa", "correct", "note") if row[k] != ""))
    return row


def fmt(x, nd=3):
    return "" if x is None or x == "" else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def cfg_str(cfg):
    return ";".join(f"{k}={v}" for k, v in sorted(cfg.items())) if cfg else "default"


# --------------------------------------------------------------------------------- copy baseline
def copy_bandwidth(gib=2.0):
    n = int(gib * (1 << 30)) // 2
    src = torch.randn(n, device=DEV, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep=400)
    nbytes = 2 * src.numel() * src.element_size()
    gbps = nbytes / ms / 1e6
    assert torch.equal(dst, src)
    del src, dst
    _empty_cache()
    return ms, gbps, nbytes


# --------------------------------------------------------------------------------- helpers
def paged_table(B, L, page_size, dev, gen, contiguous=False):
    """Page table for B requests of L tokens over a pool of exactly B*L slots (fragmented)."""
    P = L // page_size
    if contiguous:                 # slab: request b owns pages [b*P, (b+1)*P)
        start = torch.arange(B, dtype=torch.int32, device=dev) * P
        return (start[:, None] + torch.arange(P, dtype=torch.int32, device=dev)[None, :]).contiguous()
    perm = torch.randperm(B * P, generator=gen).to(torch.int32)
    return perm.view(B, P).to(dev)


def gather_contig(cache, page_table, page_size, L):
    """[S, H, D] pool + table -> contiguous [B, H, L, D] (what SDPA reads)."""
    pos = torch.arange(L, device=cache.device)
    slots = page_table[:, pos // page_size].long() * page_size + pos % page_size   # [B, L]
    return cache[slots].permute(0, 2, 1, 3).contiguous()


def sdpa_variants(q, k, v, causal):
    """{name: fn} for SDPA backends that run these inputs (GQA native via enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    out = {}
    cands = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
             ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    G = q.shape[1] // k.shape[1]
    for name, be in cands:
        for gqa_mode in ("native", "expanded"):
            if gqa_mode == "native":
                kk, vv, kw = k, v, dict(enable_gqa=True) if G > 1 else {}
            else:
                if G == 1:
                    continue
                kk, vv, kw = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), {}

            def fn(kk=kk, vv=vv, kw=kw, be=be):
                if be is None:
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **kw)
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **kw)
            try:
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                out[f"{name}/{gqa_mode}"] = fn
                break
            except Exception as e:  # backend not available for these inputs
                log(f"    sdpa {name}/{gqa_mode}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                del kk, vv
    return out


@contextlib.contextmanager
def pdl_mode(mode: str | None):
    """Launch in another programmatic-dependent-launch mode (the A/B rows); None: the default."""
    was = _common.set_pdl(mode) if mode else None
    try:
        yield
    finally:
        if mode:
            _common.set_pdl(was)


PDL_AB = ((None, ""), ("off", " (no PDL)"), ("early", " (PDL early)"))   # default: "late"


# --------------------------------------------------------------------------------- decode
def kernel_records(prof, cats: tuple[str, ...] = ("kernel",)) -> list[dict]:
    """The kernel records (chrome-trace events: name, ts, dur in µs) of a torch.profiler run, in
    start order (`cats`: the event categories kept, e.g. also "gpu_memcpy", "gpu_memset")."""
    import json
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return sorted((e for e in events if e.get("cat") in cats), key=lambda e: e["ts"])


def bench_rot(fns, rep=200):
    """GPU time of one call: the calls in ``fns`` (each on its own inputs, together larger than L2)
    are captured once in a CUDA graph and the graph's replays are timed by do_bench, divided by
    len(fns). The graph removes the Python launch overhead (our launchers' and torch's), which
    would otherwise be what small kernels measure; rotating input sets keeps every input cold and
    amortises do_bench's L2 flush (it zeroes 256 MB before each replay, leaving L2 full of dirty
    lines that the first call pays to write back). Falls back to eager launches if capture fails."""
    if SMOKE:
        return bench(lambda: [f() for f in fns], rep=rep) / len(fns)
    for f in fns:                       # compile, allocate lazily created buffers
        f()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        torch.cuda.synchronize()
        g.replay()
        torch.cuda.synchronize()
        ms = bench(g.replay, rep=rep) / len(fns)
        del g
        return ms
    except Exception as e:
        log(f"    graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); timing eager launches")
        torch.cuda.synchronize()
        return bench(lambda: [f() for f in fns], rep=rep) / len(fns)


def bench_decode(copy_gbps, args, gen):
    dev = DEV
    B, L, Hq, Hkv, D, dt = SZ["dec_B"], SZ["dec_L"], SZ["Hq"], SZ["Hkv"], SZ["D"], torch.bfloat16
    shape = f"B={B} ctx={L} Hq={Hq} Hkv={Hkv} D={D}"
    S = B * L
    R = SZ["rot_dec"]
    kcs = [torch.randn(S, Hkv, D, device=dev, dtype=dt) for _ in range(R)]
    vcs = [torch.randn(S, Hkv, D, device=dev, dtype=dt) for _ in range(R)]
    qs = [torch.randn(B, Hq, D, device=dev, dtype=dt) for _ in range(R)]
    k_cache, v_cache, q = kcs[0], vcs[0], qs[0]
    sl = torch.full((B,), L, dtype=torch.int32, device=dev)
    kv_bytes = 2 * S * Hkv * D * dt.itemsize
    io_bytes = 2 * q.numel() * dt.itemsize

    def nbytes(ps, contiguous):
        return kv_bytes + io_bytes + (0 if contiguous else B * (L // ps) * 4)

    def fns_for(pt, ps, contiguous=False, **kw):
        return [lambda i=i: decode_attention(qs[i], kcs[i], vcs[i], pt, sl, ps, contiguous=contiguous, **kw)
                for i in range(R)]

    pt16 = paged_table(B, L, 16, dev, gen)
    ref = None
    results = {}
    layouts = [(1, False), (16, False), (64, False), (256, False), (L, True)]
    tables = {lay: (pt16 if lay == (16, False) else paged_table(B, L, lay[0], dev, gen, lay[1])) for lay in layouts}
    if args.sweep:
        grid = [dict(BLOCK_N=bn, num_warps=w, num_stages=st) for bn, st in
                [(32, 3), (32, 4), (64, 2), (64, 3), (64, 4), (128, 2), (32, 2), (64, 1), (128, 1)] for w in (4, 8)]
        for cfg in grid[: args.sweep_limit]:
            for ns in [1, 2]:
                try:
                    ms = bench_rot(fns_for(pt16, 16, num_splits=ns, config=cfg), rep=100)
                except Exception as e:
                    log(f"    sweep decode {cfg} splits={ns}: {type(e).__name__} {str(e)[:100]}")
                    continue
                SWEEP.append(dict(device=DEVICE, kernel=f"decode_b{B}_{L // 1024}k_p16", config=cfg_str(cfg), splits=ns,
                                  median_ms=ms, gbps=nbytes(16, False) / ms / 1e6))
        name = f"decode_b{B}_{L // 1024}k_p16"
        top = sorted([r for r in SWEEP if r["kernel"] == name], key=lambda r: r["median_ms"])[:5]
        for (ps, contiguous), pt in tables.items():
            for r in top:
                cfg = {k: int(v) for k, v in (kv.split("=") for kv in r["config"].split(";"))}
                ms = bench_rot(fns_for(pt, ps, contiguous, num_splits=r["splits"], config=cfg), rep=100)
                SWEEP.append(dict(device=DEVICE, kernel=f"decode_b{B}_{L // 1024}k_{'slab' if contiguous else f'p{ps}'}",
                                  config=r["config"], splits=r["splits"], median_ms=ms,
                                  gbps=nbytes(ps, contiguous) / ms / 1e6))

    # the reported numbers: default config and heuristic splits (what the engine gets)
    for (ps, contiguous), pt in tables.items():
        o = decode_attention(q, k_cache, v_cache, pt, sl, ps, contiguous=contiguous)
        ref_l = decode_attention_ref(q[:8], k_cache, v_cache, pt[:8], sl[:8], ps, contiguous=contiguous)
        if ps == 16 and not contiguous:
            ref = ref_l
        ok, msg = compare(o[:8], ref_l)
        ms = bench_rot(fns_for(pt, ps, contiguous))
        gbps = nbytes(ps, contiguous) / ms / 1e6
        results[(ps, contiguous)] = ms
        add_row(kernel="decode", impl="triton" + ("-slab" if contiguous else ""), shape=shape, dtype="bf16",
                page_size=ps, config=cfg_str(dmod.DECODE_CONFIG) + f";splits={dmod.choose_num_splits(B, Hkv, L, dev)}",
                median_ms=fmt(ms, 4), gbps=fmt(gbps, 1), ratio_to_copy=fmt(gbps / copy_gbps),
                correct="ok" if ok else "FAIL", note=msg if not ok else "")
    spread = max(results.values()) / min(results.values())
    log(f"  decode page-size spread: slowest/fastest = {spread:.3f}")

    # peers: SDPA on contiguous K/V of the same shape (same data as the page-16 table)
    kcs_c = [gather_contig(kcs[i], pt16, 16, L) for i in range(R)]
    vcs_c = [gather_contig(vcs[i], pt16, 16, L) for i in range(R)]
    sd = {}
    variants = [sdpa_variants(qs[i][:, :, None, :], kcs_c[i], vcs_c[i], causal=False) for i in range(R)]
    for name in variants[0]:
        o = variants[0][name]()
        ok, msg = compare(o[:, :, 0][:8], ref)
        ms = bench_rot([v[name] for v in variants if name in v])
        by = (kv_bytes + io_bytes) * (Hq // Hkv if name.endswith("expanded") else 1)
        sd[name] = ms
        add_row(kernel="decode", impl=f"torch-sdpa-{name}", shape=shape, dtype="bf16", page_size="contiguous",
                median_ms=fmt(ms, 4), gbps=fmt(by / ms / 1e6, 1), ratio_to_copy=fmt(by / ms / 1e6 / copy_gbps),
                correct="ok" if ok else "FAIL", note="bytes=K/V actually read")
    del kcs_c, vcs_c, variants
    _empty_cache()
    if sd:
        best_sdpa = min(sd.values())
        for row in ROWS:
            if row["kernel"] == "decode" and row["impl"].startswith("triton") and f"ctx={L} " in row["shape"]:
                row["vs_sdpa"] = fmt(best_sdpa / float(row["median_ms"]))
        log(f"  decode: best SDPA {best_sdpa:.4f} ms ({min(sd, key=sd.get)})")

    if not args.skip_flex:
        try:
            bench_flex_decode(q, k_cache, v_cache, sl, B, L, Hkv, D, copy_gbps, kv_bytes + io_bytes, shape, gen)
        except Exception as e:
            log("  flex decode failed: " + "".join(traceback.format_exception_only(type(e), e))[:400])
            add_row(kernel="decode", impl="flex-attention-paged", shape=shape, dtype="bf16",
                    note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
    del kcs, vcs, k_cache, v_cache
    _empty_cache()
    return results


def bench_flex_decode(q, k_cache, v_cache, sl, B, L, Hkv, D, copy_gbps, nbytes, shape, gen):
    """FlexAttention over the same pool through a paged block mask (torch's experimental
    PagedAttention helper maps logical blocks to physical pages)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev = q.device
    S = k_cache.shape[0]
    kf = k_cache.permute(1, 0, 2).unsqueeze(0)                 # [1, Hkv, S, D] strided view of the pool
    vf = v_cache.permute(1, 0, 2).unsqueeze(0)
    q4 = q[:, :, None, :]
    last = None
    for ps in (16, 128):
        t0 = time.time()
        try:
            n_pages = S // ps
            P = L // ps
            pa = PagedAttention(n_pages, ps, B, device=dev)
            perm = torch.randperm(n_pages, generator=gen).to(dev).view(B, P)
            pa.page_table[:, :P] = perm
            rows = torch.arange(B, device=dev)[:, None].expand(B, P)
            pa.physical_to_logical[rows, perm] = torch.arange(P, device=dev)[None, :].expand(B, P)
            pa.capacity[:] = L
            pt = perm.to(torch.int32).contiguous()

            def full(b, h, q_idx, kv_idx):
                return kv_idx >= 0
            logical = create_block_mask(full, B, None, 1, L, device=dev, BLOCK_SIZE=(128, ps))
            bm = pa.convert_logical_block_mask(logical)
            fn = lambda: flex(q4, kf, vf, block_mask=bm, enable_gqa=True)
            o = fn()[:, :, 0]
            ref = decode_attention(q, k_cache, v_cache, pt, sl, ps)
            ok, msg = compare(o, ref)
            ms = bench_rot([fn])
            gbps = nbytes / ms / 1e6
            add_row(kernel="decode", impl="flex-attention-paged", shape=shape, dtype="bf16", page_size=ps,
                    median_ms=fmt(ms, 4), gbps=fmt(gbps, 1), ratio_to_copy=fmt(gbps / copy_gbps),
                    correct="ok (vs triton)" if ok else "FAIL", note=(msg if not ok else "") +
                    f"one input set (1 GiB, no rotation); compile+check {time.time() - t0:.0f}s")
            return
        except Exception as e:
            last = e
            log(f"  flex decode page {ps}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    raise last


def bench_decode_wide(copy_gbps, args, gen):
    """Decode of 256 requests x 1k context (issue 12 §3: >= 0.95 of copy): bench_decode's rows
    at that shape."""
    saved = dict(SZ)
    SZ.update(dec_B=SZ["wide_B"], dec_L=SZ["wide_L"])
    try:
        bench_decode(copy_gbps, args, gen)
    finally:
        SZ.clear()
        SZ.update(saved)


SPLIT_SWEEP = [32, 48, 64, 66, 96, 128, 132, 264]
SPLIT_SWEEP_SHORT = [2, 4, 8, 12, 16, 24, 32, 48, 64, 128]  # (a context under 16k: e.g. the 8B batch-1 step's 2k)


def bench_decode_long(copy_gbps, args, gen):
    dev = DEV
    B, L, Hq, Hkv, D, dt = 1, SZ["long_L"], SZ["Hq"], SZ["Hkv"], SZ["D"], torch.bfloat16
    shape = f"B={B} ctx={L} Hq={Hq} Hkv={Hkv} D={D}"
    R = SZ["rot_long"]
    S = 2 * L                                  # each pool twice the request; its pages scattered over it
    kcs = [torch.randn(S, Hkv, D, device=dev, dtype=dt) for _ in range(R)]
    vcs = [torch.randn(S, Hkv, D, device=dev, dtype=dt) for _ in range(R)]
    qs = [torch.randn(B, Hq, D, device=dev, dtype=dt) for _ in range(R)]
    sl = torch.full((B,), L, dtype=torch.int32, device=dev)
    ps = 16
    pt = torch.randperm(S // ps, generator=gen)[: L // ps].to(torch.int32).view(1, -1).to(dev)
    nbytes = 2 * L * Hkv * D * dt.itemsize + 2 * qs[0].numel() * dt.itemsize + (L // ps) * 4
    ref = decode_attention_ref(qs[0], kcs[0], vcs[0], pt, sl, ps)

    def fns_for(**kw):
        return [lambda i=i: decode_attention(qs[i], kcs[i], vcs[i], pt, sl, ps, **kw) for i in range(R)]
    if args.sweep:
        short = L < 16384
        cfgs = [dict(BLOCK_N=bn, num_warps=w, num_stages=st, FUSED_MERGE=0)
                for bn, w, st in itertools.product([16, 32, 64, 128] if short else [32, 64, 128],
                                                   [2, 4, 8] if short else [4, 8],
                                                   [1, 2, 3] if short else [2, 3, 4, 5])]
        cfgs += [dict(BLOCK_N=bn, num_warps=4, num_stages=3, FUSED_MERGE=1, MERGE_CHUNK=mc)
                 for bn, mc in itertools.product([32, 64], [4, 16])]
        for cfg in cfgs:
            for ns in SPLIT_SWEEP if L >= 16384 else [s for s in SPLIT_SWEEP_SHORT if s * cfg["BLOCK_N"] <= L]:
                try:
                    ms = bench_rot(fns_for(num_splits=ns, config=cfg), rep=100)
                except Exception as e:  # e.g. out of shared memory for this tile
                    log(f"    sweep {cfg} splits={ns}: {type(e).__name__} {str(e)[:100]}")
                    break
                SWEEP.append(dict(device=DEVICE, kernel=f"decode_b1_{L // 1024}k_p16", config=cfg_str(cfg), splits=ns,
                                  median_ms=ms, gbps=nbytes / ms / 1e6))
    rows = []
    fused_default = int(dmod.DECODE_CONFIG.get("FUSED_MERGE", 0))
    for ns, extra, tag in ((None, {}, ""), (None, {}, " (no PDL)"), (None, {}, " (PDL early)"),
                           (None, dict(FUSED_MERGE=1 - fused_default),
                            "-fusedmerge" if not fused_default else "-mergekernel"),
                           (1, {}, "-nosplit")):
        ok, msg = compare(decode_attention(qs[0], kcs[0], vcs[0], pt, sl, ps, num_splits=ns, config=extra), ref)
        with pdl_mode(dict((t, m) for m, t in PDL_AB).get(tag)):
            ms = bench_rot(fns_for(num_splits=ns, config=extra))
        gbps = nbytes / ms / 1e6
        splits = dmod.choose_num_splits(B, Hkv, L, dev) if ns is None else ns
        rows.append(add_row(kernel="decode", impl="triton" + tag, shape=shape, dtype="bf16", page_size=ps,
                            config=cfg_str(dict(dmod.DECODE_CONFIG, **extra)) + f";splits={splits}",
                            median_ms=fmt(ms, 4), gbps=fmt(gbps, 1), ratio_to_copy=fmt(gbps / copy_gbps),
                            correct="ok" if ok else "FAIL", note=msg if not ok else ""))
    kcs_c = [gather_contig(kcs[i], pt, ps, L) for i in range(R)]
    vcs_c = [gather_contig(vcs[i], pt, ps, L) for i in range(R)]
    # what this size allows (issue 12 §3's 0.80 of a 2 GiB copy): the same K/V bytes, contiguous,
    # read by a torch reduction and copied by copy_ (bytes read + written), cold as the rows above
    kv_bytes = 2 * L * Hkv * D * dt.itemsize
    dk, dv = torch.empty_like(kcs_c[0]), torch.empty_like(vcs_c[0])
    for impl, fn, by in (("torch-sum", lambda i: (kcs_c[i].sum(dtype=torch.float32), vcs_c[i].sum(dtype=torch.float32)),
                          kv_bytes),
                         ("torch-copy_", lambda i: (dk.copy_(kcs_c[i]), dv.copy_(vcs_c[i])), 2 * kv_bytes)):
        ms = bench_rot([lambda i=i: fn(i) for i in range(R)])
        add_row(kernel="read-same-bytes", impl=impl, shape=shape, dtype="bf16", page_size="contiguous",
                median_ms=fmt(ms, 4), gbps=fmt(by / ms / 1e6, 1), ratio_to_copy=fmt(by / ms / 1e6 / copy_gbps))
    del dk, dv
    variants = [sdpa_variants(qs[i][:, :, None, :], kcs_c[i], vcs_c[i], causal=False) for i in range(R)]
    sd = {}
    for name in variants[0]:
        ok, msg = compare(variants[0][name]()[:, :, 0], ref)
        ms = bench_rot([v[name] for v in variants if name in v])
        by = nbytes * (Hq // Hkv if name.endswith("expanded") else 1)
        sd[name] = ms
        add_row(kernel="decode", impl=f"torch-sdpa-{name}", shape=shape, dtype="bf16", page_size="contiguous",
                median_ms=fmt(ms, 4), gbps=fmt(by / ms / 1e6, 1), ratio_to_copy=fmt(by / ms / 1e6 / copy_gbps),
                correct="ok" if ok else "FAIL")
    if sd:
        for r in rows:
            r["vs_sdpa"] = fmt(min(sd.values()) / float(r["median_ms"]))
    del kcs, vcs, kcs_c, vcs_c, variants
    _empty_cache()


# --------------------------------------------------------------------------------- extend / prefill
def attn_flops(new_lens, prefix_lens, Hq, D):
    """Causal FLOPs: 4 * D * Hq * (number of visible (query, key) pairs)."""
    pairs = sum(n * p + n * (n + 1) // 2 for n, p in zip(new_lens, prefix_lens))
    return 4.0 * D * Hq * pairs


def bench_extend(copy_gbps, args, gen):
    dev = DEV
    Hq, Hkv, D, dt, ps = SZ["Hq"], SZ["Hkv"], SZ["D"], torch.bfloat16, 16
    cases = [("prefill", SZ["pre_T"], 0), ("extend", SZ["ext_new"], SZ["ext_prefix"])]
    for name, n_new, prefix in cases:
        L = n_new + prefix
        shape = f"new={n_new} prefix={prefix} Hq={Hq} Hkv={Hkv} D={D}"
        S = 4 * L
        k_cache = torch.randn(S, Hkv, D, device=dev, dtype=dt)
        v_cache = torch.randn(S, Hkv, D, device=dev, dtype=dt)
        pt = torch.randperm(S // ps, generator=gen)[: L // ps].to(torch.int32).view(1, -1).to(dev)
        q = torch.randn(n_new, Hq, D, device=dev, dtype=dt)
        qsl = torch.tensor([0, n_new], dtype=torch.int32, device=dev)
        sl = torch.tensor([L], dtype=torch.int32, device=dev)
        flops = attn_flops([n_new], [prefix], Hq, D)
        # SDPA on contiguous K/V: q [1, Hq, n_new, D], k/v [1, Hkv, L, D]
        kc = gather_contig(k_cache, pt, ps, L)
        vc = gather_contig(v_cache, pt, ps, L)
        q4 = q.transpose(0, 1)[None]
        if prefix == 0:
            sd_fns = sdpa_variants(q4, kc, vc, causal=True)
            ref_fn = next(iter(sd_fns.values()), None)
        else:
            # causal with an offset: explicit boolean mask (SDPA's is_causal aligns top-left)
            mask = (torch.arange(L, device=dev)[None, :] <= (prefix + torch.arange(n_new, device=dev))[:, None])
            F = torch.nn.functional
            kx, vx = kc.repeat_interleave(Hq // Hkv, 1), vc.repeat_interleave(Hq // Hkv, 1)
            sd_fns = {"masked/expanded": lambda: F.scaled_dot_product_attention(q4, kx, vx, attn_mask=mask)}
            ref_fn = sd_fns["masked/expanded"]
        ref = ref_fn()[0].transpose(0, 1) if ref_fn else None

        # the model's layout: q, k, v are strided views of one fused projection output, and the
        # new tokens' K/V (already in the cache) are also read from there ("ragged")
        pos = torch.arange(L, device=dev)
        new_slots = (pt[0, pos // ps].long() * ps + pos % ps)[prefix:]
        qkv = torch.cat([q.reshape(n_new, -1), k_cache[new_slots].reshape(n_new, -1),
                         v_cache[new_slots].reshape(n_new, -1)], dim=1)
        qf, kn, vn = qkv.view(n_new, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=1)
        pt_c = (torch.arange(L // ps, dtype=torch.int32, device=dev) + 7)[None]
        kcc = torch.empty_like(k_cache)
        vcc = torch.empty_like(v_cache)
        kcc[7 * ps + pos] = k_cache[pt[0, pos // ps].long() * ps + pos % ps]
        vcc[7 * ps + pos] = v_cache[pt[0, pos // ps].long() * ps + pos % ps]
        if args.sweep_extend:
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                                 (128, 128, 8, 4), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                                 (128, 128, 4, 2), (64, 64, 4, 4), (256, 64, 8, 3), (256, 128, 8, 2)]:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                try:
                    fn = lambda: extend_attention(qf, k_cache, v_cache, pt, qsl, sl, ps, config=cfg,
                                                  k_new=kn, v_new=vn)
                    o = fn()
                    ok, _ = compare(o, ref) if ref is not None else (True, "")
                    ms = bench(fn, rep=100)
                except Exception as e:
                    log(f"    sweep {name} {cfg}: {type(e).__name__} {str(e)[:100]}")
                    continue
                SWEEP.append(dict(device=DEVICE, kernel=f"{name}_{n_new}_{prefix}", config=cfg_str(cfg), splits="",
                                  median_ms=ms, tflops=flops / ms / 1e9, correct=ok))
        variants = [  # (impl, fn, config used)
            ("triton", lambda: extend_attention(q, k_cache, v_cache, pt, qsl, sl, ps), emod.extend_config(D)),
            ("triton-slab", lambda: extend_attention(q, kcc, vcc, pt_c, qsl, sl, ps, contiguous=True),
             emod.extend_config(D)),
            ("triton-ragged", lambda: extend_attention(qf, k_cache, v_cache, pt, qsl, sl, ps, k_new=kn, v_new=vn),
             emod.extend_config(D, ragged=True)),
            ("triton-ragged-slab", lambda: extend_attention(qf, kcc, vcc, pt_c, qsl, sl, ps, contiguous=True,
                                                            k_new=kn, v_new=vn), emod.extend_config(D, ragged=True)),
        ]
        for impl, fn, cfg in variants:
            o = fn()
            ok, msg = compare(o, ref) if ref is not None else (True, "no reference")
            ms = bench_rot([fn])
            tf = flops / ms / 1e9
            add_row(kernel=name, impl=impl, shape=shape, dtype="bf16",
                    page_size=ps, config=cfg_str(cfg), median_ms=fmt(ms, 4), tflops=fmt(tf, 1),
                    correct="ok (vs sdpa)" if ok else "FAIL", note=msg if not ok else "")
        tri_rows = ROWS[-len(variants):]
        sd = {}
        for sname, fn in sd_fns.items():
            ms = bench_rot([fn])
            sd[sname] = ms
            add_row(kernel=name, impl=f"torch-sdpa-{sname}", shape=shape, dtype="bf16", page_size="contiguous",
                    median_ms=fmt(ms, 4), tflops=fmt(flops / ms / 1e9, 1))
        if sd:
            best = min(sd.values())
            for r in tri_rows:
                r["vs_sdpa"] = fmt(best / float(r["median_ms"]))
        del k_cache, v_cache, kc, vc, sd_fns, kcc, vcc, qkv
        _empty_cache()


# --------------------------------------------------------------------------------- kv write / page copy
def bench_kv_write(copy_gbps, args, gen):
    dev = DEV
    T, H, D, dt, ps = SZ["kvw_T"], SZ["Hkv"], SZ["D"], torch.bfloat16, 16
    shape = f"T={T} Hkv={H} D={D}"
    S = SZ["kvw_S"]                                                 # a 512 MiB-per-K pool
    R = SZ["rot_kvw"]                                               # chunks rotated (each 64 MiB of traffic)
    k_cache = torch.randn(S, H, D, device=dev, dtype=dt)
    v_cache = torch.randn(S, H, D, device=dev, dtype=dt)
    pages = torch.randperm(S // ps, generator=gen)[: R * T // ps].view(R, T // ps)
    slots = [(pages[i][:, None] * ps + torch.arange(ps)[None]).reshape(-1).to(dev) for i in range(R)]  # int64 [T]
    ks = [torch.randn(T, H, D, device=dev, dtype=dt) for _ in range(R)]
    vs = [torch.randn(T, H, D, device=dev, dtype=dt) for _ in range(R)]
    nbytes = 4 * T * H * D * dt.itemsize + T * 8

    def fns_for(**kw):
        return [lambda i=i: kv_write(ks[i], vs[i], k_cache, v_cache, slots[i], **kw) for i in range(R)]
    if args.sweep:
        for bt, w in itertools.product([1, 2, 4, 8, 16], [1, 2, 4, 8]):
            cfg = dict(BLOCK_T=bt, num_warps=w)
            ms = bench_rot(fns_for(config=cfg), rep=100)
            SWEEP.append(dict(device=DEVICE, kernel="kv_write_8k", config=cfg_str(cfg), splits="", median_ms=ms,
                              gbps=nbytes / ms / 1e6))
    kr, vr = k_cache.clone(), v_cache.clone()
    kv_write(ks[0], vs[0], k_cache, v_cache, slots[0])
    kv_write_ref(ks[0], vs[0], kr, vr, slots[0])
    ok = torch.equal(k_cache, kr) and torch.equal(v_cache, vr)
    del kr, vr
    from kvbench.kernels import kv_write as kwmod
    ref_fns = [lambda i=i: kv_write_ref(ks[i], vs[i], k_cache, v_cache, slots[i]) for i in range(R)]
    # the same traffic as a plain copy: what a 64 MiB transfer can reach on this device
    srcs = [torch.randn(2 * T * H * D, device=dev, dtype=dt) for _ in range(R)]
    dsts = [torch.empty_like(x) for x in srcs]
    copy_fns = [lambda i=i: dsts[i].copy_(srcs[i]) for i in range(R)]
    for impl, fns in [("triton", fns_for()), ("torch-index_put", ref_fns), ("torch-copy_ same bytes", copy_fns)]:
        ms = bench_rot(fns, rep=400)
        gbps = nbytes / ms / 1e6
        add_row(kernel="kv_write", impl=impl, shape=shape, dtype="bf16", page_size=ps if impl != "torch-copy_ same bytes" else "",
                config=cfg_str(kwmod.KV_WRITE_CONFIG) if impl == "triton" else "", median_ms=fmt(ms, 4),
                gbps=fmt(gbps, 1), ratio_to_copy=fmt(gbps / copy_gbps),
                correct=("ok" if ok else "FAIL") if impl == "triton" else "",
                note="contiguous 64 MiB copy: size ceiling" if impl.startswith("torch-copy") else "")
    del srcs, dsts
    for mode, tag in PDL_AB[1:]:
        with pdl_mode(mode):
            ms = bench_rot(fns_for(), rep=400)
        add_row(kernel="kv_write", impl="triton" + tag, shape=shape, dtype="bf16", page_size=ps,
                config=cfg_str(kwmod.KV_WRITE_CONFIG), median_ms=fmt(ms, 4), gbps=fmt(nbytes / ms / 1e6, 1),
                ratio_to_copy=fmt(nbytes / ms / 1e6 / copy_gbps))
    best = dict(BLOCK_T=1, num_warps=1)  # the sweep's best on an H200, beside the default
    ms = bench_rot(fns_for(config=best), rep=400)
    add_row(kernel="kv_write", impl="triton (config variant)", shape=shape, dtype="bf16", page_size=ps,
            config=cfg_str(dict(kwmod.KV_WRITE_CONFIG, **best)), median_ms=fmt(ms, 4),
            gbps=fmt(nbytes / ms / 1e6, 1), ratio_to_copy=fmt(nbytes / ms / 1e6 / copy_gbps))
    # the same write into consecutive slots: what the scattered pages cost
    seq = [torch.arange(i * T, (i + 1) * T, device=dev) for i in range(R)]
    ms = bench_rot([lambda i=i: kv_write(ks[i], vs[i], k_cache, v_cache, seq[i]) for i in range(R)], rep=400)
    add_row(kernel="kv_write", impl="triton (consecutive slots)", shape=shape, dtype="bf16", page_size=ps,
            config=cfg_str(kwmod.KV_WRITE_CONFIG), median_ms=fmt(ms, 4), gbps=fmt(nbytes / ms / 1e6, 1),
            ratio_to_copy=fmt(nbytes / ms / 1e6 / copy_gbps), note="slots in order, not scattered pages")
    # decode-style write: one token per request, B=64
    slots64 = slots[0][:: T // 64][:64].contiguous()
    k1, v1 = ks[0][:64], vs[0][:64]
    ms = bench_rot([lambda: kv_write(k1, v1, k_cache, v_cache, slots64)], rep=200)
    add_row(kernel="kv_write", impl="triton", shape=f"T=64 (decode step) Hkv={H} D={D}", dtype="bf16", page_size=ps,
            median_ms=fmt(ms, 4), gbps=fmt(4 * 64 * H * D * 2 / ms / 1e6, 1), note="latency-bound size")
    # host-side cost of one launch (Python launcher + Triton dispatch), what eager engines pay
    for _ in range(10):
        kv_write(k1, v1, k_cache, v_cache, slots64)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t = time.perf_counter()
    for _ in range(200):
        kv_write(k1, v1, k_cache, v_cache, slots64)
    host_us = (time.perf_counter() - t) / 200 * 1e6
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    add_row(kernel="kv_write", impl="triton (host launch cost)", shape=f"T=64 Hkv={H} D={D}", dtype="bf16",
            note=f"host time per call {host_us:.1f} us (Python launcher + Triton dispatch)")
    del k_cache, v_cache
    _empty_cache()


def bench_linear(copy_gbps, args, gen):
    """Decode-size projections (M=1) of Llama-3.1-8B: weight bytes read per second, `linear` in
    each PDL mode against cuBLAS (F.linear), each shape rotated over enough weight copies to
    exceed L2."""
    import torch.nn.functional as F

    from kvbench.kernels import linear as lin
    from kvbench.kernels.silu_mul import silu_mul
    dev, dt, M = DEV, torch.bfloat16, 1
    H, I = SZ["lin_H"], SZ["lin_I"]
    for name, N, K in (("qkv", H * 3 // 2, H), ("o", H, H), ("gate_up", 2 * I, H), ("down", H, I)):
        R = max(2, -(-SZ["lin_rot_bytes"] // (N * K * 2)))
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(R)]
        xs = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(R)]
        nbytes = N * K * 2
        ok, msg = compare(lin.linear(xs[0], ws[0]), F.linear(xs[0].float(), ws[0].float()))
        shape = f"M={M} N={N} K={K}"
        glu = [] if name != "gate_up" else [   # SwiGLU's silu_mul: its own launch, or in the gate_up kernel
            ((None, " + silu_mul (2 launches)"), lambda i: silu_mul(lin.linear(xs[i], ws[i]))),
            ((None, ", silu_mul fused"), lambda i: lin.linear(xs[i], ws[i], silu_mul=True))]
        for (mode, tag), f in [*((m, lambda i: lin.linear(xs[i], ws[i])) for m in PDL_AB), *glu,
                               ((None, "cublas (F.linear)"), lambda i: F.linear(xs[i], ws[i]))]:
            with pdl_mode(mode):
                ms = bench_rot([lambda i=i, f=f: f(i) for i in range(R)], rep=200)
            gbps = nbytes / ms / 1e6
            impl = tag if tag.startswith("cublas") else "triton" + tag
            add_row(kernel=f"linear {name}", impl=impl, shape=shape, dtype="bf16", median_ms=fmt(ms, 4),
                    gbps=fmt(gbps, 1), ratio_to_copy=fmt(gbps / copy_gbps),
                    correct=("ok" if ok else "FAIL") if impl == "triton" else "", note=msg if not ok else "")
        del ws, xs
        _empty_cache()


def bench_page_copy(copy_gbps, args, gen):
    dev = DEV
    L, H, D, dt, ps = SZ["pc_L"], SZ["Hkv"], SZ["D"], torch.bfloat16, 16
    P = SZ["pc_P"]
    pool = torch.randn(L, 2, P * ps, H, D, device=dev, dtype=dt)     # 8 GiB
    perm = torch.randperm(P, generator=gen)
    n = SZ["pc_n"]
    src, dst = perm[:n].to(dev), perm[n:2 * n].to(dev)
    nbytes = 2 * L * 2 * n * ps * H * D * dt.itemsize
    fn = lambda: page_copy(pool, src, dst, ps)
    ms = bench_rot([fn])
    gbps = nbytes / ms / 1e6
    view = pool.view(L, 2, P, ps, H, D)
    ok = torch.equal(view[:, :, dst], view[:, :, src])
    add_row(kernel="page_copy", impl="triton", shape=f"{n} pages x {L} layers x K,V, Hkv={H} D={D}", dtype="bf16",
            page_size=ps, median_ms=fmt(ms, 4), gbps=fmt(gbps, 1), ratio_to_copy=fmt(gbps / copy_gbps),
            correct="ok" if ok else "FAIL")
    del pool, view
    _empty_cache()


# --------------------------------------------------------------------------------- output
def write_outputs(out_dir: pathlib.Path, figure: bool = True):
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = DEVICE.replace(" ", "_").replace("/", "_")
    path = out_dir / f"kernels_{tag}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(ROWS)
    log(f"wrote {path}")
    if SWEEP:
        sp = out_dir / f"sweep_{tag}.csv"
        keys = sorted({k for r in SWEEP for k in r})
        with open(sp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(SWEEP)
        log(f"wrote {sp}")
    if not figure:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        bw = [r for r in ROWS if r["ratio_to_copy"] not in ("", None)]
        fl = [r for r in ROWS if r["tflops"] not in ("", None)]
        fig, axes = plt.subplots(1, 2, figsize=(16, 7), gridspec_kw=dict(width_ratios=[2.2, 1]))
        lab = lambda r: f"{r['kernel']} {r['impl']} p={r['page_size']}\n{r['shape']}"
        ax = axes[0]
        ax.barh(range(len(bw)), [float(r["ratio_to_copy"]) for r in bw],
                color=["C0" if r["impl"].startswith("triton") else "C1" for r in bw])
        ax.set_yticks(range(len(bw)), [lab(r) for r in bw], fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(0.9, color="g", ls="--", lw=0.8)
        ax.invert_yaxis()
        ax.set_xlabel(f"achieved bandwidth / D2D copy bandwidth ({COPY_GBPS:.0f} GB/s)")
        ax = axes[1]
        ax.barh(range(len(fl)), [float(r["tflops"]) for r in fl],
                color=["C0" if r["impl"].startswith("triton") else "C1" for r in fl])
        ax.set_yticks(range(len(fl)), [lab(r) for r in fl], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("TFLOP/s (causal FLOPs)")
        fig.suptitle(f"kvbench kernels on {DEVICE}, {DATE} (blue: triton, orange: peers)")
        fig.tight_layout()
        png = out_dir / f"kernels_{tag}.png"
        fig.savefig(png, dpi=130)
        log(f"wrote {png}")
    except Exception as e:
        log(f"figure failed: {e}")


def print_table():
    cols = ["kernel", "impl", "shape", "page_size", "median_ms", "gbps", "tflops", "ratio_to_copy", "vs_sdpa", "correct"]
    log("\n" + " | ".join(cols))
    for r in ROWS:
        log(" | ".join(str(r[c]) for c in cols))


def main():
    global DEVICE, COPY_GBPS, DEV
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "results" / "kernels"))
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configs (slower)")
    ap.add_argument("--sweep-extend", action="store_true", help="also sweep extend/prefill configs (slow)")
    ap.add_argument("--skip-flex", action="store_true")
    ap.add_argument("--sweep-limit", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="comma list of: decode,wide,long,extend,kvwrite,linear,pagecopy")
    ap.add_argument("--long-ctx", type=int, default=None,
                    help="context of the batch-1 decode rows (`long`; default 32768): 2048 is the 8B batch-1 step's")
    ap.add_argument("--decode-ctx", type=int, default=None,
                    help="context of the batch-64 decode rows (`decode`; default 4096): 2048 is the 8B batch-64 step's")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script only")
    args = ap.parse_args()
    if args.decode_ctx is not None:
        if args.decode_ctx < 256 or args.decode_ctx % 256:
            ap.error(f"--decode-ctx must be a multiple of 256, got {args.decode_ctx}")
        SZ["dec_L"] = args.decode_ctx
    if args.long_ctx is not None:
        if args.long_ctx < 64:
            ap.error(f"--long-ctx must be >= 64, got {args.long_ctx}")
        SZ["long_L"] = args.long_ctx
    if SMOKE:
        DEV, DEVICE = torch.device("cpu"), "cpu-smoke"
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
        DEV, DEVICE = torch.device("cuda"), torch.cuda.get_device_name()
    log(f"device={DEVICE} torch={torch.__version__} triton={triton.__version__} date={DATE}")
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    ms, COPY_GBPS, nb = copy_bandwidth(SZ["copy_gib"])
    add_row(kernel="copy", impl="torch-copy_", shape=f"{nb / 2 ** 31:.2f} GiB buffer ({nb / 2 ** 30:.2f} GiB read+written)",
            dtype="bf16", median_ms=fmt(ms, 4), gbps=fmt(COPY_GBPS, 1), ratio_to_copy="1.000")
    only = set(args.only.split(",")) if args.only else {"decode", "wide", "long", "extend", "kvwrite", "linear",
                                                         "pagecopy"}
    steps = [("kvwrite", bench_kv_write), ("linear", bench_linear), ("decode", bench_decode),
             ("wide", bench_decode_wide), ("long", bench_decode_long),
             ("extend", bench_extend), ("pagecopy", bench_page_copy)]
    for name, fn in steps:
        if name not in only:
            continue
        log(f"== {name} ({time.time() - t0:.0f}s)")
        try:
            fn(COPY_GBPS, args, gen)
        except Exception:
            traceback.print_exc()
            add_row(kernel=name, impl="triton", note="benchmark failed: see log")
        _empty_cache()
        write_outputs(pathlib.Path(args.out), figure=False)   # partial results survive a timeout
    write_outputs(pathlib.Path(args.out))
    print_table()
    log(f"total {time.time() - t0:.0f}s")


DEVICE = "unknown"
DEV = None
COPY_GBPS = float("nan")

if __name__ == "__main__":
    main()
