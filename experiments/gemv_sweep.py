"""Launch-config sweep of the decode-size linear kernel (kernels/linear.py) against cuBLAS, per
projection shape of the 1B and 8B models: which configs read weights closest to the copy rate
(issue 12 §3: the 8B batch-1 decode step is ~80 % of its roofline, and `_gemv_kernel` is 3.6 of
its 4.5 GPU ms).

    python experiments/gemv_sweep.py --out DIR [--m 1,16]

Each config: GPU time per call from a CUDA graph of calls over weight copies that together
exceed L2 (bench_kernels.bench_rot), as weight GB/s and as a fraction of a device copy measured
first. Writes DIR/gemv_sweep.csv (every config) and prints the best five per shape beside the
autotuned choice and cuBLAS. `--grid splitk --m 64` sweeps `_gemm_splitk_kernel` below (x of up
to 64 rows, a batch-64 decode step's projections, K split and merged in split order) against
cuBLAS: not kept in kernels/ (docs/kernels.md, "Batch 64"). Needs CUDA.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (use_checkout done there)

from kvbench.kernels import linear as lin  # noqa: E402
from kvbench.kernels._common import pdl_begin, pdl_late  # noqa: E402


@triton.jit
def _gemm_splitk_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,          # x [M, K], W [N, K], b [N], y [M, N]
    ws_ptr, lock_ptr,                    # SPLIT > 1: fp32 partials [SPLIT, BLOCK_M, N], int32 tickets [>= n blocks]
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    """x of up to BLOCK_M rows (a decode batch of 17-64) on the tensor cores, K split SPLIT ways:
    program (n, s) computes the [BLOCK_M, BLOCK_N] tile of columns n over the s-th run of K tiles.
    Wide column blocks keep x's re-reads from L2 few (each program reads x's [BLOCK_M, K / SPLIT]);
    the split fills the GPU. With SPLIT > 1 each program stores its fp32 partial and takes a
    ticket; the last of a column block to arrive adds the SPLIT partials in split order (so the
    result does not depend on arrival: graph and eager give the same bits), writes y and resets
    the ticket."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k_lo = split * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    pdl_begin(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)   # [BN, BK]
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        if DOT_F32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)                             # [BM, BN]
    pdl_late(PDL)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT > 1:
        tile = offs_m[:, None] * N + offs_n[None, :]                                               # [BM, BN]
        tl.store(ws_ptr + split * (BLOCK_M * N) + tile, acc, mask=out_mask)
        tl.debug_barrier()
        ticket = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:
            tl.atomic_xchg(lock_ptr + pid_n, 0, sem="relaxed", scope="gpu")
            acc = tl.load(ws_ptr + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT):
                acc += tl.load(ws_ptr + s * (BLOCK_M * N) + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=out_mask)


SHAPES = {"8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
          "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192)}
GRID = [dict(BLOCK_N=bn, BLOCK_K=bkk, num_warps=w, num_stages=s)
        for bn, bkk, w, s in itertools.product((16, 32, 64), (64, 128, 256, 512, 1024), (2, 4, 8), (2, 3, 4, 6))
        if bn * bkk * s * 2 <= 200_000 and not (w == 8 and bn * bkk < 8192)]
# x of 17-128 rows (a decode batch plus a short prefill chunk): x padded to 32, 64 or 128 rows
SKINNY_GRID = [dict(BLOCK_N=bn, BLOCK_K=bkk, num_warps=w, num_stages=s)
               for bn, bkk, w, s in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4))]
# the split-K kernel for x of 17-64 rows (`_gemm_splitk_kernel`): wide column blocks, K split so
# that the grid has 64-512 programs (chosen per shape in `splitk_grid`)
SPLITK_GRID = [dict(BLOCK_N=bn, BLOCK_K=bkk, SPLIT=sp, num_warps=w, num_stages=s)
               for (bn, w), bkk, sp, s in itertools.product(((64, 4), (128, 4), (128, 8), (256, 8)), (64, 128),
                                                            (1, 2, 3, 4, 6, 8, 16), (3, 5))]


def splitk_grid(N: int, K: int) -> list[dict]:
    return [c for c in SPLITK_GRID if 96 <= triton.cdiv(N, c["BLOCK_N"]) * c["SPLIT"] <= 400
            and K // c["SPLIT"] >= 2 * c["BLOCK_K"]]


def block_m(M: int) -> int:
    return max(lin.MAX_M, triton.next_power_of_2(M))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--m", default="1", help="rows of x (comma list)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--grid", choices=("full", "skinny", "splitk"), default="full",
                    help=f"full: {len(GRID)} configs (x padded to {lin.MAX_M} rows); skinny: {len(SKINNY_GRID)} "
                         "configs for x of more rows (padded to a power of 2)")
    args = ap.parse_args()
    grid = GRID if args.grid == "full" else SKINNY_GRID if args.grid == "skinny" else None
    bk.DEV = dev = torch.device("cuda")
    _, copy_gbps, _ = bk.copy_bandwidth(2.0)
    print(f"device {torch.cuda.get_device_name()} copy {copy_gbps:.1f} GB/s; {len(grid) if grid else 'per-shape split-K'} configs", flush=True)
    rows = []
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        R = max(2, -(-(512 << 20) // (N * K * 2)))
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(R)]
        for M in map(int, args.m.split(",")):
            xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(R)]
            ys = [torch.empty(M, N, device=dev, dtype=torch.bfloat16) for _ in range(R)]
            ref = F.linear(xs[0].float(), ws[0].float())
            res = []

            def add(impl, ms, ok=""):
                gbps = N * K * 2 / ms / 1e6
                res.append((ms, impl))
                rows.append(dict(shape=name, M=M, N=N, K=K, impl=impl, median_ms=round(ms, 5), gbps=round(gbps, 1),
                                 ratio_to_copy=round(gbps / copy_gbps, 3), correct=ok))

            add("cublas", bk.bench_rot([lambda i=i: F.linear(xs[i], ws[i]) for i in range(R)]))
            if M <= lin.MAX_M:
                add("linear (autotuned)", bk.bench_rot([lambda i=i: lin.linear(xs[i], ws[i]) for i in range(R)]))
            part = torch.empty(16 * 64 * N, device=dev, dtype=torch.float32)
            lock = torch.zeros(4096, device=dev, dtype=torch.int32)
            for cfg in grid or splitk_grid(N, K):
                bm = block_m(M) if grid else 64
                if (bm + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2 * cfg["num_stages"] > 220_000:
                    continue                                  # more shared memory than an SM has
                meta = dict(HAS_BIAS=False, DOT_F32=False, DOT_PREC="tf32", BLOCK_M=bm, PDL=0, **cfg)

                def call(i, meta=meta):
                    if grid:
                        lin._gemv_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
                            xs[i], ws[i], ws[i], ys[i], M, N, K, xs[i].stride(0), ws[i].stride(0), ys[i].stride(0),
                            **meta)
                    else:
                        _gemm_splitk_kernel[(triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT"])](
                            xs[i], ws[i], ws[i], ys[i], part, lock, M, N, K, xs[i].stride(0), ws[i].stride(0),
                            ys[i].stride(0), **meta)
                try:
                    call(0)
                    ok = bool(torch.allclose(ys[0].float(), ref, atol=2e-2, rtol=2e-2))
                    if not grid:       # the same bits again (the merge is in split order)
                        first = ys[0].clone()
                        call(0)
                        ok = ok and bool(torch.equal(first, ys[0]))
                    ms = bk.bench_rot([lambda i=i: call(i) for i in range(R)], rep=50)
                except Exception as e:  # out of resources for this config
                    print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
                    continue
                add(";".join(f"{k}={v}" for k, v in cfg.items()), ms, ok)
            best = sorted(res)[:5]
            base = dict((impl, ms) for ms, impl in res)
            tuned = base.get("linear (autotuned)", float("nan"))
            print(f"{name} M={M}: cublas {base['cublas'] * 1e3:.1f} us ({N * K * 2 / base['cublas'] / 1e6 / copy_gbps:.3f}"
                  f" of copy), autotuned {tuned * 1e3:.1f} us ({N * K * 2 / tuned / 1e6 / copy_gbps:.3f})", flush=True)
            for ms, impl in best:
                print(f"   {ms * 1e3:7.1f} us {N * K * 2 / ms / 1e6 / copy_gbps:.3f} of copy  {impl}", flush=True)
            del xs, ys
        del ws
        torch.cuda.empty_cache()
        write(args.out, rows)              # after every shape: a run cut short keeps what it measured


def write(out: pathlib.Path, rows: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gemv_sweep.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "gemv_sweep.csv")


if __name__ == "__main__":
    main()
