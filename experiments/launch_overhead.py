"""Host time per call of every kernel launcher at tiny shapes, where the GPU's work is negligible,
against a torch elementwise op timed in the same process (the yardstick of issue 12: <= 15 us).

    python experiments/launch_overhead.py --out DIR [--profile]

Each row: median over 7 rounds of (wall time of N back-to-back calls) / N, the GPU synchronised
only before and after a round, so the figure is what the host pays to issue one call. With
--profile, a cProfile of each launcher's calls says where that time goes. Writes
DIR/launch_overhead.csv and .json; needs CUDA.
"""
from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import pathlib
import pstats
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from checkout import REPO, use_checkout  # noqa: E402  (experiments/checkout.py)

use_checkout()

from kvbench.kernels.decode_attention import decode_attention  # noqa: E402
from kvbench.kernels.extend_attention import extend_attention  # noqa: E402
from kvbench.kernels.kv_write import kv_write  # noqa: E402
from kvbench.kernels.linear import linear  # noqa: E402
from kvbench.kernels.page_copy import page_copy  # noqa: E402
from kvbench.kernels.rms_norm import rms_norm  # noqa: E402
from kvbench.kernels.rope_kv_write import rope_kv_write  # noqa: E402
from kvbench.kernels.silu_mul import silu_mul  # noqa: E402


def host_us(fn, n: int = 2000, rounds: int = 7) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        per.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per)


def cases(dev):
    """(name, zero-argument call) at tiny shapes: a 2-request batch, 1 KV head group, D=64."""
    bf = torch.bfloat16
    Hq, Hkv, D, ps = 4, 1, 64, 16
    q = torch.randn(2, Hq, D, device=dev, dtype=bf)
    kc = torch.randn(64 * ps, Hkv, D, device=dev, dtype=bf)
    vc = torch.randn_like(kc)
    pt = torch.arange(8, device=dev, dtype=torch.int32).view(2, 4)
    sl = torch.tensor([40, 50], device=dev, dtype=torch.int32)
    out = torch.empty_like(q)
    kn = torch.randn(2, Hkv, D, device=dev, dtype=bf)
    slots = torch.tensor([3, 70], device=dev, dtype=torch.int32)
    qe = torch.randn(6, Hq, D, device=dev, dtype=bf)
    qsl = torch.tensor([0, 3, 6], device=dev, dtype=torch.int32)
    qkv = torch.randn(2, (Hq + 2 * Hkv) * D, device=dev, dtype=bf)
    cos = torch.randn(2, D, device=dev, dtype=bf)
    sin = torch.randn(2, D, device=dev, dtype=bf)
    x = torch.randn(2, 256, device=dev, dtype=bf)
    w = torch.randn(256, device=dev, dtype=bf)
    wl = torch.randn(128, 256, device=dev, dtype=bf)
    pool = torch.randn(1, 2, 64 * ps, Hkv, D, device=dev, dtype=bf)
    src = torch.tensor([1], device=dev, dtype=torch.int32)
    dst = torch.tensor([2], device=dev, dtype=torch.int32)
    small = torch.randn(256, device=dev)
    return [
        ("torch add_ (yardstick)", lambda: small.add_(1.0)),
        ("decode_attention 1 split", lambda: decode_attention(q, kc, vc, pt, sl, ps, num_splits=1, out=out)),
        ("decode_attention 4 splits", lambda: decode_attention(q, kc, vc, pt, sl, ps, num_splits=4, out=out)),
        ("decode_attention auto", lambda: decode_attention(q, kc, vc, pt, sl, ps, max_seq_len=64)),
        ("extend_attention", lambda: extend_attention(qe, kc, vc, pt, qsl, sl, ps)),
        ("kv_write", lambda: kv_write(kn, kn, kc, vc, slots)),
        ("rope_kv_write", lambda: rope_kv_write(qkv, cos, sin, kc, vc, slots, Hq, Hkv)),
        ("rms_norm", lambda: rms_norm(x, w, 1e-5)),
        ("rms_norm + residual", lambda: rms_norm(x, w, 1e-5, residual=x)),
        ("silu_mul", lambda: silu_mul(x)),
        ("linear (gemv)", lambda: linear(x, wl)),
        ("page_copy", lambda: page_copy(pool, src, dst, ps)),
    ]


def profile(fn, n: int = 2000) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    rows = []
    profiles = {}
    for name, fn in cases(dev):
        us = host_us(fn)
        rows.append(dict(device=torch.cuda.get_device_name(), commit=commit, launcher=name, host_us=round(us, 2)))
        print(f"{name:28s} {us:8.2f} us", flush=True)
        if args.profile and "yardstick" not in name:
            profiles[name] = profile(fn)
    base = rows[0]["host_us"]
    for r in rows:
        r["x_torch_op"] = round(r["host_us"] / base, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "launch_overhead.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    (args.out / "launch_overhead.json").write_text(json.dumps(dict(rows=rows, profiles=profiles), indent=1))
    for name, text in profiles.items():
        print(f"==== {name}\n{text[:3500]}")


if __name__ == "__main__":
    main()
