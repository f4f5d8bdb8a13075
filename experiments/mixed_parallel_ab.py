#!/usr/bin/env python3
"""Graphs of steps with prefill, one engine setting A/B on a GPU (issue 12 §4: a step with a
<=64-token prefill at most 1.5x a decode step of the same batch):

- --flag parallel: a mixed step's decode and extend attention as parallel branches of its CUDA
  graph (`kvbench.model.PARALLEL_MIXED`) against the serial graph;
- --flag copyin: a small step with prefill copying its page tables inside the graph
  (`gpu_engine.PREFILL_COPY_IN_BYTES`) against packing them and spreading them before the replay
  (with --page-size 1, radix's wide tables: their first columns in the graph's copy against all
  packed);
- --flag short_tiles: extend's short-chunk tiles as since 236432b (three stages; also launches of at most
  `EXTEND_SHORT_TOTAL` new tokens in all) against session 42's (two stages, at most 128 new tokens a
  request only); with --page-size 1 for radix's hit steps;
- --flag tile_walk: decode's page-table walk as the launcher picks it (a tile's pages at a time for split
  launches and pages of 1, else by division) against session 38's (a token at a time, by shift).

Both attention kernels of a hit step are a few programs per SM and latency-bound (1B shape, H200,
05c9e0e: extend 20 us a layer, decode of 15 rows 15 us), so run side by side the shorter one
hides under the other. Per model shape (random bf16 weights, pages of 16 in shuffled order),
interleaved over --rounds rounds (which goes first alternating), graphs recaptured per variant:
the engine step (median of 15) and the graph replay alone (CUDA events, median of 20), for the
hit steps (a 64-token extend over a cached 1k alone, beside 15 and beside 31 decodes), decode
steps of the same batch, and a 512-token chunk beside 63 decodes; max_model_len 16,384 (the
prefix-saving sweeps': the width of a step with prefill's page table).

    python experiments/mixed_parallel_ab.py --out results/gpu/mixed_parallel_ab_h200_<commit>.json [--flag copyin|short_tiles|tile_walk]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead as so  # noqa: E402  (make_batch, model_cfg, replay_ms)
from gpu_record import git_commit  # noqa: E402

from kvbench import model as kvmodel  # noqa: E402
from kvbench.calibrate import write_text_atomic  # noqa: E402
from kvbench.engines import gpu_engine  # noqa: E402
from kvbench.engines.gpu_engine import GPUEngine  # noqa: E402
from kvbench.kernels import decode_attention as dec  # noqa: E402
from kvbench.kernels._common import page_log2  # noqa: E402
from kvbench.kernels import extend_attention as ext  # noqa: E402

STEPS = {
    "hit: 64 new over 1k alone": [(1024, 64)],
    "decode b1 ctx1.1k": [(1100, 1)],
    "hit: 64 new over 1k + 15 decodes": [(1024, 64)] + [(1100, 1)] * 15,
    "decode b16 ctx1.1k": [(1100, 1)] * 16,
    "hit: 64 new over 1k + 31 decodes": [(1024, 64)] + [(1100, 1)] * 31,
    "decode b32 ctx1.1k": [(1100, 1)] * 32,
    "prefill 512 over 1k + 63 decodes": [(1024, 512)] + [(2048, 1)] * 63,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="llama3_2_1b,llama3_1_8b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--flag", choices=("parallel", "copyin", "short_tiles", "tile_walk"), default="parallel")
    ap.add_argument("--page-size", type=int, default=16,
                    help="pages of the pool (1: radix's token-level tables, 16,384 columns wide in a step with "
                         "prefill: copyin then A/Bs their first columns in the graph's copy against all packed)")
    args = ap.parse_args()
    if args.page_size < 1:
        ap.error(f"--page-size must be >= 1, got {args.page_size}")
    ps = args.page_size
    # (module, name, off value, on value) per setting the flag switches (a launcher keys its plans
    # on its config tables' identities: swapped tables make new plans)
    short = {**ext.EXTEND_SHORT_CONFIG, 64: dict(ext.EXTEND_SHORT_CONFIG[64], num_stages=2)}
    settings = {"parallel": [(kvmodel, "PARALLEL_MIXED", False, True)],
                "copyin": [(gpu_engine, "PREFILL_COPY_IN_BYTES", 0, gpu_engine.PREFILL_COPY_IN_BYTES)],
                "short_tiles": [(ext, "EXTEND_SHORT_CONFIG", short, ext.EXTEND_SHORT_CONFIG),
                                (ext, "EXTEND_SHORT_TOTAL", {}, ext.EXTEND_SHORT_TOTAL)],
                "tile_walk": [(dec, "DECODE_CONFIG", dict(dec.DECODE_CONFIG, TILE_WALK=False, PAGE_LOG2=page_log2(ps)),
                               dec.DECODE_CONFIG)]}[args.flag]
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    rows = []
    for name in args.models.split(","):
        eng = GPUEngine(so.model_cfg(name), attention="triton", gpu_memory_utilization=0.5, cuda_graphs=True,
                        max_model_len=16384)
        cap = eng.kv_capacity_tokens(None)
        eng.bind(ps, cap // ps)
        order = np.random.default_rng(1).permutation(cap // ps).astype(np.int32)
        for r in range(args.rounds):
            for label, parts in STEPS.items():
                batch = so.make_batch(order, parts, cap // ps, ps)
                for is_on in ((False, True) if r % 2 == 0 else (True, False)):
                    for mod, flag, off, on in settings:
                        setattr(mod, flag, on if is_on else off)
                    eng.drop_graphs()
                    for _ in range(3):
                        eng.step(batch)
                    step = float(np.median([eng.step(batch) for _ in range(15)])) * 1e3
                    row = dict(model=name, page_size=ps, step=label, on=is_on, round=r, step_ms=step,
                               graph_ms=so.replay_ms(eng))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        for mod, flag, off, on in settings:
            setattr(mod, flag, on)
        del eng
        torch.cuda.empty_cache()
    summary = []
    for name in args.models.split(","):
        for label in STEPS:
            for is_on in (False, True):
                got = [x for x in rows if (x["model"], x["step"], x["on"]) == (name, label, is_on)]
                summary.append(dict(model=name, step=label, on=is_on,
                                    step_ms=float(np.median([x["step_ms"] for x in got])),
                                    graph_ms=float(np.median([x["graph_ms"] for x in got]))))
    med = {(s["model"], s["step"], s["on"]): s for s in summary}
    ratios = [dict(model=m, hit=h, decode=d, on=p,
                   step_ratio=med[m, h, p]["step_ms"] / med[m, d, p]["step_ms"],
                   graph_ratio=med[m, h, p]["graph_ms"] / med[m, d, p]["graph_ms"])
              for m in args.models.split(",") for p in (False, True)
              for h, d in (("hit: 64 new over 1k alone", "decode b1 ctx1.1k"),
                           ("hit: 64 new over 1k + 15 decodes", "decode b16 ctx1.1k"),
                           ("hit: 64 new over 1k + 31 decodes", "decode b32 ctx1.1k"))]
    out = dict(device=torch.cuda.get_device_name(), commit=git_commit(), torch=torch.__version__,
               rounds=args.rounds, flag=args.flag,
               settings=[dict(name=f"{m.__name__}.{n}", off=repr(a), on=repr(b)) for m, n, a, b in settings],
               summary=summary,
               hit_over_decode=ratios, rows=rows)
    write_text_atomic(args.out, json.dumps(out, indent=1) + "\n")
    for s in summary + ratios:
        print(s)


if __name__ == "__main__":
    main()
