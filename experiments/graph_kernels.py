"""Where an 8B decode step's CUDA-graph replay spends its time, kernel by kernel (issue 12 §3).

The Llama-3.1-8B shape (random weights) decodes one token per request after a 2k context, paged
in shuffled page order, as `check_model_gpu.py --only timing` does. The step's graph is replayed
under the torch profiler (CUPTI records each kernel node of a replay), and each kernel gets

  - its duration, and
  - its share of the replay's critical path: the time from the later of its start and the end of
    every kernel before it to its own end (PDL lets a kernel start before the one before it ends;
    this counts each overlapped microsecond once, so the shares add up to the replay's span).

Kernels are grouped by name. With `--decode-config` and `--rms-warps` the same replay is timed
under other launch configs of the decode attention and RMSNorm kernels, interleaved with the
default (CUDA events, medians), which tells what a config is worth inside the step.

    python experiments/graph_kernels.py --batch 64 [--decode-config BLOCK_N=128,num_warps=8,num_stages=1]

Prints the tables; with --out, writes graph_kernels_b<batch>.json there. Needs CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from check_model_gpu import copy_bandwidth, model_cfg  # noqa: E402
from checkout import use_checkout  # noqa: E402
from bench_kernels import kernel_records  # noqa: E402  (experiments/bench_kernels.py)


def build(batch_size: int, ctx: int):
    """The 8B engine, bound, and a decode batch as check_model_gpu.time_decode makes it."""
    from kvbench.batch import ScheduledSeq, StepBatch
    from kvbench.engines.gpu_engine import GPUEngine
    from kvbench.model import kv_bytes_per_token
    from kvbench.request import Request
    cfg = model_cfg("llama3_1_8b")
    eng = GPUEngine(cfg, attention="triton", gpu_memory_utilization=0.9)
    cap, ps = eng.kv_capacity_tokens(None), 16
    eng.bind(ps, cap // ps)
    order = np.random.default_rng(1).permutation(cap // ps).astype(np.int32)
    n = -(-(ctx + 1) // ps)
    reqs = [Request(i, 0.0, np.random.default_rng(i).integers(0, 32000, ctx).astype(np.int32),
                    np.zeros(3, np.int32)) for i in range(batch_size)]
    batch = StepBatch([ScheduledSeq(r, ctx, 1, order[i * n:(i + 1) * n]) for i, r in enumerate(reqs)], ps,
                      cap // ps, False, [])
    roofline_bytes = eng.model.step_weight_bytes() + batch_size * (ctx + 1) * kv_bytes_per_token(cfg)
    return eng, batch, roofline_bytes


def captured(eng, batch):
    eng.drop_graphs()
    eng.cuda_graphs = True
    for _ in range(3):
        eng.step(batch)
    return next(reversed(eng._graphs.values())).graph


def replay_ms(graph, n: int = 20) -> float:
    times = []
    for _ in range(n):
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        graph.replay()
        s1.record()
        s1.synchronize()
        times.append(s0.elapsed_time(s1))
    return float(np.median(times))


def kernel_table(graph) -> tuple[list[dict], float]:
    """Per kernel name: count, summed duration and critical-path share (µs) of one replay."""
    from torch.profiler import ProfilerActivity, profile
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ks = kernel_records(prof)
    by: dict[str, list[float]] = {}
    frontier = ks[0]["ts"]
    for e in ks:
        start, end = e["ts"], e["ts"] + e["dur"]
        share = max(0.0, end - max(start, frontier))
        frontier = max(frontier, end)
        row = by.setdefault(e["name"][:70], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += e["dur"]
        row[2] += share
    span = frontier - ks[0]["ts"]
    rows = [dict(name=k, count=c, dur_us=round(d, 1), path_us=round(p, 1)) for k, (c, d, p) in by.items()]
    return sorted(rows, key=lambda r: -r["path_us"]), span


@contextlib.contextmanager
def blas(lib: str | None = None, bf16_reduction: bool | None = None):
    """cuBLAS settings for the projections of more than 16 rows (F.linear)."""
    m = torch.backends.cuda.matmul
    saved = torch.backends.cuda.preferred_blas_library(), m.allow_bf16_reduced_precision_reduction
    if lib:
        torch.backends.cuda.preferred_blas_library(lib)
    if bf16_reduction is not None:
        m.allow_bf16_reduced_precision_reduction = bf16_reduction
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(saved[0])
        m.allow_bf16_reduced_precision_reduction = saved[1]


@contextlib.contextmanager
def splitk_down(cfg: dict):
    """The down projection (K = 14336) of 17-64 rows on gemv_sweep's split-K kernel instead of cuBLAS."""
    import types

    import torch.nn.functional as F
    import triton

    from gemv_sweep import _gemm_splitk_kernel
    from kvbench.kernels import _common
    from kvbench.kernels import linear as lin
    part = torch.empty(cfg["SPLIT"] * 64 * 4096, device="cuda", dtype=torch.float32)
    lock = torch.zeros(4096, device="cuda", dtype=torch.int32)

    def linear(x, w, b=None):
        M, K = x.shape
        N = w.shape[0]
        if not (16 < M <= 64 and K == 14336 and b is None):
            return F.linear(x, w, b)
        y = x.new_empty(M, N)
        _gemm_splitk_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT"])](
            x, w, w, y, part, lock, M, N, K, x.stride(0), w.stride(0), y.stride(0), HAS_BIAS=False, DOT_F32=False,
            DOT_PREC="tf32", BLOCK_M=64, **cfg, **_common.pdl_args(x.device))
        return y
    saved = lin.F
    lin.F = types.SimpleNamespace(linear=linear)
    try:
        yield
    finally:
        lin.F = saved


@contextlib.contextmanager
def variant(decode: dict | None, rms_warps: int | None):
    from kvbench.kernels import decode_attention as dmod
    from kvbench.kernels import rms_norm as rmod
    saved = dmod.DECODE_CONFIG, rmod.rms_norm.__kwdefaults__["num_warps"]
    if decode:
        dmod.DECODE_CONFIG = dict(saved[0], **decode)
    if rms_warps:
        rmod.rms_norm.__kwdefaults__["num_warps"] = rms_warps
    try:
        yield
    finally:
        dmod.DECODE_CONFIG = saved[0]
        rmod.rms_norm.__kwdefaults__["num_warps"] = saved[1]


def parse_cfg(s: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in s.split(","))} if s else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--decode-config", action="append", default=[],
                    help="a decode attention config to A/B (repeatable), e.g. BLOCK_N=128,num_warps=8,num_stages=1")
    ap.add_argument("--rms-warps", type=int, action="append", default=[], help="RMSNorm num_warps to A/B (repeatable)")
    ap.add_argument("--blas", action="append", default=[], help="preferred BLAS library to A/B (cublas, cublaslt)")
    ap.add_argument("--bf16-reduction-off", action="store_true",
                    help="A/B cuBLAS without bf16 reduced-precision reductions")
    ap.add_argument("--splitk-down", default="",
                    help="A/B the down projection on gemv_sweep's split-K kernel, e.g. "
                         "BLOCK_N=64,BLOCK_K=128,SPLIT=2,num_warps=4,num_stages=5")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the A/B")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    use_checkout()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    eng, batch, nbytes = build(args.batch, args.ctx)
    roof_ms = nbytes / bw * 1e3
    print(f"device {torch.cuda.get_device_name()} copy {bw / 1e9:.1f} GB/s; 8B decode batch {args.batch} x "
          f"{args.ctx}: roofline {roof_ms:.3f} ms", flush=True)
    g = captured(eng, batch)
    rows, span = kernel_table(g)
    ms = replay_ms(g)
    print(f"replay {ms:.3f} ms = {roof_ms / ms:.1%} of the roofline; profiled span {span / 1e3:.3f} ms, "
          f"{sum(r['count'] for r in rows)} kernels")
    print(f"{'kernel':70s} {'n':>4s} {'dur µs':>9s} {'path µs':>9s} {'path %':>7s}")
    for r in rows:
        print(f"{r['name']:70s} {r['count']:4d} {r['dur_us']:9.1f} {r['path_us']:9.1f} {r['path_us'] / span:7.1%}")
    variants = [("default", contextlib.nullcontext)]
    variants += [(f"decode {c}", lambda c=c: variant(parse_cfg(c), None)) for c in args.decode_config]
    variants += [(f"rms_norm num_warps={w}", lambda w=w: variant(None, w)) for w in args.rms_warps]
    variants += [(f"BLAS {lib}", lambda lib=lib: blas(lib)) for lib in args.blas]
    if args.bf16_reduction_off:
        variants.append(("cuBLAS, no bf16 reduced-precision reduction", lambda: blas(bf16_reduction=False)))
    if args.splitk_down:
        variants.append((f"down on split-K {args.splitk_down}", lambda: splitk_down(parse_cfg(args.splitk_down))))
    ab: dict[str, list[float]] = {name: [] for name, _ in variants}
    if len(variants) > 1:
        for _ in range(args.rounds):
            for name, make in variants:
                with make():
                    ab[name].append(replay_ms(captured(eng, batch)))
        print("A/B (graph replay, median of 20 per round; rounds interleaved):")
        for name, t in ab.items():
            print(f"  {name:50s} {np.median(t):.3f} ms = {roof_ms / np.median(t):.1%}   rounds "
                  + " ".join(f"{x:.3f}" for x in t))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        res = dict(device=torch.cuda.get_device_name(), copy_gbps=bw / 1e9, batch=args.batch, ctx=args.ctx,
                   roofline_ms=roof_ms, replay_ms=ms, span_us=span, kernels=rows, ab=ab)
        tmp = args.out / f".graph_kernels_b{args.batch}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.out / f"graph_kernels_b{args.batch}.json")


if __name__ == "__main__":
    main()
