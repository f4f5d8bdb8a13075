#!/usr/bin/env python3
"""A decode step's host part, short path against general, interleaved (issue 12 §3: the step goals).

The 8B shape, paged, 2k context, CUDA graphs, batch 1 and 64: `check_model_gpu.time_step` with
`torch_engine.FAST_DECODE_HOST` on and off, alternating which goes first each round (in
check_model_gpu's A/B the default is always timed first). Prints and writes every row (step and
graph replay ms, fraction of the roofline against a copy measured first) to --out.

    python experiments/host_path_ab.py --out results/gpu/host_path_ab.json --rounds 4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_model_gpu as cm  # noqa: E402  (experiments/check_model_gpu.py: time_step, model_cfg, copy_bandwidth)
from checkout import use_checkout  # noqa: E402  (experiments/checkout.py)
from gpu_record import git_commit  # noqa: E402  (experiments/gpu_record.py)
from kvbench.calibrate import write_text_atomic  # noqa: E402

use_checkout()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    from kvbench.engines import torch_engine
    bw = cm.copy_bandwidth(torch.device("cuda"))
    eng, wbytes, bpt, batches = cm.decode_setup()
    ctx, rows = 2048, []
    for b, batch in batches.items():
        for rnd in range(args.rounds):
            for fast in ((True, False) if rnd % 2 == 0 else (False, True)):
                torch_engine.FAST_DECODE_HOST = fast
                eng.drop_graphs()
                row = cm.time_step(eng, batch, True, b, ctx, "paged", wbytes, bpt, bw,
                                   variant="short host path" if fast else "general host path")
                rows.append(dict(row, round=rnd))
                print(f"b={b:2d} round {rnd} {row['variant']:17s} step {row['step_ms']:.3f} ms "
                      f"({row['frac_of_roofline']:.1%})  graph {row['gpu_ms']:.3f} ms "
                      f"({row['gpu_frac_of_roofline']:.1%})", flush=True)
        torch_engine.FAST_DECODE_HOST = True
        for fast in (True, False):
            m = cm.ab_medians([r for r in rows if r["batch"] == b and (r["variant"] == "short host path") == fast])
            print(f"b={b:2d} {'short' if fast else 'general'}: median step {m['step_ms']:.3f} ms ({m['frac']:.1%}), "
                  f"host part {m['host_us']:.0f} us", flush=True)
    out = dict(device=torch.cuda.get_device_name(), commit=git_commit(), copy_gbps=bw / 1e9, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
