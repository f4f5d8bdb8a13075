"""Engine step time against the GPU time of the step's kernels: how far the host's launches sit
above the GPU's work, for the steps issue 12 names.

    python experiments/step_overhead.py --out DIR [--models llama3_2_1b,llama3_1_8b]

Per model shape (random bf16 weights, pages of 16 in shuffled order unless --page-sizes / --order
say otherwise, max_model_len 16,384 as the prefix-saving sweeps: a step with prefill's table width) and step:
  step_ms  median engine step (CUDA events around batch building + forward), what a replay pays
  gpu_ms   the sum of the step's kernel durations (torch profiler), i.e. launch gaps excluded
  ratio    step_ms / gpu_ms (the goal for prefill and mixed steps: <= 1.15)
  replay_ms (graphs) the graph replay alone, CUDA events around it: step_ms - replay_ms is the
           host's part, replay_ms - gpu_ms the gaps between the graph's kernels
Steps: decode (batch 1 and 64, 2k context); one 512-token prefill chunk (over a 1k prefix)
with 63 decodes; a 2,048-token prefill; the shared-prefix hit (64 new tokens over a cached
1,024-token prefix, with 15 decodes) against a decode step of the same batch; and extends of 64,
512 and 1,024 new tokens over cached 1k / 4k prefixes against plain prefills of as many tokens. Eager unless the
row says graphs. Writes DIR/step_overhead.json. Needs CUDA.
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from checkout import use_checkout  # noqa: E402  (experiments/checkout.py)

use_checkout()

from check_model_gpu import model_cfg  # noqa: E402

from kvbench.batch import ScheduledSeq, StepBatch  # noqa: E402
from kvbench.engines import gpu_engine  # noqa: E402
from kvbench.engines.gpu_engine import GPUEngine  # noqa: E402
from kvbench.provenance import git_commit  # noqa: E402
from kvbench.request import Request  # noqa: E402

PS = 16
_RIDS = itertools.count()


def gpu_ms(eng, batch, top: int = 6) -> tuple[float, int]:
    """Sum of kernel durations of one step, the kernel count, and the `top` kernel names by time
    (ms summed over the step)."""
    from torch.profiler import ProfilerActivity, profile
    eng.step(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.step(batch)
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by: dict[str, float] = {}
    for e in evs:
        by[e.name[:50]] = by.get(e.name[:50], 0.0) + e.device_time_total / 1e3
    top = sorted(by.items(), key=lambda kv: -kv[1])[:top]
    return sum(e.device_time_total for e in evs) / 1e3, len(evs), {k: round(v, 3) for k, v in top}


def replay_ms(eng) -> float:
    """Median ms of the engine's one captured graph replayed alone (`graph_kernels.replay_ms`)."""
    from graph_kernels import replay_ms as graph_replay_ms
    (g,) = eng._graphs.values()
    return graph_replay_ms(g.graph)


def make_batch(order, parts, cap_pages, ps: int = PS) -> StepBatch:
    """parts: [(computed, new tokens)] per request (new == 1: a decode after a `computed`-token
    prompt; else a prefill chunk); request i gets its own run of shuffled pages."""
    seqs, at = [], 0
    for i, (done, new) in enumerate(parts):
        total = done + new
        n = -(-total // ps)
        ids = np.random.default_rng(i).integers(0, 32000, done if new == 1 else total).astype(np.int32)
        # a fresh request id per batch: the engine keeps each request id's token ids
        seqs.append(ScheduledSeq(Request(next(_RIDS), 0.0, ids, np.zeros(3, np.int32)), done, new, order[at:at + n]))
        at += n
    return StepBatch(seqs, ps, cap_pages, False, [])


def steps():
    return {
        "decode b1 ctx2k": [(2048, 1)],
        "decode b64 ctx2k": [(2048, 1)] * 64,
        "prefill 512 over 1k + 63 decodes": [(1024, 512)] + [(2048, 1)] * 63,
        "prefill 2048": [(0, 2048)],
        "hit: 64 new over 1k cached + 15 decodes": [(1024, 64)] + [(1100, 1)] * 15,
        "decode b16 ctx1.1k": [(1100, 1)] * 16,
        # extend over a cached prefix against a plain prefill of as many new tokens (issue 12 §4)
        "prefill 64": [(0, 64)],
        "extend 64 over 1k": [(1024, 64)],
        "prefill 512": [(0, 512)],
        "extend 512 over 1k": [(1024, 512)],
        "extend 512 over 4k": [(4096, 512)],
        "prefill 1024": [(0, 1024)],
        "extend 1024 over 4k": [(4096, 1024)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--models", default="llama3_2_1b,llama3_1_8b")
    ap.add_argument("--graphs", default="0,1", help="engine.cuda_graphs settings to time (0, 1 or both)")
    ap.add_argument("--steps", default="", help="only these steps (comma-separated labels; default all)")
    ap.add_argument("--profile", default="", help="cProfile the host side of these steps (comma-separated labels)")
    ap.add_argument("--top", type=int, default=6, help="kernel names (by summed time) each row lists")
    ap.add_argument("--page-sizes", default="16",
                    help="page sizes to time, comma-separated (1: radix's token-level table; 16: paged's)")
    ap.add_argument("--order", choices=("shuffled", "in"), default="shuffled",
                    help="pages of the pool in shuffled order (a pool after churn) or in order (a fresh one)")
    ap.add_argument("--copy-in-bytes", type=int, default=None,
                    help="gpu_engine.PREFILL_COPY_IN_BYTES (default: the engine's): a larger value copies "
                         "wide page tables whole inside the graph")
    ap.add_argument("--graph-max-tokens", type=int, default=8192,
                    help="engine.graph_max_tokens: steps with more prefill tokens run eagerly")
    args = ap.parse_args()
    if args.top < 1:
        print(f"step_overhead: error: --top must be >= 1, got {args.top}", file=sys.stderr)
        sys.exit(2)
    try:
        page_sizes = [int(x) for x in args.page_sizes.split(",")]
    except ValueError:
        page_sizes = [0]
    if min(page_sizes) < 1:
        print(f"step_overhead: error: --page-sizes must be positive ints, got {args.page_sizes!r}", file=sys.stderr)
        sys.exit(2)
    if args.copy_in_bytes is not None:
        if args.copy_in_bytes < 0:
            print(f"step_overhead: error: --copy-in-bytes must be >= 0, got {args.copy_in_bytes}", file=sys.stderr)
            sys.exit(2)
        gpu_engine.PREFILL_COPY_IN_BYTES = args.copy_in_bytes
    unknown = set(filter(None, args.steps.split(","))) - set(steps())
    if unknown:
        print(f"step_overhead: error: unknown --steps {sorted(unknown)}; known: {list(steps())}", file=sys.stderr)
        sys.exit(2)
    commit = git_commit() or "unknown"
    out = dict(device=torch.cuda.get_device_name(), commit=commit, torch=torch.__version__, rows=[])
    for name, ps in itertools.product(args.models.split(","), page_sizes):
        eng = GPUEngine(model_cfg(name), attention="triton", gpu_memory_utilization=0.5,
                        graph_max_tokens=args.graph_max_tokens, max_model_len=16384)
        cap = eng.kv_capacity_tokens(None)
        eng.bind(ps, cap // ps)
        order = np.arange(cap // ps, dtype=np.int32)
        if args.order == "shuffled":
            order = np.random.default_rng(1).permutation(order)
        for graphs in [bool(int(g)) for g in args.graphs.split(",")]:
            eng.cuda_graphs = graphs
            for label, parts in steps().items():
                if args.steps and label not in args.steps.split(","):
                    continue
                batch = make_batch(order, parts, cap // ps, ps)
                if graphs:
                    eng.drop_graphs()  # (this step's graph the only one: `replay_ms`)
                for _ in range(3):
                    eng.step(batch)
                t = float(np.median([eng.step(batch) for _ in range(15)])) * 1e3
                g, n, top = gpu_ms(eng, batch, args.top)
                row = dict(model=name, page_size=ps, order=args.order, copy_in_bytes=gpu_engine.PREFILL_COPY_IN_BYTES, step=label, cuda_graphs=graphs, step_ms=round(t, 3), gpu_ms=round(g, 3),
                           kernels=n, ratio=round(t / g, 3), graph_max_tokens=args.graph_max_tokens, tokens=sum(p[1] for p in parts), top_kernels_ms=top)
                if graphs and len(eng._graphs) == 1:
                    # the replay alone (CUDA events around it, the GPU idle before): step - replay is
                    # the host's part, replay - gpu_ms the gaps between the graph's kernels
                    row["replay_ms"] = round(replay_ms(eng), 3)
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                if label in args.profile.split(","):
                    import cProfile
                    import io
                    import pstats
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(20):
                        eng.step(batch)
                    pr.disable()
                    s = io.StringIO()
                    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
                    print(s.getvalue()[:6000], flush=True)
        del eng
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_overhead.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
