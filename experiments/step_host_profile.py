#!/usr/bin/env python3
"""Where a decode step's host part goes (issue 12 §3: the per-step goals), the 8B shape, paged, 2k
context, CUDA graphs, batch 1 and 64, in one process:

- the step and graph-replay times of `check_model_gpu.time_step`;
- the host part in pieces on the GPU's clock (`phases`), the replay call's host time, and the GPU
  operations of one replay (torch profiler);
- a cProfile of `step`: the functions with the most own time, µs per step (cProfile inflates
  Python calls; read the C calls -- copies, replays, event records -- and the ranking, not the sum);
- an interleaved A/B of one engine flag (--ab copy: `gpu_engine.GRAPH_COPIES_INPUTS`; --ab spin:
  `gpu_engine.SPIN_WAIT`), --rounds rounds, which variant goes first alternating.

    python experiments/step_host_profile.py --out results/gpu/step_host_profile.json [--ab spin] [--no-phases]

--prefill: the same phases and profile for steps with prefill instead (1B shape, graphs, pages of
16; step_overhead's batches: a 64-token extend over a cached 1k alone and beside 15 decodes, a
64-token prefill, and a 16-row decode), no A/B.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_model_gpu as cm  # noqa: E402  (experiments/check_model_gpu.py: time_step, model_cfg, copy_bandwidth)
from checkout import use_checkout  # noqa: E402  (experiments/checkout.py)
from gpu_record import git_commit  # noqa: E402  (experiments/gpu_record.py)
from kvbench.calibrate import write_text_atomic  # noqa: E402

use_checkout()


def _gpu_us(fn, n: int = 50) -> float:
    """Median µs from an event before `fn()` to one after it, the GPU idle before each call."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        fn()
        s1.record()
        s1.synchronize()
        times.append(s0.elapsed_time(s1) * 1e3)
    return float(np.median(times))


def phases(eng, batch, n: int = 200) -> dict:
    """The host part in pieces: `_flatten` alone (host µs, no GPU); on the GPU's clock the graph
    replay alone, an extra staging copy plus the replay, `_forward` (fill and replay), `_flatten` +
    `_forward`, `_run` and `step`; the replay call's own host time; one replay's GPU operations."""
    import time
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        eng._flatten(batch)
        t.append(time.perf_counter() - t0)
    with torch.inference_mode():  # (as `_run`: the staging buffers are inference tensors)
        h = eng._flatten(batch)
        eng._forward(h)  # (the graph of this batch, staged)
        g = next(reversed(eng._graphs.values()))
        rt = []
        for _ in range(20):  # the replay call's own host time (a launch returns before the GPU is done)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g.graph.replay()
            rt.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # what one replay runs on the GPU
            g.graph.replay()
            torch.cuda.synchronize()
        kinds: dict = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                kinds[e.name[:60]] = kinds.get(e.name[:60], 0) + 1
        print(f"  one replay: {sum(kinds.values())} GPU ops; " + "; ".join(
            f"{n} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:12]), flush=True)
        return dict(gpu_ops=sum(kinds.values()), gpu_op_kinds=kinds, flatten_host_us=float(np.median(t)) * 1e6, replay_call_host_us=float(np.median(rt)) * 1e6,
                    run_us=_gpu_us(lambda: eng._run(batch)),
                    flatten_forward_us=_gpu_us(lambda: eng._forward(eng._flatten(batch))),
                    replay_us=_gpu_us(g.graph.replay),
                    copy_replay_us=_gpu_us(lambda: (g.dev.copy_(g.host, non_blocking=True), g.graph.replay())),
                    forward_us=_gpu_us(lambda: eng._forward(h)), step_us=_gpu_us(lambda: eng.step(batch)))


def _profile_steps(eng, batch, calls: int, top: int) -> list[dict]:
    """cProfile of `calls` steps: the `top` functions by own time, µs and calls per step."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        eng.step(batch)
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt, nc, f"{Path(f).name}:{line}({name})") for (f, line, name), (cc, nc, tt, ct, _) in stats.items()),
                  reverse=True)[:top]
    return [dict(us=tt / calls * 1e6, calls=nc / calls, name=name) for tt, nc, name in rows]


def prefill_main(args) -> None:
    """--prefill: phases and profile of steps with prefill (step_overhead's batches, 1B)."""
    import step_overhead as so
    from kvbench.engines.gpu_engine import GPUEngine
    eng = GPUEngine(so.model_cfg("llama3_2_1b"), attention="triton", gpu_memory_utilization=0.5, cuda_graphs=True,
                    max_model_len=16384)
    cap = eng.kv_capacity_tokens(None)
    eng.bind(so.PS, cap // so.PS)
    order = np.random.default_rng(1).permutation(cap // so.PS).astype(np.int32)
    out = dict(device=torch.cuda.get_device_name(), commit=git_commit(), model="llama3_2_1b", steps=[])
    for label in ("extend 64 over 1k", "hit: 64 new over 1k cached + 15 decodes", "prefill 64", "decode b16 ctx1.1k"):
        batch = so.make_batch(order, so.steps()[label], cap // so.PS)
        eng.drop_graphs()
        for _ in range(3):
            eng.step(batch)
        step_ms = float(np.median([eng.step(batch) for _ in range(30)])) * 1e3
        row = dict(step=label, step_ms=step_ms, replay_ms=so.replay_ms(eng), **phases(eng, batch))
        row["profile"] = _profile_steps(eng, batch, args.calls, args.top)
        out["steps"].append(row)
        print(f"{label}: step {step_ms * 1e3:.0f} us, replay {row['replay_ms'] * 1e3:.0f} us; flatten "
              f"{row['flatten_host_us']:.0f} us (host); GPU clock: replay {row['replay_us']:.0f}, _forward "
              f"{row['forward_us']:.0f}, flatten + _forward {row['flatten_forward_us']:.0f}, _run {row['run_us']:.0f}, "
              f"step {row['step_us']:.0f} us; replay call {row['replay_call_host_us']:.0f} us (host); own time per "
              f"step under cProfile:", flush=True)
        for r in row["profile"]:
            print(f"  {r['us']:8.1f} us  {r['calls']:5.1f} calls  {r['name']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the A/B")
    ap.add_argument("--ab", choices=("copy", "spin"), default="copy",
                    help="copy: GRAPH_COPIES_INPUTS on/off; spin: SPIN_WAIT on/off (the step's wait for the GPU)")
    ap.add_argument("--no-phases", action="store_true", help="skip the profile and the phases (the A/B only)")
    ap.add_argument("--prefill", action="store_true", help="steps with prefill (1B), not the 8B decode")
    args = ap.parse_args()
    if args.prefill:
        return prefill_main(args)
    from kvbench.engines import gpu_engine
    dev = torch.device("cuda")
    bw = cm.copy_bandwidth(dev)
    eng, wbytes, bpt, batches = cm.decode_setup()
    ctx = 2048
    out = dict(device=torch.cuda.get_device_name(), commit=git_commit(),
               copy_gbps=bw / 1e9, batches=[], ab=[])
    for b, batch in batches.items():
        if not args.no_phases:
            row = cm.time_step(eng, batch, True, b, ctx, "paged", wbytes, bpt, bw)
            row.update(phases(eng, batch))
            profile = _profile_steps(eng, batch, args.calls, args.top)
            print(f"b={b}: step {row['step_ms']:.3f} ms ({row['frac_of_roofline']:.1%}), graph {row['gpu_ms']:.3f} ms "
                  f"({row['gpu_frac_of_roofline']:.1%}), host part {(row['step_ms'] - row['gpu_ms']) * 1e3:.0f} us; "
                  f"flatten {row['flatten_host_us']:.0f} us (host); GPU clock: replay {row['replay_us']:.0f}, copy + replay "
                  f"{row['copy_replay_us']:.0f}, _forward {row['forward_us']:.0f}, flatten + _forward "
                  f"{row['flatten_forward_us']:.0f}, _run {row['run_us']:.0f}, step {row['step_us']:.0f} us; "
                  f"replay call {row['replay_call_host_us']:.0f} us (host); "
                  f"own time per step under cProfile:", flush=True)
            for r in profile:
                print(f"  {r['us']:8.1f} us  {r['calls']:5.1f} calls  {r['name']}", flush=True)
            out["batches"].append(dict(row, profile=profile))
        # A/B of one engine flag (--ab), interleaved, which goes first alternating; graphs recaptured for each
        flag, names = {"copy": ("GRAPH_COPIES_INPUTS", ("copy in graph", "copy before replay")),
                       "spin": ("SPIN_WAIT", ("spin wait", "blocking wait"))}[args.ab]
        default = getattr(gpu_engine, flag)
        for rnd in range(args.rounds):
            for on in ((True, False) if rnd % 2 == 0 else (False, True)):
                setattr(gpu_engine, flag, on)
                eng.drop_graphs()
                r = cm.time_step(eng, batch, True, b, ctx, "paged", wbytes, bpt, bw, variant=names[not on])
                out["ab"].append(dict(r, round=rnd))
                print(f"b={b:2d} round {rnd} {r['variant']:18s} step {r['step_ms']:.3f} ms ({r['frac_of_roofline']:.1%})"
                      f"  graph {r['gpu_ms']:.3f} ms ({r['gpu_frac_of_roofline']:.1%})", flush=True)
        setattr(gpu_engine, flag, default)
        for v in names if args.rounds else ():
            m = cm.ab_medians([r for r in out["ab"] if r["batch"] == b and r["variant"] == v])
            print(f"b={b:2d} {v}: median step {m['frac']:.1%}, graph {m['gpu_frac']:.1%}, host part "
                  f"{m['host_us']:.0f} us", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
