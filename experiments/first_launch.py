"""Steps with prefill that were the first replay of their CUDA graph, against later replays of
the same shape, in GPU runs made with engine.graph_warmup=decode or none (graphs of steps with
prefill captured on first use): the cost of a graph's first launch left in the step's time.

    python experiments/first_launch.py RUN_DIR [RUN_DIR ...] [--out FILE.md] [--title LINE]

A step's graph is approximated from the timeline by (token bucket of its prefill tokens, batch
bucket of its decode rows): the prefill-request bucket, also part of the key, is not recorded,
so a "first" step here may share a graph with an earlier one (it then counts as later than it
is, never the other way). Per run and bin of prefill tokens: the median step time of first and
later steps, and each over the median decode-only step of the same batch size."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_checkout  # noqa: E402
from gpu_strategies import md_table  # noqa: E402

use_checkout()
from kvbench.calibrate import write_text_atomic  # noqa: E402
from kvbench.engines.gpu_engine import batch_bucket, token_bucket  # noqa: E402

BINS = [(1, 64), (65, 256), (257, 1024), (1025, 2048), (2049, 8192)]


def rows(run: Path) -> list[dict]:
    t = pd.read_parquet(run / "timeline.parquet")
    s = json.loads((run / "summary.json").read_text())
    p = t[t.prefill_tokens > 0].copy()
    p["key"] = [(token_bucket(int(a)), batch_bucket(int(b)) if b else 0) for a, b in zip(p.prefill_tokens, p.decode_tokens)]
    p["first"] = ~p.key.duplicated()
    decode = t[t.prefill_tokens == 0].groupby("decode_tokens").dt_s.median()
    p["x_decode"] = p.dt_s / p.decode_tokens.map(decode)
    out = []
    for lo, hi in BINS:
        q = p[p.prefill_tokens.between(lo, hi)]
        first, later = q[q["first"]], q[~q["first"]]
        if first.empty or later.empty:
            continue
        out.append({"run": "/".join(run.parts[-2:]), "graph_warmup": s.get("graph_warmup"),
                    "captures in the replay": s.get("cuda_graph_captures_in_replay"),
                    "prefill tokens": f"{lo}-{hi}", "steps first / later": f"{len(first)} / {len(later)}",
                    "ms first / later": f"{1e3 * first.dt_s.median():.2f} / {1e3 * later.dt_s.median():.2f}",
                    "x decode step first / later": f"{first.x_decode.median():.2f} / {later.x_decode.median():.2f}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--title", default="", help="a line over the table (device, commits)")
    args = ap.parse_args()
    for run in args.runs:
        if not ((run / "timeline.parquet").is_file() and (run / "summary.json").is_file()):
            ap.error(f"{run} is not a finished run dir (timeline.parquet and summary.json)")
    df = pd.DataFrame([r for run in args.runs for r in rows(run)])
    text = (args.title + "\n\n" if args.title else "") + md_table(df)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
