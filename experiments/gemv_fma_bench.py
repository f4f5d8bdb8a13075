"""A batch-1 GEMV without tensor cores: does summing products in registers and reducing once
read the 8B projections closer to the copy rate than `kernels/linear.py`? (issue 12 §3)

    python experiments/gemv_fma_bench.py --out DIR

`linear` pads x to 16 rows for one tensor-core dot per K tile, so every weight tile goes through
shared memory and `ldmatrix`. Here (M = 1) each thread multiplies its part of a [BLOCK_N, BLOCK_K]
weight tile by x and adds the products to a tile-shaped fp32 accumulator; the one cross-thread
reduction comes after the loop. BLOCK_N need not be a multiple of 16, so small blocks give
more programs. Per 8B projection: cuBLAS, `linear` (autotuned), and a sweep of this kernel, each
timed from a CUDA graph over weight copies together larger than L2 (bench_kernels.bench_rot),
as a fraction of a device copy measured first; o also L2-hot. Writes DIR/gemv_fma.csv.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (use_checkout done there)

from kvbench.kernels import linear as lin  # noqa: E402

SHAPES = {"8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336)}
GRID = [dict(BLOCK_N=bn, BLOCK_K=bkk, num_warps=w, num_stages=s)
        for bn, bkk, w, s in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024, 2048), (2, 4, 8), (1, 2, 3))
        if 8 <= bn * bkk // (32 * w) <= 64]
# the corner the first sweep's best configs sat in (blocks of 1-4 rows, 2k-8k columns)
GRID_SMALL_N = [dict(BLOCK_N=bn, BLOCK_K=bkk, num_warps=w, num_stages=s)
                for bn, bkk, w, s in itertools.product((1, 2, 4), (1024, 2048, 4096, 8192), (1, 2, 4, 8), (1, 2))
                if 8 <= bn * bkk // (32 * w) <= 128]


def shape_inputs(name: str, dev: torch.device) -> tuple:
    """One projection shape's inputs: N, K, R weight copies (together >= 3x L2, so every call
    reads from HBM), the R weights, x [1, K], R outputs and the fp32 reference of x @ W[0]^T."""
    N, K = SHAPES[name]
    R = max(2, -(-3 * 50 * 2**20 // (N * K * 2)))
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(R)]
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16, generator=gen)
    ys = [torch.empty(1, N, device=dev, dtype=torch.bfloat16) for _ in range(R)]
    return N, K, R, ws, x, ys, F.linear(x.float(), ws[0].float())


def recorder(rows: list, name: str, weight_bytes: int, copy_gbps: float):
    """add(impl, ms, ok=""): one row of `rows` for shape `name` (weight GB/s, fraction of copy), printed."""
    def add(impl, ms, ok=""):
        gbps = weight_bytes / ms / 1e6
        rows.append(dict(shape=name, impl=impl, median_ms=round(ms, 5), gbps=round(gbps, 1),
                         ratio_to_copy=round(gbps / copy_gbps, 3), correct=ok))
        print(f"  {name:10s} {impl:60s} {ms * 1e3:7.2f} us {gbps / copy_gbps:.3f}", flush=True)
    return add


def write_rows(path: pathlib.Path, rows: list, device: str, copy_gbps: float) -> None:
    """The rows as CSV at `path` (its folder made), with the device and the copy bandwidth."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["shape", "impl", "median_ms", "gbps", "ratio_to_copy", "correct"]
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys + ["device", "copy_gbps"])
        wr.writeheader()
        for r in rows:
            wr.writerow(dict({k: r[k] for k in keys}, device=device, copy_gbps=round(copy_gbps, 1)))


@triton.jit
def _gemv_m1(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + offs_n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--grid", choices=("full", "small-n"), default="full")
    args = ap.parse_args()
    grid = GRID if args.grid == "full" else GRID_SMALL_N
    bk.DEV = dev = torch.device("cuda")
    _, copy_gbps, _ = bk.copy_bandwidth(2.0)
    name_dev = torch.cuda.get_device_name()
    print(f"device {name_dev} copy {copy_gbps:.1f} GB/s; {len(grid)} configs", flush=True)
    rows = []
    for name in args.shapes.split(","):
        N, K, R, ws, x, ys, ref = shape_inputs(name, dev)
        add = recorder(rows, name, N * K * 2, copy_gbps)
        add("cublas", bk.bench_rot([lambda i=i: F.linear(x, ws[i]) for i in range(R)]))
        add("linear (autotuned)", bk.bench_rot([lambda i=i: lin.linear(x, ws[i]) for i in range(R)]))
        for cfg in grid:
            def call(i, cfg=cfg):
                _gemv_m1[(triton.cdiv(N, cfg["BLOCK_N"]),)](x, ws[i], ys[i], N, K, ws[i].stride(0), **cfg)
            impl = "fma " + ";".join(f"{k}={v}" for k, v in cfg.items())
            try:
                call(0)
                ok = bool(torch.allclose(ys[0].float(), ref, atol=2e-2, rtol=2e-2))
                add(impl, bk.bench_rot([lambda i=i: call(i) for i in range(R)], rep=50), ok)
            except Exception as e:  # out of resources for this config
                print(f"  {name} {impl}: {type(e).__name__} {str(e)[:120]}", flush=True)
        best = sorted((r for r in rows if r["shape"] == name and r["impl"].startswith("fma")),
                      key=lambda r: r["median_ms"])[:4]
        for r in best:
            print(f"  best {name}: {r['impl']} {r['ratio_to_copy']} correct={r['correct']}", flush=True)
        if name == "8b o" and best:
            cfg = dict(kv.split("=") for kv in best[0]["impl"][4:].split(";"))
            cfg = {k: int(v) for k, v in cfg.items()}
            add("linear (autotuned) (L2-hot)", bk.bench_rot([lambda: lin.linear(x, ws[0]) for _ in range(R)]))
            add(best[0]["impl"] + " (L2-hot)", bk.bench_rot(
                [lambda: _gemv_m1[(triton.cdiv(N, cfg["BLOCK_N"]),)](x, ws[0], ys[0], N, K, ws[0].stride(0), **cfg)
                 for _ in range(R)]))
    write_rows(args.out / "gemv_fma.csv", rows, name_dev, copy_gbps)


if __name__ == "__main__":
    main()
