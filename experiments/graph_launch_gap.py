"""How much of an 8B decode step's graph-replay time is the graph's launch (issue 12 §3).

`check_model_gpu --only timing` times a replay from an event recorded just before
`graph.replay()` to one just after, with the GPU idle before it: the host's launch of the graph
is inside the figure. This script times the same captured step (graph_kernels.build: 8B,
2k context, pages shuffled) four ways:

  - single: as check_model_gpu does (median of 20);
  - back-to-back: 10 replays between two events, per replay (launches overlap the GPU's work);
  - hidden: the GPU kept busy (torch.cuda._sleep) while the host launches, so the first event
    fires with the graph already queued;
  - the host time of the `replay()` call, and the profiler's cudaGraphLaunch and span.

At batch 64 with cuBLASLt the projections are other kernels than with the cuBLAS API, so both
are timed.

    python experiments/graph_launch_gap.py 64 1 [--out DIR]   # batch sizes; writes graph_launch_gap.json

Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from checkout import use_checkout  # noqa: E402
from graph_kernels import blas, build, captured, replay_ms  # noqa: E402


def event_ms(fn) -> float:
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s0.record()
    fn()
    s1.record()
    s1.synchronize()
    return s0.elapsed_time(s1)


def measure(tag: str, graph) -> dict:
    torch.cuda.synchronize()
    single = replay_ms(graph, 20)

    def ten():
        for _ in range(10):
            graph.replay()
    b2b = float(np.median([event_ms(ten) / 10 for _ in range(5)]))
    hidden = []
    for _ in range(10):
        torch.cuda._sleep(3_000_000)  # ~1-2 ms of GPU work queued ahead of the first event
        hidden.append(event_ms(graph.replay))
    host = []
    for _ in range(20):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        host.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launch = [e for e in events if "GraphLaunch" in e["name"]]
    row = dict(tag=tag, single_ms=single, back_to_back_ms=b2b, hidden_launch_ms=float(np.median(hidden)),
               host_replay_call_us=float(np.median(host)), gpu_nodes=len(gpu),
               cuda_graph_launch_us=launch[0]["dur"] if launch else None,
               span_us=gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("batch", type=int, nargs="+")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    use_checkout()
    rows = []
    for b in args.batch:
        eng, batch, _ = build(b, args.ctx)
        rows.append(measure(f"b{b} cublaslt", captured(eng, batch)))
        if b > 16:  # (projections of more than 16 rows run on cuBLAS(Lt))
            with blas("cublas"):
                rows.append(measure(f"b{b} cublas", captured(eng, batch)))
        del eng
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "graph_launch_gap.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
