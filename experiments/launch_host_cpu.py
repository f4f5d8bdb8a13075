"""The launchers' host Python on a plan hit, before/after, on a loaded CPU (no GPU needed).

    python experiments/launch_host_cpu.py --base DIR [--rounds 201] [--calls 200] [--only NAME ...] [--grad-mode]

Times the same tiny-shape calls as ``experiments/launch_overhead.py --cpu`` (its `cases`, with its
stubbed launches: CPU tensors report ``is_cuda``, a plan's launch does nothing, so a call times
its hit path without Triton's C launcher) for this checkout's kernels/ and for the kernels/
folder DIR (``git archive OLD kernels | tar -x -C /tmp/old`` gives /tmp/old/kernels), with a torch
``add_`` on a CPU tensor as the yardstick. Many short rounds, the versions and the yardstick
taking turns within each round, so a change in machine load hits them alike; CPU time of this
thread, not wall time (time sliced away to other processes is not counted). Prints per launcher
the median us per call of each version, the median of the per-round ratio after/before, and
each median against the yardstick's. A figure for comparing launcher code on one machine, not
a GPU figure (the GPU adds Triton's C launcher, ~4 us on an H200 host). Inputs are made and calls
run under ``torch.inference_mode()``, as the engine steps (--grad-mode: under grad mode, as this
script did before 2026-11-30; allocations and views cost more there).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"   # CPU tensors run only in Triton's interpreter (before triton is imported)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402

import launch_overhead as lo  # noqa: E402  (experiments/launch_overhead.py: cases, stubs)


def _round(fn, calls: int) -> float:
    """us per call of fn, in this thread's CPU time (time sliced away to other processes of a
    shared machine is not counted; wall time on a loaded 2-core machine swings 3x round to round)."""
    t = time.thread_time_ns()
    for _ in range(calls):
        fn()
    return (time.thread_time_ns() - t) / calls / 1e3


def alternating_rope(dev, k) -> tuple[str, object]:
    """rope_kv_write with a different qkv tensor each call (two taking turns), as the eager model
    calls it (a fresh projection output per layer): what a cache of views keyed on the qkv tensor
    cannot serve."""
    bf = torch.bfloat16
    Hq, Hkv, D = 4, 1, 64
    qkvs = [torch.randn(2, (Hq + 2 * Hkv) * D, device=dev, dtype=bf) for _ in range(2)]
    cos, sin = torch.randn(2, D, device=dev, dtype=bf), torch.randn(2, D, device=dev, dtype=bf)
    kc = torch.randn(64 * 16, Hkv, D, device=dev, dtype=bf)
    vc = torch.randn_like(kc)
    slots = torch.tensor([3, 70], device=dev, dtype=torch.int32)
    turn = [0]

    def call():
        turn[0] ^= 1
        return k.rope_kv_write(qkvs[turn[0]], cos, sin, kc, vc, slots, Hq, Hkv)
    return "rope_kv_write, qkv alternating", call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=pathlib.Path, required=True, help="the kernels/ folder to compare against")
    ap.add_argument("--rounds", type=int, default=201)
    ap.add_argument("--calls", type=int, default=200, help="calls per round and version")
    ap.add_argument("--only", nargs="*", help="launcher rows whose name starts with one of these")
    ap.add_argument("--grad-mode", action="store_true", help="time under grad mode, not torch.inference_mode")
    args = ap.parse_args()
    if not (args.base / "__init__.py").is_file():
        print(f"launch_host_cpu: --base {args.base}: no kernels package there (__init__.py)", file=sys.stderr)
        sys.exit(2)
    base = lo.load_kernels(args.base.resolve())
    dev = torch.device("cpu")
    kn, kb = lo.launchers(), lo.launchers(base)
    mode = contextlib.nullcontext() if args.grad_mode else torch.inference_mode()
    mode.__enter__()   # (kept for the whole run: inputs are inference tensors, as the engine's)
    new = lo.cases(dev, kn) + [alternating_rope(dev, kn)]
    old = lo.cases(dev, kb) + [alternating_rope(dev, kb)]
    yard = new[0][1]
    print(f"{'launcher':34s} {'after':>8s} {'before':>8s} {'after/before':>13s} {'x torch op':>11s}  (us, medians of "
          f"{args.rounds} rounds x {args.calls} calls)")
    with lo.stub_launches(("kvbench.kernels.", f"{base}.")):
        for (name, fa), (_, fb) in zip(new[1:], old[1:]):
            if args.only and not name.startswith(tuple(args.only)):
                continue
            if max(lo._first_call_s(fa), lo._first_call_s(fb)) > 0.01:
                print(f"{name:34s} skipped: no plan on the CPU (interpreted every call)")
                continue
            for fn in (fa, fb, yard):
                _round(fn, 20)
            ta, tb, ty, ratio = [], [], [], []
            for i in range(args.rounds):
                order = ((fa, ta), (fb, tb)) if i % 2 else ((fb, tb), (fa, ta))
                for fn, times in order:
                    times.append(_round(fn, args.calls))
                ty.append(_round(yard, args.calls))
                ratio.append(ta[-1] / tb[-1])
            ma, mb, my = statistics.median(ta), statistics.median(tb), statistics.median(ty)
            print(f"{name:34s} {ma:8.2f} {mb:8.2f} {statistics.median(ratio):13.3f} {ma / my:5.2f}/{mb / my:<5.2f}"
                  f"  (torch add_ {my:.2f})", flush=True)
    mode.__exit__(None, None, None)


if __name__ == "__main__":
    main()
