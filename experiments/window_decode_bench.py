#!/usr/bin/env python3
"""Sliding-window / chunked decode on one GPU: does a window of 512 over a 32k context read only
the window's bytes? (issue 16). Optionally: the attention-bound kernels against their torch
references on the GPU, and short extend chunks over long cached prefixes (issue 12 §4).

    python3 experiments/window_decode_bench.py --out DIR            # decode rows (~1 min on an H200)
    python3 experiments/window_decode_bench.py --out DIR --check    # + window/chunk correctness on the GPU
    python3 experiments/window_decode_bench.py --out DIR --extend   # + 64/512-token extends over 1k/4k prefixes
    python3 experiments/window_decode_bench.py --out DIR --smoke    # tiny shapes on the CPU (checks the script)

Shape: Llama-3.1-8B attention (32 q heads, 8 KV heads, head dim 128), bf16, page 16, batch 1 and
32, context 32,768. Rows per batch: window 512, chunk 8,192, full attention at the same context,
and full attention over a 512-token context (what a window of 512 should cost). Method as
experiments/bench_kernels.py (its helpers are reused): a >= 2 GiB device copy measured first;
each row's time is the median of `do_bench` over CUDA-graph replays of R launcher calls, each on
its own page table and query (R sized so the R windows together exceed L2, so every byte is read
cold), divided by R. "bytes" = what the bound makes necessary: the visible keys' K and V, q and
o, and the page-table entries of those keys; GB/s = bytes / time, `frac_copy` = GB/s / copy GB/s.

Writes DIR/window_decode.csv (and DIR/window_check.csv with --check, DIR/extend_prefix.csv with
--extend) and prints a table. Exit 1 if a correctness check fails.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (sets TRITON_INTERPRET for --smoke, maps kvbench.kernels)

import torch  # noqa: E402
import triton  # noqa: E402

from kvbench.kernels import decode_attention as dmod  # noqa: E402
from kvbench.kernels import extend_attention as emod  # noqa: E402
from kvbench.kernels.decode_attention import (bounded_span, decode_attention, decode_attention_ref,  # noqa: E402
                                              key_lo_host)
from kvbench.kernels.extend_attention import extend_attention, extend_attention_ref  # noqa: E402
from kvbench.kernels.tolerances import compare  # noqa: E402
from kvbench.provenance import git_commit  # noqa: E402

SMOKE = bk.SMOKE
SZ = dict(L=32768, window=512, chunk=8192, batches=(1, 32), Hq=32, Hkv=8, D=128, ps=16, copy_gib=2.0,
          cold_bytes=256 << 20, max_rot=64, ext_cases=((64, 1024), (64, 4096), (512, 1024), (512, 4096)),
          ext_batches=(1, 8))
if SMOKE:
    SZ.update(L=256, window=40, chunk=96, batches=(1, 3), Hq=4, Hkv=2, D=32, copy_gib=0.01, cold_bytes=1 << 16,
              max_rot=2, ext_cases=((16, 64),), ext_batches=(1,))
FIELDS = ["device", "commit", "kernel", "batch", "context", "window", "chunk", "splits", "rotations", "bytes",
          "median_us", "gbps", "frac_copy", "x_window_ctx", "x_decode", "correct", "note"]


def needed_bytes(seq_lens, window, chunk, Hq, Hkv, D, ps, elt=2) -> int:
    """K+V of every visible key, q and o, and the page-table entries covering those keys."""
    kv = pages = 0
    for n in seq_lens:
        lo = key_lo_host(n - 1, window, chunk)
        kv += (n - lo) * 2 * Hkv * D * elt
        pages += (n - 1) // ps - lo // ps + 1
    return kv + 2 * len(seq_lens) * Hq * D * elt + 4 * pages


def decode_rows(B, copy_gbps, gen, dev, out_rows):
    """One batch size: window, chunk, full at the same context, full over a window-sized context."""
    L, W, C, Hq, Hkv, D, ps = SZ["L"], SZ["window"], SZ["chunk"], SZ["Hq"], SZ["Hkv"], SZ["D"], SZ["ps"]
    dt = torch.bfloat16
    P = L // ps
    num_pages = B * P
    kc = torch.randn(num_pages * ps, Hkv, D, device=dev, dtype=dt)
    vc = torch.randn(num_pages * ps, Hkv, D, device=dev, dtype=dt)
    cases = [("window", L, W, 0), ("chunk", L, 0, C), ("full", L, 0, 0), ("full@window_ctx", W, 0, 0)]
    base_us = None
    for name, ctx, window, chunk in cases:
        nbytes = needed_bytes([ctx] * B, window, chunk, Hq, Hkv, D, ps)
        R = int(max(2, min(SZ["max_rot"], math.ceil(SZ["cold_bytes"] / nbytes))))
        # R page tables, each a random permutation of the whole pool: the R windows land on
        # different pages (R x window bytes > L2: cold reads); q per rotation
        cp = -(-ctx // ps)
        tables = [torch.randperm(num_pages, generator=gen)[: B * cp].view(B, cp).to(torch.int32).to(dev)
                  for _ in range(R)]
        qs = [torch.randn(B, Hq, D, generator=gen).to(dev, dt) for _ in range(R)]
        sl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        outs = [torch.empty(B, Hq, D, device=dev, dtype=dt) for _ in range(R)]
        kw = dict(window=window, chunk=chunk, max_seq_len=ctx)
        fns = [lambda i=i: decode_attention(qs[i], kc, vc, tables[i], sl, ps, out=outs[i], **kw) for i in range(R)]
        o = decode_attention(qs[0], kc, vc, tables[0], sl, ps, **kw)
        ok, msg = compare(o, decode_attention_ref(qs[0], kc, vc, tables[0], sl, ps, window=window, chunk=chunk))
        ms = bk.bench_rot(fns)
        us = ms * 1e3
        gbps = nbytes / ms / 1e6
        span = bounded_span(ctx, window, chunk)          # the launcher's split count, after its rounding
        bn = dmod.DECODE_CONFIG["BLOCK_N"]
        splits = -(-span // (-(-(-(-span // dmod.choose_num_splits(B, Hkv, span, dev))) // bn) * bn))
        if name == "full@window_ctx":
            base_us = us
        out_rows.append(dict(kernel=f"decode-{name}", batch=B, context=ctx, window=window, chunk=chunk,
                             splits=splits, rotations=R, bytes=nbytes, median_us=round(us, 2), gbps=round(gbps, 1),
                             frac_copy=round(gbps / copy_gbps, 3), correct="ok" if ok else "FAIL",
                             note="" if ok else msg))
        bk.log("  " + " ".join(f"{k}={v}" for k, v in out_rows[-1].items() if v != ""))
        del tables, qs, outs, fns
    for r in out_rows:
        if r.get("batch") == B and base_us:
            r["x_window_ctx"] = round(r["median_us"] / base_us, 2)
    del kc, vc
    bk._empty_cache()


# ---------------------------------------------------------------------------------------- --check
def _poisoned_cache(seq_lens, first_visible, ps, Hkv, D, dev, gen, contiguous=False):
    """A pool holding every request's keys, NaN before each request's first visible key and in
    every unused slot; page tables as kv_testlib's (paged: a random permutation; slab: runs)."""
    B = len(seq_lens)
    P = -(-max(seq_lens) // ps)
    num_pages = B * P + 1
    kc = torch.full((num_pages * ps, Hkv, D), float("nan"), dtype=torch.bfloat16)
    vc = torch.full_like(kc, float("nan"))
    if contiguous:
        pt = (torch.randperm(B, generator=gen)[:, None] * P + torch.arange(P)[None, :]).to(torch.int32)
    else:
        pt = torch.randperm(num_pages - 1, generator=gen)[: B * P].view(B, P).to(torch.int32)
    for b, (n, lo) in enumerate(zip(seq_lens, first_visible)):
        pos = torch.arange(lo, n)
        s = pt[b, pos // ps].long() * ps + pos % ps
        kc[s] = torch.randn(len(pos), Hkv, D, generator=gen).to(kc.dtype)
        vc[s] = torch.randn(len(pos), Hkv, D, generator=gen).to(vc.dtype)
    return kc.to(dev), vc.to(dev), pt.to(dev)


def check_rows(dev, gen, out_rows) -> bool:
    """Window / chunk decode and extend against the references on this device, bf16 tolerances,
    every key outside the bound NaN (a kernel that reads one fails)."""
    Hq, Hkv, D = (32, 8, 128) if not SMOKE else (4, 2, 32)
    big = not SMOKE
    lens = [4096, 1000, 513, 17, 512, 4095] if big else [90, 33, 1]
    all_ok = True
    for ps, contiguous in ((16, False), (1, False), (16, True)):
        for window, chunk in ((512, 0), (100, 0), (4096, 0), (0, 1024), (0, 0)) if big else ((20, 0), (0, 32)):
            for num_splits in (None, 1, 7):
                first = [key_lo_host(n - 1, window, chunk) for n in lens]
                kc, vc, pt = _poisoned_cache(lens, first, ps, Hkv, D, dev, gen, contiguous)
                q = torch.randn(len(lens), Hq, D, generator=gen).to(dev, torch.bfloat16)
                sl = torch.tensor(lens, dtype=torch.int32, device=dev)
                o = decode_attention(q, kc, vc, pt, sl, ps, contiguous=contiguous, window=window, chunk=chunk,
                                     num_splits=num_splits)
                ok, msg = compare(o, decode_attention_ref(q, kc, vc, pt, sl, ps, contiguous=contiguous,
                                                          window=window, chunk=chunk))
                all_ok &= ok
                out_rows.append(dict(kernel="check-decode", case=f"ps={ps} contiguous={contiguous} splits={num_splits}",
                                     window=window, chunk=chunk, correct="ok" if ok else "FAIL", note=msg))
    new_lens, prefixes = ([64, 1, 300, 2048], [1024, 4095, 700, 0]) if big else ([20, 1], [40, 9])
    for ps, contiguous in ((16, False), (16, True)):
        for window, chunk in ((512, 0), (128, 0), (0, 1024), (0, 0)) if big else ((20, 0), (0, 32)):
            for ragged in (False, True):
                seq = [a + b for a, b in zip(new_lens, prefixes)]
                first = [key_lo_host(p, window, chunk) for p in prefixes]
                kc, vc, pt = _poisoned_cache(seq, first, ps, Hkv, D, dev, gen, contiguous)
                T = sum(new_lens)
                q = torch.randn(T, Hq, D, generator=gen).to(dev, torch.bfloat16)
                qsl = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
                sl = torch.tensor(seq, dtype=torch.int32, device=dev)
                kn = vn = None
                if ragged:
                    slots = torch.cat([(pt[b, torch.arange(p, p + n, device=dev) // ps].long() * ps
                                        + torch.arange(p, p + n, device=dev) % ps)
                                       for b, (n, p) in enumerate(zip(new_lens, prefixes))])
                    kn, vn = kc[slots].clone(), vc[slots].clone()
                ref = extend_attention_ref(q, kc, vc, pt, qsl, sl, ps, contiguous=contiguous, window=window,
                                           chunk=chunk)
                o = extend_attention(q, kc, vc, pt, qsl, sl, ps, contiguous=contiguous, window=window, chunk=chunk,
                                     k_new=kn, v_new=vn)
                ok, msg = compare(o, ref)
                all_ok &= ok
                out_rows.append(dict(kernel="check-extend", case=f"ps={ps} contiguous={contiguous} ragged={ragged}",
                                     window=window, chunk=chunk, correct="ok" if ok else "FAIL", note=msg))
    for r in out_rows:
        bk.log("  " + " ".join(f"{k}={v}" for k, v in r.items()))
    return all_ok


# ---------------------------------------------------------------------------------------- --extend
def parse_config(text: str) -> dict:
    """'64x32w4s2' -> dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2); '' -> {} (the default);
    'division' -> the default with the page table walked by division (PAGE_LOG2=-1); 'tokens' -> a
    token's page id at a time (TILE_WALK=0; the default walks a tile's pages where the page allows)."""
    if not text or text == "default":
        return {}
    if text == "division":
        return {"PAGE_LOG2": -1}
    if text == "tokens":
        return {"TILE_WALK": 0}
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not m:
        print(f"window_decode_bench: error: bad --extend-configs entry {text!r} (want e.g. 64x32w4s2, default, division or tokens)", file=sys.stderr)
        sys.exit(2)
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), map(int, m.groups())))


def extend_rows(copy_gbps, gen, dev, out_rows, splits_modes, configs=("default",), head_dim=64, max_len=0,
                page="16"):
    """Issue 12 §4: a 64-token (and a 512-token) extend chunk per request over a 1k / 4k cached prefix, Llama-3.2-1B attention
    (32 q heads, 8 KV heads, head dim 64), the ragged path the model uses, against a decode step of
    the same batch over the same context. `splits_modes`: the extend kernel's prefix-split settings
    to time ("off" = no split, "auto" = the launcher's heuristic). `max_len`: the launch's
    max_seq_len (0: the context; a CUDA graph of a mixed step passes the model's length, which
    sizes the split count for it while the kernel spreads the actual prefix over the splits).
    `page`: the page size, its pages in a random order (a fragmented pool), or "<n>seq": in order
    (a fresh pool; "1seq": radix-1's slots as an empty pool hands them out)."""
    Hq, Hkv, D, dt = (32, 8, head_dim, torch.bfloat16) if not SMOKE else (4, 2, 32, torch.bfloat16)
    ps, in_order = int(page.removesuffix("seq")), page.endswith("seq")
    for B in SZ["ext_batches"]:
        for n_new, prefix in SZ["ext_cases"]:
            ctx = prefix + n_new
            bound = max(max_len, ctx)
            P = -(-ctx // ps)
            num_pages = B * P * 4
            kc = torch.randn(num_pages * ps, Hkv, D, device=dev, dtype=dt)
            vc = torch.randn(num_pages * ps, Hkv, D, device=dev, dtype=dt)
            R = 4
            tables = [(torch.arange(i * B * P, (i + 1) * B * P) if in_order else
                       torch.randperm(num_pages, generator=gen)[: B * P]).view(B, P).to(torch.int32).to(dev)
                      for i in range(R)]
            T = B * n_new
            qkv = [torch.randn(T, Hq + 2 * Hkv, D, generator=gen).to(dev, dt) for _ in range(R)]
            qsl = torch.arange(0, T + 1, n_new, dtype=torch.int32, device=dev)
            sl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            outs = [torch.empty(T, Hq, D, device=dev, dtype=dt) for _ in range(R)]
            nbytes = B * ctx * 2 * Hkv * D * dt.itemsize + 2 * T * Hq * D * dt.itemsize
            kn = [x[:, Hq:Hq + Hkv] for x in qkv]            # the ragged path: new K/V from the qkv output
            vn = [x[:, Hq + Hkv:] for x in qkv]
            pos = torch.arange(prefix, ctx, device=dev)
            slots = (tables[0][:, pos // ps].long() * ps + pos % ps).reshape(-1)   # rotation 0's new slots
            kc[slots], vc[slots] = kn[0], vn[0]                   # what kv_write would have stored
            ref = extend_attention_ref(qkv[0][:, :Hq], kc, vc, tables[0], qsl, sl, ps)
            for mode, cfg_text in ((m, c) for c in configs for m in splits_modes):
                kw = {"config": parse_config(cfg_text)} if cfg_text != "default" else {}
                if mode != "off":
                    kw["prefix_splits"] = None if mode == "auto" else int(mode)
                else:
                    kw["prefix_splits"] = 1
                try:
                    o = extend_attention(qkv[0][:, :Hq], kc, vc, tables[0], qsl, sl, ps, k_new=kn[0], v_new=vn[0],
                                         max_seq_len=bound, **kw)
                except TypeError:   # a checkout without prefix splits: only "off" exists
                    kw.pop("prefix_splits")
                    if mode != "off":
                        continue
                    o = extend_attention(qkv[0][:, :Hq], kc, vc, tables[0], qsl, sl, ps, k_new=kn[0], v_new=vn[0], **kw)
                ok, msg = compare(o, ref)
                extra = dict(max_seq_len=bound) if "prefix_splits" in kw else {}
                fns = [lambda i=i: extend_attention(qkv[i][:, :Hq], kc, vc, tables[i], qsl, sl, ps, k_new=kn[i],
                                                    v_new=vn[i], out=outs[i], **kw, **extra) for i in range(R)]
                ms = bk.bench_rot(fns)
                used = splits_used(T, B, Hq, D, bound, kw.get("prefix_splits", 1), dev, kw.get("config"))
                out_rows.append(dict(kernel=f"extend{n_new}-prefix-split-{mode}", batch=B, context=ctx, splits=used,
                                     max_seq_len=bound, page=page,
                                     config=cfg_text, head_dim=D,
                                     rotations=R, bytes=nbytes, median_us=round(ms * 1e3, 2),
                                     gbps=round(nbytes / ms / 1e6, 1), frac_copy=round(nbytes / ms / 1e6 / copy_gbps, 3),
                                     correct="ok" if ok else "FAIL", note="" if ok else msg))
                bk.log("  " + " ".join(f"{k}={v}" for k, v in out_rows[-1].items() if v != ""))
            # a decode step of the same batch at the same context (the yardstick)
            q1 = [qkv[i][:B, :Hq].contiguous() for i in range(R)]
            o1 = [torch.empty(B, Hq, D, device=dev, dtype=dt) for _ in range(R)]
            fns = [lambda i=i: decode_attention(q1[i], kc, vc, tables[i], sl, ps, out=o1[i], max_seq_len=ctx)
                   for i in range(R)]
            ms = bk.bench_rot(fns)
            dbytes = B * ctx * 2 * Hkv * D * dt.itemsize
            out_rows.append(dict(kernel="decode-same-context", batch=B, context=ctx, page=page, rotations=R, bytes=dbytes,
                                 median_us=round(ms * 1e3, 2), gbps=round(dbytes / ms / 1e6, 1),
                                 frac_copy=round(dbytes / ms / 1e6 / copy_gbps, 3)))
            bk.log("  " + " ".join(f"{k}={v}" for k, v in out_rows[-1].items() if v != ""))
            for r in out_rows:   # extend time over the decode's of the same batch and context
                if r["kernel"].startswith(f"extend{n_new}-") and r.get("batch") == B and r.get("context") == ctx \
                        and r.get("page") == page:
                    r["x_decode"] = round(r["median_us"] / out_rows[-1]["median_us"], 2)
            del kc, vc, tables, qkv, outs
            bk._empty_cache()


def splits_used(T, B, Hq, D, max_len, prefix_splits, dev, config=None) -> int:
    """The prefix split count the extend launcher picks (as its code: heuristic, then the cap), with
    the launch overrides `config` (their BLOCK_M sizes the heuristic's program count)."""
    cfg = emod.extend_config(D, ragged=True, config=config, short=emod.short_chunks(T, B, D))
    S = prefix_splits or emod.choose_prefix_splits(T, B, Hq, cfg["BLOCK_M"], max_len, dev)
    bn = cfg["BLOCK_N"]
    piece = -(-(emod.EXTEND_MIN_SPLIT_TOKENS if not prefix_splits else 1) // bn) * bn
    return min(S, -(-max_len // piece))


def write_csv(path: pathlib.Path, rows, device, rev, fields=None):
    if not rows:
        return
    fields = fields or FIELDS
    extra = [k for r in rows for k in r if k not in fields]
    fields = fields + sorted(set(extra), key=extra.index)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, device=device, commit=rev))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--check", action="store_true", help="window/chunk kernels against the references")
    ap.add_argument("--extend", action="store_true", help="64-token extend over 1k/4k prefixes (issue 12)")
    ap.add_argument("--extend-splits", default="off,auto",
                    help="comma list of the extend prefix-split settings to time: off, auto, or a count")
    ap.add_argument("--extend-configs", default="default",
                    help="comma list of extend launch configs to time, BLOCK_MxBLOCK_Nw<warps>s<stages> (e.g. "
                         "64x32w4s2), 'default', 'division' (the default walking pages by division) or 'tokens' (a token's page id at a "
                         "time, not a tile's)")
    ap.add_argument("--extend-cases", default="",
                    help="comma list of NEWxPREFIX extend cases (default: 64x1024,64x4096,512x1024,512x4096)")
    ap.add_argument("--extend-batches", default="", help="comma list of batch sizes for --extend (default 1,8)")
    ap.add_argument("--extend-head-dims", default="64", help="comma list of head dims for --extend (64: 1B, 128: 8B)")
    ap.add_argument("--extend-max-lens", default="0",
                    help="comma list of the extend launches' max_seq_len (0: the context; e.g. 16384 as a "
                         "mixed step's CUDA graph passes it)")
    ap.add_argument("--extend-pages", default="16",
                    help="comma list of the --extend rows' page sizes, pages in a random order; <n>seq: in order "
                         "(e.g. 16,1,1seq: paged, radix-1 fragmented, radix-1 from an empty pool)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode rows")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through the interpreter")
    args = ap.parse_args()
    for text in args.extend_configs.split(","):  # bad input: one line and exit 2, before any work
        parse_config(text)
    if not re.fullmatch(r"[1-9]\d*(seq)?(,[1-9]\d*(seq)?)*", args.extend_pages):
        print(f"window_decode_bench: error: --extend-pages wants page sizes (e.g. 16,1,1seq), got {args.extend_pages!r}",
              file=sys.stderr)
        sys.exit(2)
    if not re.fullmatch(r"\d+(,\d+)*", args.extend_max_lens):
        print(f"window_decode_bench: error: --extend-max-lens wants non-negative ints, got {args.extend_max_lens!r}",
              file=sys.stderr)
        sys.exit(2)
    if SMOKE:
        dev, device = torch.device("cpu"), "cpu-smoke"
    else:
        if not torch.cuda.is_available():
            print("window_decode_bench: needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        dev, device = torch.device("cuda"), torch.cuda.get_device_name()
    bk.DEV, bk.DEVICE = dev, device
    args.out.mkdir(parents=True, exist_ok=True)
    rev = git_commit() or "unknown"
    bk.log(f"device={device} commit={rev} torch={torch.__version__} triton={triton.__version__}")
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    ok = True
    if args.check:
        checks: list[dict] = []
        ok = check_rows(dev, gen, checks)
        write_csv(args.out / "window_check.csv", checks, device, rev,
                  ["device", "commit", "kernel", "case", "window", "chunk", "correct", "note"])
        bk.log(f"check: {'all ok' if ok else 'FAILED'} ({time.time() - t0:.0f}s)")
    ms, copy_gbps, nb = bk.copy_bandwidth(SZ["copy_gib"])
    rows = [dict(kernel="copy", bytes=nb, median_us=round(ms * 1e3, 2), gbps=round(copy_gbps, 1), frac_copy=1.0,
                 note=f"torch copy_ of a {nb / 2 ** 31:.2f} GiB bf16 buffer (bytes read + written)")]
    bk.log(f"copy: {copy_gbps:.1f} GB/s")
    if not args.no_decode:
        for B in SZ["batches"]:
            decode_rows(B, copy_gbps, gen, dev, rows)
            write_csv(args.out / "window_decode.csv", rows, device, rev)
    if args.extend:
        ext: list[dict] = [dict(rows[0])]
        if args.extend_cases and not SMOKE:
            SZ["ext_cases"] = tuple(tuple(map(int, c.split("x"))) for c in args.extend_cases.split(","))
        if args.extend_batches and not SMOKE:
            SZ["ext_batches"] = tuple(map(int, args.extend_batches.split(",")))
        for d in map(int, args.extend_head_dims.split(",")):
            for ml, page in itertools.product(map(int, args.extend_max_lens.split(",")),  # (checked above)
                                              args.extend_pages.split(",")):
                extend_rows(copy_gbps, gen, dev, ext, args.extend_splits.split(","), args.extend_configs.split(","), d,
                            max_len=ml, page=page)
        write_csv(args.out / "extend_prefix.csv", ext, device, rev)
        rows += ext[1:]
    write_csv(args.out / "window_decode.csv", rows, device, rev)
    bk.log(f"\n{'kernel':34s} {'B':>3s} {'ctx':>6s} {'page':>5s} {'win':>5s} {'chunk':>5s} {'splits':>6s} {'MB':>8s} "
           f"{'us':>9s} {'GB/s':>8s} {'/copy':>6s} {'x win ctx':>9s} {'x decode':>8s} ok")
    for r in rows:
        bk.log(f"{r['kernel']:34s} {r.get('batch', ''):>3} {r.get('context', ''):>6} {r.get('page', ''):>5} "
               f"{r.get('window', ''):>5} "
               f"{r.get('chunk', ''):>5} {r.get('splits', ''):>6} {r.get('bytes', 0) / 1e6:8.2f} {r['median_us']:9.2f} "
               f"{r['gbps']:8.1f} {r['frac_copy']:6.3f} {r.get('x_window_ctx', ''):>9} {r.get('x_decode', ''):>8} "
               f"{r.get('correct', '')}")
    bk.log(f"total {time.time() - t0:.0f}s; wrote {args.out}")
    ok &= all(r.get("correct", "ok") == "ok" for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
