#!/usr/bin/env python3
"""The fused decode projections (kernels/fused_linear.py) against the unfused pairs they replace,
at Llama-3.1-8B shapes, from CUDA graphs on one GPU (issue 12 §3).

    PYTHONPATH=. python3 experiments/fused_decode_bench.py [--m 1,2,4,8,16] [--out results/kernels]
    PYTHONPATH=. python3 experiments/fused_decode_bench.py --smoke      # tiny shapes on the CPU (checks the script)

Cases: qkv (N=6144, K=4096) after rms_norm with the residual add; gate_up (N=28672, K=4096) after
rms_norm with the residual add; down (N=4096, K=14336) after silu_mul. For each row count M, the
unfused pair (rms_norm + linear, or silu_mul + linear: two launches) and the fused op (one), each
timed as in bench_kernels.bench_rot: a CUDA graph of calls over weight copies that together exceed
L2, replayed, divided by the calls. Rows give GPU ms per call, weight GB/s and the fraction of a
device-to-device copy measured first in the same run, fused/unfused, and whether the fused outputs
(and the residual stream) equal the unfused ones bit for bit; at M = 1 and 4 a third row per case
times the option fused_linear.PREFETCH_TILES = 2 (off by default: W's first tiles asked of L2 before the
kernel waits on the one before it); and the plain `linear` on the o and qkv projections at M = 1
with and without the same option (linear.PREFETCH_TILES). Both fusions are timed at every M,
above their default limits too (fused_linear.SILU_MAX_M / NORM_MAX_M, named in the output): the
rows say where each stops paying. A last row per M: the per-layer saving (the three cases) and per 32-layer step.
Writes OUT/fused_decode_<device>.csv. Needs CUDA (but --smoke).
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (use_checkout and --smoke's TRITON_INTERPRET done there)

import torch  # noqa: E402
import triton  # noqa: E402

from kvbench.kernels import fused_linear as fl  # noqa: E402
from kvbench.kernels import linear as lin  # noqa: E402
from kvbench.kernels.rms_norm import rms_norm  # noqa: E402
from kvbench.kernels.silu_mul import silu_mul  # noqa: E402

H, I, QKV, LAYERS = 4096, 14336, 6144, 32          # Llama-3.1-8B
ROT_BYTES = 256 << 20                               # weight copies per case: together at least this
PREFETCH = 2                                        # the option's row: W tiles prefetched into L2 first
PREFETCH_IMPL = f"fused, L2 prefetch of {PREFETCH} tiles"
PREFETCH_M = (1, 4)                                 # its rows at these M only (each M compiles variants)
FIELDS = ["device", "commit", "case", "M", "impl", "launches", "median_ms", "weight_gbps", "ratio_to_copy",
          "fused_over_unfused", "bit_identical", "note"]


def cases(smoke: bool) -> list[tuple[str, int, int, str]]:
    """(name, N, K, what comes before the projection)."""
    h, i, q = (64, 96, 80) if smoke else (H, I, QKV)
    return [("qkv", q, h, "rms"), ("gate_up", 2 * i, h, "rms"), ("down", h, i, "silu")]


def bench_case(name, N, K, kind, M, dev, copy_gbps, rows, rot_bytes):
    """Time unfused and fused for one case and M; append two rows; return (unfused_ms, fused_ms)."""
    dt, eps = torch.bfloat16, 1e-5
    R = max(2, -(-rot_bytes // (N * K * 2)))
    ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(R)]
    g = torch.randn(K, device=dev, dtype=dt)
    if kind == "rms":
        xs = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(R)]
        rs = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(R)]
        unfused = [lambda i=i: lin.linear(rms_norm(xs[i], g, eps, rs[i]), ws[i]) for i in range(R)]
        fused = [lambda i=i: fl.rms_norm_linear(xs[i], g, eps, ws[i], None, rs[i]) for i in range(R)]
        r0 = rs[0].clone()                      # the check: before any timed call updates rs in place
        y_u = lin.linear(rms_norm(xs[0], g, eps, r0), ws[0])
        y_f, s_f = fl.rms_norm_linear(xs[0], g, eps, ws[0], None, rs[0])
        same = torch.equal(y_u, y_f) and torch.equal(r0, s_f)
    else:
        gus = [torch.randn(M, 2 * K, device=dev, dtype=dt) for _ in range(R)]
        unfused = [lambda i=i: lin.linear(silu_mul(gus[i]), ws[i]) for i in range(R)]
        fused = [lambda i=i: fl.silu_mul_linear(gus[i], ws[i]) for i in range(R)]
        same = torch.equal(lin.linear(silu_mul(gus[0]), ws[0]), fl.silu_mul_linear(gus[0], ws[0]))
    out = []
    for impl, fns, launches in (("unfused", unfused, 2), ("fused", fused, 1), (PREFETCH_IMPL, fused, 1)):
        if impl == PREFETCH_IMPL:      # an option (fused_linear.PREFETCH_TILES, default 0): timed, not relied on
            if M not in PREFETCH_M:
                continue
            try:
                fl.PREFETCH_TILES = PREFETCH
                ms = bk.bench_rot(fns, rep=100)
            except Exception as e:     # (an option: its failure does not cost the other rows)
                print(f"  {name} M={M} {impl}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                continue
            finally:
                fl.PREFETCH_TILES = 0
        else:
            ms = bk.bench_rot(fns, rep=100)
        gbps = N * K * 2 / ms / 1e6
        out.append(ms)
        rows.append(dict(case=f"{name} (+{'rms_norm' if kind == 'rms' else 'silu_mul'})", M=M, impl=impl,
                         launches=launches, median_ms=f"{ms:.5f}", weight_gbps=f"{gbps:.1f}",
                         ratio_to_copy=f"{gbps / copy_gbps:.3f}",
                         fused_over_unfused=f"{ms / out[0]:.3f}" if impl != "unfused" else "",
                         bit_identical=("yes" if same else "NO") if impl == "fused" else "",
                         note=f"N={N} K={K} bf16, {R} weight copies"))
        print("  " + " | ".join(str(rows[-1][k]) for k in ("case", "M", "impl", "median_ms", "weight_gbps",
                                                            "ratio_to_copy", "fused_over_unfused", "bit_identical")),
              flush=True)
    del ws, unfused, fused
    return out[0], out[1]


def bench_plain_prefetch(dev, copy_gbps, rows, rot_bytes, smoke):
    """The plain `linear` at M = 1 on the o and qkv projections, with and without the L2 prefetch
    option (linear.PREFETCH_TILES): the ramp of a kernel's first loads (issue 12 §3)."""
    h, q = (64, 80) if smoke else (H, QKV)
    for name, N, K in (("o", h, h), ("qkv", q, h)):
        R = max(2, -(-rot_bytes // (N * K * 2)))
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(R)]
        xs = [torch.randn(1, K, device=dev, dtype=torch.bfloat16) for _ in range(R)]
        fns = [lambda i=i: lin.linear(xs[i], ws[i]) for i in range(R)]
        base = None
        for impl, tiles in (("linear", 0), (f"linear, L2 prefetch of {PREFETCH} tiles", PREFETCH)):
            try:
                lin.PREFETCH_TILES = tiles
                ms = bk.bench_rot(fns, rep=100)
            except Exception as e:     # (an option: its failure does not cost the other rows)
                print(f"  {name} {impl}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                continue
            finally:
                lin.PREFETCH_TILES = 0
            base = base or ms
            gbps = N * K * 2 / ms / 1e6
            rows.append(dict(case=f"{name} (plain linear)", M=1, impl=impl, launches=1, median_ms=f"{ms:.5f}",
                             weight_gbps=f"{gbps:.1f}", ratio_to_copy=f"{gbps / copy_gbps:.3f}",
                             fused_over_unfused=f"{ms / base:.3f}" if tiles else "",
                             note=f"N={N} K={K} bf16, {R} weight copies; ratio column: against no prefetch"))
            print(f"  {name} (plain linear) | 1 | {impl} | {ms:.5f} | {gbps:.1f} | {gbps / copy_gbps:.3f}", flush=True)
        del ws, xs, fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,2,4,8,16", help="rows of x (comma list, each 1..16)")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="folder of the csv (default results/kernels; --smoke: a temporary folder)")
    ap.add_argument("--commit", default="", help="the commit measured (named in every row)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter): checks the script only")
    args = ap.parse_args()
    try:
        ms_list = [int(m) for m in args.m.split(",")]
    except ValueError:
        ms_list = []
    if not ms_list or not all(1 <= m <= fl.TILE_M for m in ms_list):
        print(f"fused_decode_bench: --m {args.m!r}: expected a comma list of integers in 1..{fl.TILE_M}",
              file=sys.stderr)
        sys.exit(2)
    if args.smoke:
        dev, device = torch.device("cpu"), "cpu-smoke"
    elif not torch.cuda.is_available():
        print("fused_decode_bench: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        sys.exit(2)
    else:
        dev, device = torch.device("cuda"), torch.cuda.get_device_name()
    bk.DEV = dev
    _, copy_gbps, _ = bk.copy_bandwidth(0.01 if args.smoke else 2.0)
    limits = {"silu": fl.SILU_MAX_M, "rms": fl.NORM_MAX_M}
    print(f"device={device} torch={torch.__version__} triton={triton.__version__} copy {copy_gbps:.1f} GB/s; "
          f"defaults: silu fused for M <= {limits['silu']}, norm for M <= {limits['rms']} "
          f"(timed fused at every M here)", flush=True)
    rows: list[dict] = []
    fl.SILU_MAX_M = fl.NORM_MAX_M = fl.TILE_M   # time the fusions above their default limits too
    try:
        for M in ms_list:
            saved = 0.0
            for name, N, K, kind in cases(args.smoke):
                u, f = bench_case(name, N, K, kind, M, dev, copy_gbps, rows, 1 << 12 if args.smoke else ROT_BYTES)
                saved += u - f
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(dict(case="layer: qkv+norm, gate_up+norm, down+silu", M=M, impl="saving",
                             median_ms=f"{saved:.5f}", note=f"unfused - fused per layer; x{LAYERS} layers = "
                                                           f"{saved * LAYERS:.3f} ms per 8B step"))
            print(f"  M={M}: fused saves {saved * 1e3:.2f} us per layer, {saved * LAYERS:.3f} ms per step", flush=True)
    finally:
        fl.SILU_MAX_M, fl.NORM_MAX_M = limits["silu"], limits["rms"]
    bench_plain_prefetch(dev, copy_gbps, rows, 1 << 12 if args.smoke else ROT_BYTES, args.smoke)
    for r in rows:
        r.update(device=device, commit=args.commit,
                 **{k: r.get(k, "") for k in FIELDS if k not in ("device", "commit")})
        kind = "silu" if r["case"].startswith("down") else "rms"
        if r["impl"].startswith("fused") and int(r["M"]) > limits[kind]:
            r["note"] += (f"; above the default {'SILU' if kind == 'silu' else 'NORM'}_MAX_M={limits[kind]} "
                          "(the model runs unfused here)")
    out = args.out or (pathlib.Path(tempfile.mkdtemp(prefix="fused_decode_")) if args.smoke
                       else bk.REPO / "results" / "kernels")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fused_decode_{device.replace(' ', '_')}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    if any(r["bit_identical"] == "NO" for r in rows):
        print("fused_decode_bench: a fused output differs from the unfused one (bit_identical NO)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
