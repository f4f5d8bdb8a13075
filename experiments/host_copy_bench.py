"""KV pages between the GPU pool and pinned host memory: bandwidth per page size (issue 14's host
tier and swap preemption; the sim's `h2d_bytes_per_s` / `d2h_bytes_per_s` come from here).

    python experiments/host_copy_bench.py --out DIR [--commit SHA]

For each model shape and page size, a scattered set of pool pages (every layer, K and V) moves
device -> host and back, three ways:
- `page_move`: kvbench's Triton kernel reading/writing pinned host memory directly (one launch);
- `staged`: a device gather into a contiguous staging buffer plus one `copy_` (and the reverse);
- `contiguous copy` (the yardstick): one `copy_` of the same number of bytes, contiguous on both
  sides, measured in the same run.
Median of 10 timed repetitions (CUDA events) after 3 warm-ups. Writes DIR/host_copy.csv and .json
(atomically); needs CUDA.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from checkout import use_checkout  # noqa: E402  (experiments/checkout.py)

use_checkout()

from kvbench.kernels.page_copy import page_move  # noqa: E402
from kvbench.provenance import git_commit  # noqa: E402

SHAPES = {"llama3_1_8b": dict(L=32, H=8, D=128), "llama3_2_1b": dict(L=16, H=8, D=64)}
PAGE_SIZES = (1, 16, 64)
MOVE_BYTES = 256 << 20  # bytes moved per measurement
POOL_BYTES = 4 << 30


def timed_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--commit", default=None, help="commit to record (default: git HEAD of the checkout)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    name, sha = torch.cuda.get_device_name(dev), args.commit or git_commit() or "unknown"
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for shape, s in SHAPES.items():
        L, H, D = s["L"], s["H"], s["D"]
        for ps in PAGE_SIZES:
            page_bytes = L * 2 * ps * H * D * 2
            num_pages = POOL_BYTES // page_bytes
            P = max(1, MOVE_BYTES // page_bytes)
            pool = torch.empty(L, 2, num_pages * ps, H, D, dtype=torch.bfloat16, device=dev).normal_()
            pages = torch.randperm(num_pages, generator=gen)[:P].to(dev)
            host = torch.empty(P, L, 2, ps, H, D, dtype=pool.dtype, pin_memory=True)
            nbytes = host.numel() * host.element_size()
            flat_dev = torch.empty(nbytes // 2, dtype=pool.dtype, device=dev)
            flat_host = host.view(-1)
            paged = pool.view(L, 2, num_pages, ps, H, D)
            staging = torch.empty_like(host, device=dev)

            def staged_out():
                torch.index_select(paged, 2, pages, out=staging.permute(1, 2, 0, 3, 4, 5))
                host.copy_(staging, non_blocking=True)

            def staged_in():
                staging.copy_(host, non_blocking=True)
                paged.index_copy_(2, pages, staging.permute(1, 2, 0, 3, 4, 5))

            cases = [("d2h", "contiguous copy", lambda: flat_host.copy_(flat_dev, non_blocking=True)),
                     ("h2d", "contiguous copy", lambda: flat_dev.copy_(flat_host, non_blocking=True)),
                     ("d2h", "page_move", lambda: page_move(pool, pages, host, ps, True)),
                     ("h2d", "page_move", lambda: page_move(pool, pages, host, ps, False)),
                     ("d2h", "staged", staged_out), ("h2d", "staged", staged_in)]
            base = {}
            page_move(pool, pages, host, ps, True)
            torch.cuda.synchronize()
            ok = torch.equal(host.to(dev), paged[:, :, pages].permute(2, 0, 1, 3, 4, 5))
            for direction, method, fn in cases:
                ms = timed_ms(fn)
                gbps = nbytes / ms / 1e6
                base.setdefault(direction, gbps)
                rows.append(dict(device=name, commit=sha, shape=shape, page_size=ps, page_bytes=page_bytes,
                                 pages=P, bytes=nbytes, direction=direction, method=method, median_ms=round(ms, 4),
                                 gbps=round(gbps, 2), ratio_to_copy=round(gbps / base[direction], 3),
                                 correct=ok if method == "page_move" else ""))
                print(f"{shape:12s} page {ps:3d} ({page_bytes >> 10:5d} KiB) {direction} {method:16s} "
                      f"{ms:8.3f} ms {gbps:7.1f} GB/s {gbps / base[direction]:.3f} of copy", flush=True)
            del pool, host, staging, flat_dev
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    for fname, text in (("host_copy.json", json.dumps(rows, indent=1)), ("host_copy.csv", None)):
        tmp = args.out / (fname + ".tmp")
        with open(tmp, "w", newline="") as f:
            if text is None:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            else:
                f.write(text)
        os.replace(tmp, args.out / fname)


if __name__ == "__main__":
    main()
