#!/usr/bin/env python3
"""Decode 1 x 32k (issue 12 §3, 0.80 of copy): where does the time beyond the bytes go? Each
config's CUDA graph of 6 calls on rotated inputs (as `decode_long_balance.py` and `bench_kernels`
time the 32k row) is replayed under torch.profiler after an L2 flush; per call, the split kernel,
the merge kernel and the idle time between kernels, from CUPTI's kernel records; beside it the
whole replay timed by do_bench (as those scripts do) and a device copy measured just before.

    PYTHONPATH=. python3 experiments/decode_long_profile.py --out results/kernels/decode_long_profile.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (experiments/bench_kernels.py: copy_bandwidth, kernel_records, sdpa_variants)
from decode_long_balance import long_case  # noqa: E402  (the 1 x 32k inputs)
from gpu_record import git_commit  # noqa: E402  (experiments/gpu_record.py)
from kvbench.kernels.decode_attention import DECODE_CONFIG, decode_attention, decode_attention_ref  # noqa: E402
from kvbench.kernels.tolerances import compare  # noqa: E402

CONFIGS = [  # (label, decode_attention kwargs)
    ("default (BN64 w4 s2, auto splits)", {}),
    ("BN32 w4 s3, 66 splits", dict(num_splits=66, config=dict(BLOCK_N=32, num_warps=4, num_stages=3, FUSED_MERGE=0,
                                                                PIECE_ALIGN=16))),
    ("default, walk by division (p16)", dict(config=dict(BLOCK_N=64, num_warps=4, num_stages=2, FUSED_MERGE=0,
                                                           PAGE_LOG2=-1))),
    ("BN64 w4 s2, 64 splits, fused merge", dict(num_splits=64, config=dict(BLOCK_N=64, num_warps=4, num_stages=2,
                                                                             FUSED_MERGE=1))),
]


def graph_of(fns):
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    return g


def kernel_records(g, flush, replays: int) -> list[list[dict]]:
    """Per replay (after a flush), the graph's kernel records {name, ts, dur} (µs), in order."""
    acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(replays):
            flush()
            torch.cuda.synchronize()
            g.replay()
            torch.cuda.synchronize()
    out, cur = [], None
    for e in bk.kernel_records(prof):
        if "fill" in e["name"].lower() or "zero" in e["name"].lower():  # the flush: a new replay follows
            cur = []
            out.append(cur)
        elif cur is not None:
            cur.append(dict(name=e["name"], ts=float(e["ts"]), dur=float(e["dur"])))
    return [r for r in out if r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--replays", type=int, default=30)
    args = ap.parse_args()
    if args.replays < 1:
        print(f"decode_long_profile: error: --replays must be >= 1, got {args.replays}", file=sys.stderr)
        sys.exit(2)
    bk.DEV = dev = torch.device("cuda")
    c = long_case()
    L, ps, S, R, gen, kcs, vcs, qs, sl, pt, nbytes, kc, vc = (c.L, c.ps, c.S, c.R, c.gen, c.kcs, c.vcs, c.qs, c.sl,
                                                              c.pt, c.nbytes, c.kc, c.vc)
    outs = [torch.empty_like(q) for q in qs]
    cudnn = [bk.sdpa_variants(qs[i][:, :, None, :], kc[i], vc[i], causal=False).get("cudnn/native") for i in range(R)]
    cache = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    _, copy, _ = bk.copy_bandwidth(2.0)
    cases = [(label, [lambda i=i, kw=kw: decode_attention(qs[i], kcs[i], vcs[i], pt, sl, ps, out=outs[i], **kw)
                      for i in range(R)]) for label, kw in CONFIGS]
    # the same keys in a head-major pool ([H_kv, S, D] storage viewed as [S, H_kv, D]: a page's 16
    # keys of one head are 4 KiB in a row, as FlashInfer's HND layout, where the token-major pool
    # gives 256 B per token 2 KiB apart); the kernel is unchanged (it addresses by strides)
    khm = [kcs[i].transpose(0, 1).contiguous().transpose(0, 1) for i in range(R)]
    vhm = [vcs[i].transpose(0, 1).contiguous().transpose(0, 1) for i in range(R)]
    slab_pt = torch.zeros((1, L // ps), dtype=torch.int32, device=dev)
    ksl = [kc[i][0].transpose(0, 1) for i in range(R)]   # [L, H_kv, D] views of [H_kv, L, D]: slab, head-major
    vsl = [vc[i][0].transpose(0, 1) for i in range(R)]
    ktm = [kc[i][0].transpose(0, 1).contiguous() for i in range(R)]   # slab, token-major
    vtm = [vc[i][0].transpose(0, 1).contiguous() for i in range(R)]
    cases += [
        ("default, head-major pool (paged p16)",
         [lambda i=i: decode_attention(qs[i], khm[i], vhm[i], pt, sl, ps, out=outs[i]) for i in range(R)]),
        ("default, slab token-major",
         [lambda i=i: decode_attention(qs[i], ktm[i], vtm[i], slab_pt, sl, ps, contiguous=True, out=outs[i])
          for i in range(R)]),
        ("default, slab head-major",
         [lambda i=i: decode_attention(qs[i], ksl[i], vsl[i], slab_pt, sl, ps, contiguous=True, out=outs[i])
          for i in range(R)]),
    ]
    # the page-table walk: the same pool through tables of other page sizes and orders
    refs = {}
    for label, page, shuffled in (("p16, pages in order", 16, False), ("p256, shuffled", 256, True),
                                  ("one page of 32k (p32768)", L, False)):
        tab = (torch.randperm(S // page, generator=gen)[: L // page] if shuffled else torch.arange(L // page))
        tab = tab.to(torch.int32).view(1, -1).to(dev)
        refs[f"default, {label}"] = refs[f"walk by division, {label}"] = decode_attention_ref(
            qs[0], kcs[0], vcs[0], tab, sl, page)
        for name, kw in (("default", {}), ("walk by division", dict(config=dict(DECODE_CONFIG, PAGE_LOG2=-1)))):
            cases.append((f"{name}, {label}", [lambda i=i, tab=tab, page=page, kw=kw: decode_attention(
                qs[i], kcs[i], vcs[i], tab, sl, page, out=outs[i], **kw) for i in range(R)]))
    if all(f is not None for f in cudnn):
        cases.append(("sdpa cudnn/native, contiguous K/V", cudnn))
    ref = decode_attention_ref(qs[0], kcs[0], vcs[0], pt, sl, ps)
    rows = []
    for label, fns in cases:
        outs[0].zero_()
        g = graph_of(fns)
        ok = "" if label.startswith("sdpa") else ("ok" if compare(outs[0], refs.get(label, ref))[0] else "FAIL")
        ms = bk.bench(g.replay) / R
        reps = kernel_records(g, cache.zero_, args.replays)
        per_name: dict[str, list[float]] = {}
        spans, busy = [], []
        for r in reps:
            spans.append((r[-1]["ts"] + r[-1]["dur"] - r[0]["ts"]) / R)
            busy.append(sum(k["dur"] for k in r) / R)
            for k in r:
                per_name.setdefault(k["name"][:60], []).append(k["dur"])
        span, on = statistics.median(spans), statistics.median(busy)
        row = dict(device=torch.cuda.get_device_name(), commit=git_commit(), impl=label, ok=ok, do_bench_us=ms * 1e3,
                   ratio_do_bench=nbytes / ms / 1e6 / copy, profiled_us_per_call=span, kernel_busy_us_per_call=on,
                   idle_us_per_call=span - on, bytes_at_copy_us=nbytes / copy / 1e3, copy_gbps=copy,
                   kernels=" | ".join(f"{n}: {statistics.median(d):.2f} us x{len(d) // max(len(reps), 1)}"
                                      for n, d in per_name.items()))
        rows.append(row)
        print(f"{label:40s} {ok:4s} do_bench {row['do_bench_us']:6.2f} us ({row['ratio_do_bench']:.3f} of copy) "
              f"profiled {span:6.2f} us/call, kernels busy {on:6.2f}, idle {span - on:5.2f}; at copy rate "
              f"{row['bytes_at_copy_us']:.2f} us\n    {row['kernels']}", flush=True)
        del g
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        wr = csv.DictWriter(f, list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
