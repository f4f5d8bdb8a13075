"""cuBLAS against cuBLASLt (torch.backends.cuda.preferred_blas_library) on the projections of the
1B and 8B models, for the row counts a serving step has: decode batches (17-256 rows) and prefill
chunks (512-8192). What `engine.blas` (kvbench/engines/gpu_engine.py) decides.

    python experiments/blas_ab.py --out DIR [--m 32,64,128,256,512,2048,8192]

Each (shape, M, library): GPU time per call from a CUDA graph of calls over weight copies larger
than L2 (bench_kernels.bench_rot), the two libraries interleaved, as weight GB/s against a device
copy measured first and as TFLOP/s. Writes DIR/blas_ab.csv. Needs CUDA.
"""
from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402

SHAPES = {"8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
          "8b lm_head": (128256, 4096), "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048),
          "1b down": (2048, 8192)}
LIBS = ("cublas", "cublaslt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--m", default="32,64,128,256,512,2048,8192")
    args = ap.parse_args()
    bk.DEV = dev = torch.device("cuda")
    _, copy_gbps, _ = bk.copy_bandwidth(2.0)
    print(f"device {torch.cuda.get_device_name()} copy {copy_gbps:.1f} GB/s", flush=True)
    rows = []
    for name, (N, K) in SHAPES.items():
        R = max(2, -(-(512 << 20) // (N * K * 2)))
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(R)]
        for M in map(int, args.m.split(",")):
            if name.endswith("lm_head") and M > 256:
                continue                                   # (a step's lm_head sees one row a request)
            xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(R)]
            got = {}
            for rnd in range(2):                           # interleaved: cublas, cublaslt, cublas, cublaslt
                for lib in LIBS:
                    torch.backends.cuda.preferred_blas_library(lib)
                    ms = bk.bench_rot([lambda i=i: F.linear(xs[i], ws[i]) for i in range(R)], rep=50)
                    got.setdefault(lib, []).append(ms)
            line = []
            for lib in LIBS:
                ms = min(got[lib])
                rows.append(dict(shape=name, M=M, N=N, K=K, lib=lib, ms=round(ms, 5),
                                 weight_ratio_to_copy=round(N * K * 2 / ms / 1e6 / copy_gbps, 3),
                                 tflops=round(2 * M * N * K / ms / 1e9, 1)))
                line.append(f"{lib} {ms * 1e3:8.1f} us")
            print(f"{name:12s} M={M:5d}  " + "  ".join(line) + f"  lt/cublas {min(got['cublaslt']) / min(got['cublas']):.3f}",
                  flush=True)
            del xs
        del ws
        torch.cuda.empty_cache()
    torch.backends.cuda.preferred_blas_library("cublas")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "blas_ab.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, args.out / "blas_ab.csv")


if __name__ == "__main__":
    main()
