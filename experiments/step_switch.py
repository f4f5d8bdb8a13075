#!/usr/bin/env python3
"""What a small step with prefill costs after decode-only steps, against the same step after one
like it (issue 12 §4).

In the prefix-saving sweeps a hit (a few new tokens over a cached prefix) is a lone step with
prefill between decode-only steps, while the runs without caching in small chunks
(`gpu_refit_runs.sh PS=mt64`) have their chunks over a prefix back to back. This replays, on one
engine with CUDA graphs (1B shape, random bf16 weights, pages in shuffled order), the same hit
step H (48 new tokens over a 1.5k prefix beside 3 decodes, the sweeps' median hit) in patterns:

- `H H H ...`: after itself (the same batch, its request known to the engine);
- `H H H ...` with a fresh request each time (its token ids made on first sight, as a hit's);
- `D^k H` for k = 1, 4, 16: after k decode-only steps D (batch 4, 1.5k context).

and D itself after D and after H. Per pattern: the engine step (CUDA events around batch building
and forward, what a replay records) and the host's wall time of `step`, medians over --repeats.
Every graph is captured before timing. Writes OUT (json). Needs CUDA, but for --host-only: the
same patterns on any machine through the engine's host path alone (batch building, the graph's
staging buffer, sampling's bookkeeping; each graph replaced by a no-op and the model by a tiny one
of the same vocabulary), so the host's share of a pattern's cost can be told from the GPU's.

    python experiments/step_switch.py --out results/gpu/step_switch_h200_<commit>.json [--page-sizes 16,1]
    python experiments/step_switch.py --out /tmp/host.json --host-only

--kernels: instead, H after H and H after 16 decode steps under the torch profiler (CUPTI records each kernel
node of a graph replay), --repeats rounds each: per kernel name its median summed duration in the step, and the
step's GPU span (first kernel start to last kernel end) against the kernels' summed time, and the last
H after H's records (kernels, copies; stream, start, duration) per page size. At feab757 (H200, pool of
131,072 slots in order, results/gpu/step_switch_kernels_h200_feab757.json) the step after 16 decode steps
showed no difference under the profiler (each profiled step starts on an idle GPU), and page 1's H spanned
0.06 ms more than page 16's with the same summed kernel time; at 7800f2d every page-1 layer's kernels, the
GEMMs included, ran 3-5 µs longer: the GPU's state in the process's second half, not the page size
(results/gpu_prefix_saving/README.md, session 42).

--first-use: instead, steps whose graph is captured inside them (as with engine.graph_warmup=decode, the
capture and the graph's first launch taken out of the step's time): hit steps of 10 token counts, each
in a graph of its own, each timed at its first replay and at its second; and H after the host slept
20 ms (the GPU idle, as during a capture) against H right after H. (At 155dbe6 this also A/B'd
launching a new graph 3 times more in the capture's time: no change, 1.796 against 1.790 ms, so
that knob was removed; results/gpu/step_switch_first_use_h200_155dbe6.json.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead as so  # noqa: E402  (make_batch, model_cfg)
from gpu_record import git_commit  # noqa: E402

from kvbench.calibrate import write_text_atomic  # noqa: E402
from kvbench.engines.gpu_engine import GPUEngine  # noqa: E402
from kvbench.engines.torch_engine import TorchEngine  # noqa: E402

HIT = [(1536, 48)] + [(1536, 1)] * 3
DECODE = [(1536, 1)] * 4


class HostOnly(GPUEngine):
    """The gpu engine's step without a GPU: graphs whose replay does nothing (`--host-only`)."""

    def __init__(self, cfg) -> None:
        TorchEngine.__init__(self, dataclasses.replace(cfg, num_layers=1, hidden_size=64, intermediate_size=128,
                                                       num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32",
                                                       checkpoint=None))
        self.cuda_graphs, self.graph_max_tokens, self.warmup, self.graph_warmup = True, 8192, False, "decode"
        self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len = 16, 8192, 16384
        self._graphs, self._graph_pool, self.graph_capture_s = {}, None, 0.0

    step = TorchEngine.step

    def kv_capacity_tokens(self, requested):
        return 131072

    def _capture(self, key, page_size, launch=False):
        g = self._graph_inputs(key, page_size)
        g.logits, g.graph = torch.zeros(key[1], self.cfg.vocab_size), SimpleNamespace(replay=lambda: None)
        self._graphs[key] = g
        return g


def kernel_times(eng, batch, timeline: list | None = None) -> dict[str, float]:
    """One profiled step: its GPU span and summed kernel time (ms), and each kernel name's summed
    duration (ms; the name cut at 60 characters). `timeline`: cleared and filled with the step's
    kernel, copy and set records in start order (name, stream, start and duration in µs from the
    first record's start)."""
    from torch.profiler import ProfilerActivity, profile

    from bench_kernels import kernel_records
    cuda = torch.cuda.is_available()  # (--host-only runs it on the CPU: no kernel records)
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        eng.step(batch)
        if cuda:
            torch.cuda.synchronize()
    gpu = kernel_records(prof, ("kernel", "gpu_memcpy", "gpu_memset"))
    ks = [e for e in gpu if e["cat"] == "kernel"]
    if not ks:  # (--host-only: no kernel ran)
        return {}
    if timeline is not None:
        timeline[:] = [dict(name=e["name"][:60], stream=e.get("tid"), start_us=round(e["ts"] - gpu[0]["ts"], 3),
                            dur_us=round(e["dur"], 3)) for e in gpu]
    out = {"GPU span": (max(k["ts"] + k["dur"] for k in ks) - ks[0]["ts"]) / 1e3,
           "kernels summed": sum(k["dur"] for k in ks) / 1e3}
    for k in ks:
        out[k["name"][:60]] = out.get(k["name"][:60], 0.0) + k["dur"] / 1e3
    return out


def timed(eng, batch) -> tuple[float, float]:
    t = time.perf_counter()
    dt = eng.step(batch)
    return dt * 1e3, (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama3_2_1b")
    ap.add_argument("--page-sizes", default="16,1")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--pool-tokens", type=int, default=0,
                    help="K/V pool size in tokens (default: what half the GPU's memory holds, millions of slots)")
    ap.add_argument("--order", choices=("shuffled", "sequential"), default="shuffled",
                    help="the pages the requests get: a random permutation of the pool's, or its first in order")
    ap.add_argument("--host-only", action="store_true", help="the host path alone, no GPU (see above)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--first-use", action="store_true", help="steps that capture their graph (see above)")
    mode.add_argument("--kernels", action="store_true", help="kernel durations of H after H / after decodes (see above)")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error(f"--repeats must be >= 3, got {args.repeats}")
    if args.pool_tokens < 0 or 0 < args.pool_tokens < 8192:
        ap.error(f"--pool-tokens must be 0 (default) or at least 8192 (the steps' pages), got {args.pool_tokens}")
    rows, timelines = [], {}
    for ps in map(int, args.page_sizes.split(",")):
        eng = HostOnly(so.model_cfg(args.model)) if args.host_only else GPUEngine(
            so.model_cfg(args.model), attention="triton", gpu_memory_utilization=0.5, cuda_graphs=True,
            max_model_len=16384)
        cap = args.pool_tokens or eng.kv_capacity_tokens(None)
        eng.bind(ps, cap // ps)
        order = np.arange(cap // ps, dtype=np.int32)
        if args.order == "shuffled":
            order = np.random.default_rng(1).permutation(order)
        hit, dec = so.make_batch(order, HIT, cap // ps, ps), so.make_batch(order, DECODE, cap // ps, ps)
        for b in (hit, dec, hit, dec):  # every graph captured (and launched once) before timing
            eng.step(b)
        got: dict[str, list] = {}

        def rec(name, batch, eng=eng):
            got.setdefault(name, []).append(timed(eng, batch))
        for _ in range(args.repeats if args.first_use else 0):
            eng.drop_graphs()
            for b in (hit, dec, hit, dec):
                eng.step(b)
            for t in range(20, 180, 16):  # 10 token buckets: a graph each, captured in its first step
                b = so.make_batch(order, [(1536, t)] + [(1536, 1)] * 3, cap // ps, ps)
                eng.step(dec)
                rec("first replay", b)
                eng.step(dec)
                rec("second replay", b)
            eng.step(hit)
            rec("H after H", hit)
            time.sleep(0.02)
            rec("H after 20 ms idle", hit)
        timeline: list = []
        for _ in range(args.repeats if args.kernels else 0):
            for name, before in (("H after H", [hit]), ("H after 16 D", [dec] * 16)):
                for b in before:
                    eng.step(b)
                for key, value in kernel_times(eng, hit, timeline if name == "H after H" else None).items():
                    got.setdefault(f"{name}: {key}", []).append((value, value))
        if timeline:
            timelines[ps] = timeline
        for _ in range(0 if args.first_use or args.kernels else args.repeats):
            eng.step(hit)
            rec("H after H", hit)
            rec("H after H, fresh request", so.make_batch(order, HIT, cap // ps, ps))
            for k in (1, 4, 16):
                for _ in range(k):
                    eng.step(dec)
                rec(f"H after {k} D", hit)
            rec("D after H", dec)
            rec("D after D", dec)
        for name, xs in got.items():
            step, host = np.median(np.array(xs), axis=0)
            rows.append(dict(model=args.model, page_size=ps, pool_tokens=cap, order=args.order, pattern=name, step_ms=float(step), host_ms=float(host),
                             n=len(xs)))
            print(json.dumps(rows[-1]), flush=True)
        del eng
        torch.cuda.empty_cache()
    out = dict(device="host path only (no GPU)" if args.host_only else torch.cuda.get_device_name(), commit=git_commit(), torch=torch.__version__,
               hit=HIT, decode=DECODE, rows=rows, **({"timeline_of_last_H_after_H": timelines} if timelines else {}))
    write_text_atomic(args.out, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
