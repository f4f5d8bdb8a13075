#!/usr/bin/env python3
"""Decode 1 x 32k (issue 12's 0.80-of-copy goal): do splits that fill every SM evenly help?

With 64-token tiles a split holds a multiple of 64 tokens, so 32,768 tokens cut into 32 or 64
splits only (8 KV heads: 256 or 512 programs on 132 SMs, neither an even load). `PIECE_ALIGN`
(a decode config key) cuts splits in multiples of a page instead: 33 splits x 8 heads = 264
programs = 2 per SM. Each config is timed as bench_kernels times the 32k row (CUDA graph of 6
calls on rotated inputs, do_bench median), beside a device copy measured just before and
cuDNN's SDPA decode on the same K/V made contiguous.

    PYTHONPATH=. python3 experiments/decode_long_balance.py --out results/kernels/decode_long_balance.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (experiments/bench_kernels.py: bench_rot, copy_bandwidth, gather_contig)
from gpu_record import git_commit  # noqa: E402  (experiments/gpu_record.py)
from kvbench.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from kvbench.kernels.tolerances import compare  # noqa: E402

CONFIGS = [  # (BLOCK_N, warps, stages, splits or None = the launcher's choice, PIECE_ALIGN or None = BLOCK_N)
    (64, 4, 2, None, None),
    (64, 4, 2, 32, None), (64, 4, 2, 33, 16), (64, 4, 2, 33, 32), (64, 4, 2, 66, 16), (64, 4, 2, 17, 16),
    (64, 4, 3, 33, 16), (64, 4, 3, 17, 16), (32, 4, 3, 33, 16), (32, 4, 3, 66, 16), (32, 4, 4, 33, 16),
    (64, 8, 2, 33, 16), (128, 8, 2, 33, 16), (64, 4, 2, 99, 16), (64, 4, 2, 132, 16),
]


def long_case(R: int = 6) -> SimpleNamespace:
    """The 1 x 32k row's inputs on bk.DEV (Llama-3-8B heads, bf16, pages of 16 in a random order
    in a pool twice the context), R rotated copies: kcs, vcs [S, H_kv, D], qs [1, H_q, D], sl, pt,
    the same keys gathered contiguous (kc, vc [1, H_kv, L, D]), the bytes a call reads (nbytes)
    and the shapes; `gen` is the generator the table came from."""
    dev, gen = bk.DEV, torch.Generator().manual_seed(0)
    B, L, Hq, Hkv, D, dt, ps = 1, 32768, 32, 8, 128, torch.bfloat16, 16
    S = 2 * L
    kcs = [torch.randn(S, Hkv, D, device=dev, dtype=dt) for _ in range(R)]
    vcs = [torch.randn(S, Hkv, D, device=dev, dtype=dt) for _ in range(R)]
    qs = [torch.randn(B, Hq, D, device=dev, dtype=dt) for _ in range(R)]
    sl = torch.full((B,), L, dtype=torch.int32, device=dev)
    pt = torch.randperm(S // ps, generator=gen)[: L // ps].to(torch.int32).view(1, -1).to(dev)
    nbytes = 2 * L * Hkv * D * dt.itemsize + 2 * qs[0].numel() * dt.itemsize + (L // ps) * 4
    kc = [bk.gather_contig(kcs[i], pt, ps, L) for i in range(R)]
    vc = [bk.gather_contig(vcs[i], pt, ps, L) for i in range(R)]
    return SimpleNamespace(B=B, L=L, Hq=Hq, Hkv=Hkv, D=D, dt=dt, ps=ps, S=S, R=R, kcs=kcs, vcs=vcs, qs=qs, sl=sl,
                           pt=pt, nbytes=nbytes, kc=kc, vc=vc, gen=gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the configs (medians quoted)")
    ap.add_argument("--configs", default="",
                    help="configs to time instead of CONFIGS, ';'-separated BLOCK_N,warps,stages[,splits[,PIECE_ALIGN"
                         "[,TILE_WALK]]] (splits, PIECE_ALIGN and TILE_WALK empty or absent: the launcher's; "
                         "TILE_WALK 1 / 0: the page table walked a tile's pages / a token at a time), "
                         "e.g. '64,4,2;64,4,3;64,4,2,,,0'")
    args = ap.parse_args()
    try:
        configs = [tuple(int(x) if x else None for x in (c.split(",") + [""] * 6)[:6]) for c in args.configs.split(";")
                   if c.strip()] or [(*c, None) for c in CONFIGS]
        bad = [c for c in configs if None in c[:3] or min(c[:3]) < 1]
    except ValueError:
        bad = [args.configs]
    if bad or args.rounds < 1:
        ap.error(f"--configs: BLOCK_N,warps,stages must be positive ints, got {bad}" if bad
                 else f"--rounds must be >= 1, got {args.rounds}")
    bk.DEV = torch.device("cuda")
    c = long_case()
    kcs, vcs, qs, sl, pt, ps, R, nbytes = c.kcs, c.vcs, c.qs, c.sl, c.pt, c.ps, c.R, c.nbytes
    ref = decode_attention_ref(qs[0], kcs[0], vcs[0], pt, sl, ps)
    kc, vc = c.kc, c.vc
    variants = [bk.sdpa_variants(qs[i][:, :, None, :], kc[i], vc[i], causal=False) for i in range(R)]
    commit = git_commit()
    name = torch.cuda.get_device_name()
    t0 = time.time()
    while time.time() - t0 < 0.3:  # clocks up before the copy
        bk.copy_bandwidth(0.5)
    rows = []
    for rnd in range(args.rounds):
        _, copy, _ = bk.copy_bandwidth(2.0)
        for peer in ("cudnn/native", "cudnn/expanded", "default/native"):
            fns = [v[peer] for v in variants if peer in v]
            if len(fns) == R:
                ms = bk.bench_rot(fns)
                by = nbytes * (c.Hq // c.Hkv if peer.endswith("expanded") else 1)
                rows.append(dict(round=rnd, impl=f"sdpa {peer} contiguous", config="", ms=ms, copy_gbps=copy,
                                 ratio=by / ms / 1e6 / copy, ok=""))
                print(f"round {rnd} sdpa {peer:30s} {ms * 1e3:7.2f} us {rows[-1]['ratio']:.3f} copy {copy:.0f} GB/s",
                      flush=True)
        for bn, w, st, ns, al, tw in configs:
            cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st, FUSED_MERGE=0)
            if al:
                cfg["PIECE_ALIGN"] = al
            if tw is not None:
                cfg["TILE_WALK"] = tw
            ok, _ = compare(decode_attention(qs[0], kcs[0], vcs[0], pt, sl, ps, num_splits=ns, config=cfg), ref)
            ms = bk.bench_rot([lambda i=i: decode_attention(qs[i], kcs[i], vcs[i], pt, sl, ps, num_splits=ns,
                                                            config=cfg) for i in range(R)])
            label = f"BN{bn} w{w} s{st} splits={ns} align={al}" + (f" tile_walk={tw}" if tw is not None else "")
            rows.append(dict(round=rnd, impl="triton paged p16", config=label,
                             ms=ms, copy_gbps=copy, ratio=nbytes / ms / 1e6 / copy, ok="ok" if ok else "FAIL"))
            print(f"round {rnd} {rows[-1]['config']:36s} {ms * 1e3:7.2f} us {rows[-1]['ratio']:.3f} {rows[-1]['ok']}",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        wr = csv.DictWriter(f, ["device", "commit", *rows[0]])
        wr.writeheader()
        for r in rows:
            wr.writerow(dict(device=name, commit=commit, **r))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
