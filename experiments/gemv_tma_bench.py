"""Does a GEMV whose weight tiles come by TMA (Triton tensor descriptors) read the 8B projections
closer to the copy rate than `kernels/linear.py` (pointer loads)? (issue 12 §3)

    python experiments/gemv_tma_bench.py --out DIR

At M = 1, per 8B projection (qkv, o, gate_up, down): the current launcher (autotuned), cuBLAS,
and a sweep of two TMA kernels ("dot": x padded to 16 rows, one tensor-core dot per K tile, as
linear; "fma": no padding, products summed along K on the CUDA cores), each config timed from a
CUDA graph of calls over weight copies together larger than L2 (bench_kernels.bench_rot), as a
fraction of a device copy measured first. Also "dot"/"fma" on weights just read (L2-hot) for the
o shape: how fast the kernel streams when HBM is not the limit. Writes DIR/gemv_tma.csv.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (use_checkout done there)

from gemv_fma_bench import SHAPES, recorder, shape_inputs, write_rows  # noqa: E402
from kvbench.kernels import linear as lin  # noqa: E402

GRID = [dict(BLOCK_N=bn, BLOCK_K=bkk, num_warps=w, num_stages=s)
        for bn, bkk, w, s in itertools.product((16, 32, 64), (128, 256), (4,), (3, 4, 6, 8))
        if bn * bkk * s * 2 <= 200_000]


@triton.jit
def _gemv_tma(x_ptr, w_desc, y_ptr, M, N, K, stride_xm, stride_ym,
              FMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    if FMA:  # M = 1
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = w_desc.load([n0, k0])                                           # [BN, BK]
            x = tl.load(x_ptr + k0 + offs_k0, mask=k0 + offs_k0 < K, other=0.0)  # [BK]
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = w_desc.load([n0, k0])
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k0)[None, :],
                        mask=(offs_m < M)[:, None] & (k0 + offs_k0 < K)[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    bk.DEV = dev = torch.device("cuda")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    _, copy_gbps, _ = bk.copy_bandwidth(2.0)
    name_dev = torch.cuda.get_device_name()
    print(f"device {name_dev} copy {copy_gbps:.1f} GB/s; {len(GRID)} configs x 2 kernels", flush=True)
    rows = []
    for name in args.shapes.split(","):
        N, K, R, ws, x, ys, ref = shape_inputs(name, dev)
        add = recorder(rows, name, N * K * 2, copy_gbps)
        add("cublas", bk.bench_rot([lambda i=i: F.linear(x, ws[i]) for i in range(R)]))
        add("linear (autotuned)", bk.bench_rot([lambda i=i: lin.linear(x, ws[i]) for i in range(R)]))
        for fma, cfg in itertools.product((False, True), GRID):
            meta = dict(cfg)
            bn, bkk = meta["BLOCK_N"], meta["BLOCK_K"]
            descs = [TensorDescriptor.from_tensor(w, [bn, bkk]) for w in ws]

            def call(i, meta=meta, descs=descs):
                _gemv_tma[(triton.cdiv(N, meta["BLOCK_N"]),)](x, descs[i], ys[i], 1, N, K, x.stride(0), ys[i].stride(0),
                                                               FMA=fma, BLOCK_M=16, **meta)
            impl = ("tma fma " if fma else "tma dot ") + ";".join(f"{k}={v}" for k, v in cfg.items())
            try:
                call(0)
                ok = bool(torch.allclose(ys[0].float(), ref, atol=2e-2, rtol=2e-2))
                add(impl, bk.bench_rot([lambda i=i: call(i) for i in range(R)], rep=50), ok)
                if name == "8b o":  # L2-hot: the same weight every call
                    add(impl + " (L2-hot)", bk.bench_rot([lambda: call(0) for _ in range(R)], rep=50), ok)
            except Exception as e:  # out of resources for this config
                print(f"  {name} {impl}: {type(e).__name__} {str(e)[:120]}", flush=True)
        if name == "8b o":
            add("linear (autotuned) (L2-hot)", bk.bench_rot([lambda: lin.linear(x, ws[0]) for _ in range(R)]))
        mine = sorted((r for r in rows if r["shape"] == name and r["impl"].startswith("tma") and "hot" not in r["impl"]),
                      key=lambda r: r["median_ms"])[:4]
        for r in mine:
            print(f"  best {name}: {r['impl']} {r['ratio_to_copy']}", flush=True)
    write_rows(args.out / "gemv_tma.csv", rows, name_dev, copy_gbps)

if __name__ == "__main__":
    main()
