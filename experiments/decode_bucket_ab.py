#!/usr/bin/env python3
"""Decode steps of the 1B shape at the batch sizes an offline Azure replay runs (issue 12; the
5444c26 timelines: 129-256 rows replay the 256-row graph at 4.14 ms where 65-128 rows took 2.86
ms, and 1-token pages cost 18-28 % more than 16-token pages at the same K/V read), in one
process on a GPU:

- `engine.decode_buckets` pow2 against fine (gpu_engine.DECODE_BUCKETS), interleaved over
  --rounds rounds (which goes first alternating), per batch size and page size;
- each row: the engine step and the graph replay alone (`check_model_gpu.time_step`), against
  (weights read + K/V read) / the copy bandwidth measured at the start.

    python experiments/decode_bucket_ab.py --out results/gpu/decode_bucket_ab_h200_<commit>.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_model_gpu as cm  # noqa: E402  (decode_setup, time_step, copy_bandwidth)
from gpu_record import git_commit  # noqa: E402

from kvbench.calibrate import write_text_atomic  # noqa: E402
from kvbench.engines.gpu_engine import DECODE_BUCKETS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama3_2_1b")
    ap.add_argument("--batches", default="96,128,150,192,256", help="decode rows, comma list")
    ap.add_argument("--context", type=int, default=900, help="each request's context (the Azure runs': ~900)")
    ap.add_argument("--pages", default="16,1", help="page sizes, comma list")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    bw = cm.copy_bandwidth(torch.device("cuda"))
    rows = []
    for ps in map(int, args.pages.split(",")):
        batches = tuple(map(int, args.batches.split(",")))
        eng, wbytes, bpt, steps = cm.decode_setup(batches, args.context, ps, args.model)
        for r in range(args.rounds):
            for b in batches:
                for name in (("pow2", "fine") if r % 2 == 0 else ("fine", "pow2")):
                    eng.decode_sizes = DECODE_BUCKETS[name]
                    eng.drop_graphs()  # (time_step times the graph captured last: this batch's)
                    row = cm.time_step(eng, steps[b], True, b, args.context, f"page {ps}", wbytes, bpt, bw, name)
                    rows.append(dict(row, round=r, page_size=ps))
                    print(f"page {ps:3d} batch {b:3d} {name:4s} round {r}: step {row['step_ms']:.3f} ms, "
                          f"graph {row['gpu_ms']:.3f} ms", flush=True)
        del eng, steps
        torch.cuda.empty_cache()
    summary = []
    for (ps, b, name), g in _groups(rows):
        summary.append(dict(page_size=ps, batch=b, decode_buckets=name, step_ms=float(np.median([x["step_ms"] for x in g])),
                            gpu_ms=float(np.median([x["gpu_ms"] for x in g]))))
    out = dict(device=torch.cuda.get_device_name(), commit=git_commit(), model=args.model, context=args.context,
               copy_bytes_per_s=bw, summary=summary, rows=rows)
    write_text_atomic(args.out, json.dumps(out, indent=1) + "\n")
    for s in summary:
        print(s)


def _groups(rows: list[dict]):
    keys = sorted({(r["page_size"], r["batch"], r["variant"]) for r in rows}, key=lambda k: (-k[0], k[1], k[2]))
    return [(k, [r for r in rows if (r["page_size"], r["batch"], r["variant"]) == k]) for k in keys]


if __name__ == "__main__":
    main()
