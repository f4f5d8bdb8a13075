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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_model_gpu as cm  # noqa: E402  (decode_setup, time_step, copy_bandwidth)
from gpu_record import git_commit  # noqa: E402

from kvbench.calibrate import write_text_atomic  # noqa: E402
from kvbench.engines.gpu_engine import DECODE_BUCKETS  # noqa: E402


def int_list(text: str) -> tuple[int, ...]:
    """A comma list of positive ints (argparse: a bad one is one line and exit 2)."""
    try:
        got = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of ints") from None
    if not got or min(got) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama3_2_1b")
    ap.add_argument("--batches", type=int_list, default="96,128,150,192,256", help="decode rows, comma list")
    ap.add_argument("--context", type=int, default=900, help="each request's context (the Azure runs': ~900)")
    ap.add_argument("--pages", type=int_list, default="16,1", help="page sizes, comma list")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    bw = cm.copy_bandwidth(torch.device("cuda"))
    rows = []
    for ps in args.pages:
        eng, wbytes, bpt, steps = cm.decode_setup(args.batches, args.context, ps, args.model)
        for r in range(args.rounds):
            for b in args.batches:
                for name in (("pow2", "fine") if r % 2 == 0 else ("fine", "pow2")):
                    eng.decode_sizes = DECODE_BUCKETS[name]
                    eng.drop_graphs()  # (time_step times the graph captured last: this batch's)
                    row = cm.time_step(eng, steps[b], True, b, args.context, f"page {ps}", wbytes, bpt, bw, name)
                    rows.append(dict(row, round=r, page_size=ps))
                    print(f"page {ps:3d} batch {b:3d} {name:4s} round {r}: step {row['step_ms']:.3f} ms, "
                          f"graph {row['gpu_ms']:.3f} ms", flush=True)
        del eng, steps
        torch.cuda.empty_cache()
    keys = sorted({(r["page_size"], r["batch"], r["variant"]) for r in rows}, key=lambda k: (-k[0], k[1], k[2]))
    summary = [dict(page_size=ps, batch=b, decode_buckets=name, **cm.ab_medians(
        [r for r in rows if (r["page_size"], r["batch"], r["variant"]) == (ps, b, name)])) for ps, b, name in keys]
    out = dict(device=torch.cuda.get_device_name(), commit=git_commit(), model=args.model, context=args.context,
               copy_bytes_per_s=bw, summary=summary, rows=rows)
    write_text_atomic(args.out, json.dumps(out, indent=1) + "\n")
    for s in summary:
        print(s)



if __name__ == "__main__":
    main()
