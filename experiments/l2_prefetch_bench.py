"""Can the o projection's weights be pulled into L2 while a batch-1 decode attention runs?
(issue 12 §3: at batch 1 the 8B step's small projections read 55-65 % of copy, and attention,
norms and rope leave HBM mostly idle.)

    python experiments/l2_prefetch_bench.py --out DIR

8B shapes: o projection W [4096, 4096] bf16, x [1, 4096]; decode attention of one request over a
2k context (32/8 heads, d 128, page 16). Every case runs in one CUDA graph over R input sets
(weights and caches together larger than L2), GPU time per set (bench_kernels.bench_rot):
- gemv / attn: each alone; attn+gemv: one after the other (what the model does);
- pf(v, p): the prefetch kernel alone (variant v: "ld" loads with evict_last, "asm" PTX
  prefetch.global.L2::evict_last; p programs); pf+gemv: prefetch, then the GEMV (L2-hot GEMV);
- attn||pf then gemv: a side stream prefetches W while attention runs, joined before the GEMV
  ("join before") or after it ("join after").
Writes DIR/l2_prefetch.csv. Needs CUDA.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (use_checkout done there)

from kvbench.kernels import linear as lin  # noqa: E402
from kvbench.kernels.decode_attention import decode_attention  # noqa: E402


@triton.jit
def _prefetch_ld(ptr, n, flag, BLOCK: tl.constexpr):
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(ptr + offs, mask=offs < n, eviction_policy="evict_last")
        tl.store(ptr + offs, v, mask=(offs < n) & (flag != 0))       # never (flag 0): keeps the load


@triton.jit
def _prefetch_asm(ptr, n, flag, out, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(tl.program_id(0) * BLOCK * 64, n, tl.num_programs(0) * BLOCK * 64):
        offs = start + tl.arange(0, BLOCK) * 64                              # one 128-byte line each
        r = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                      [ptr + offs], dtype=tl.int32, is_pure=False, pack=1)
        acc += r
    tl.store(out + tl.program_id(0), tl.sum(acc), mask=flag != 0)


def prefetch(w: torch.Tensor, variant: str, programs: int, sink: torch.Tensor) -> None:
    n = w.numel()
    if variant == "ld":
        _prefetch_ld[(programs,)](w, n, 0, BLOCK=2048, num_warps=8)
    else:
        _prefetch_asm[(programs,)](w, n, 0, sink, BLOCK=1024, num_warps=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--rot", type=int, default=8)
    ap.add_argument("--programs", default="16,32,66,132")
    args = ap.parse_args()
    bk.DEV = dev = torch.device("cuda")
    _, copy_gbps, _ = bk.copy_bandwidth(2.0)
    print(f"device {torch.cuda.get_device_name()} copy {copy_gbps:.1f} GB/s", flush=True)
    R, N, K, ctx, ps, Hq, Hkv, D = args.rot, 4096, 4096, 2048, 16, 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(R)]
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16, generator=g)
    pages = ctx // ps
    kcs = [torch.randn(pages * ps, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(R)]
    vcs = [torch.randn(pages * ps, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(R)]
    q = torch.randn(1, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)
    pt = torch.arange(pages, device=dev, dtype=torch.int32)[None]
    sl = torch.tensor([ctx], device=dev, dtype=torch.int32)
    sink = torch.zeros(1024, device=dev, dtype=torch.int32)
    side = torch.cuda.Stream()
    rows = []

    def gemv(i):
        lin.linear(x, ws[i])

    def attn(i):
        decode_attention(q, kcs[i], vcs[i], pt, sl, ps, max_seq_len=ctx)

    def add(case, fns, **kw):
        ms = bk.bench_rot(fns, rep=200)
        rows.append(dict(case=case, us=round(ms * 1e3, 3), **kw))
        print(f"  {case:44s} {kw} {ms * 1e3:8.2f} us", flush=True)

    ref = torch.nn.functional.linear(x.float(), ws[0].float())
    assert torch.allclose(lin.linear(x, ws[0]).float(), ref, atol=2e-2, rtol=2e-2)
    add("gemv", [lambda i=i: gemv(i) for i in range(R)])
    add("attn", [lambda i=i: attn(i) for i in range(R)])
    add("attn+gemv", [lambda i=i: (attn(i), gemv(i)) for i in range(R)])
    for variant in ("ld", "asm"):
        for p in map(int, args.programs.split(",")):
            kw = dict(variant=variant, programs=p)
            add("pf", [lambda i=i: prefetch(ws[i], variant, p, sink) for i in range(R)], **kw)
            add("pf+gemv", [lambda i=i: (prefetch(ws[i], variant, p, sink), gemv(i)) for i in range(R)], **kw)

            def overlapped(i, before):
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch(ws[i], variant, p, sink)
                attn(i)
                if before:
                    main.wait_stream(side)
                gemv(i)
                if not before:
                    main.wait_stream(side)
            add("attn||pf, join before gemv", [lambda i=i: overlapped(i, True) for i in range(R)], **kw)
            add("attn||pf, gemv, join after", [lambda i=i: overlapped(i, False) for i in range(R)], **kw)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = ["case", "variant", "programs", "us"]
    with open(args.out / "l2_prefetch.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys + ["device", "copy_gbps"])
        wr.writeheader()
        for r in rows:
            wr.writerow(dict({k: r.get(k, "") for k in keys}, device=torch.cuda.get_device_name(),
                             copy_gbps=round(copy_gbps, 1)))


if __name__ == "__main__":
    main()
