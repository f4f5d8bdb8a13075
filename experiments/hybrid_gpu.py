"""The hybrid pool designs on the real model runner (issue 16, GPU part): one trace slice replayed
through paged (one uniform pool: the single-pool reference, every layer keeps every token) and
each of the four designs (hybrid_separate, hybrid_unified, hybrid_jenga, hybrid_radix: their own
K/V memory, each layer reading its own page table, kvbench.engines.torch_engine.HybridKV), with
greedy sampling on the chosen engine, at equal pool bytes (kv_capacity_tokens x bytes per token).

    python experiments/hybrid_gpu.py --out DIR [--model gemma3_1b_like] [--engine gpu|torch] [--limit N]
        [--trace shared_prefix|multi_turn] [--rate R] [--capacity TOKENS] [--dtype float32] [--eager]
        [KEY=VALUE ...]   (more Hydra overrides, e.g. model.num_experts=8)

Per design: requests whose greedy output equals paged's (and the share of output tokens before
the first difference), finished, throughput (req/s, output tok/s), TTFT mean/p50/p99, TPOT
mean/p50/p99, preemptions, peak and mean running, prefix hit rate, the K/V memory the engine
allocated (`kv_pool_bytes`) against the pool it accounts (`kv_capacity_bytes`), and the host time
spent reading the design's page tables; per request whose output differs from paged's, where it
first differs. Writes DIR/hybrid_gpu.json and DIR/hybrid_gpu.md after each design (each to a
temporary name, then renamed: a time limit keeps the designs that ran) and the run dirs
DIR/runs/<design>/.

Models: gemma3_1b_like (26 layers: 22 sliding window 512, 4 full; the 1B-class shape),
gpt_oss_like (24 layers alternating window 128 and full; its 32-expert MoE runs every expert
inside a CUDA graph, so a decode step reads ~38 GB of weights: use a smaller --limit, e.g. 100),
and for the CPU, toy sizes: tiny_hybrid (a 7-layer Llama with layer groups, window 32),
tiny_gemma3_1b and tiny_gpt_oss (the two architectures, window 32), e.g.
`--engine torch --model tiny_gpt_oss --limit 6 --dtype float32`. Random weights.
On the GPU, bf16 kernels may break a near-tie of random logits differently in differently
composed batches; `--dtype float32` narrows that to fp32 rounding. The fp32 Triton kernels take
minutes to compile on the GPU (ieee dots), so fp32 runs there use the torch attention over the
same pages: `--dtype float32 --eager engine.attention=reference`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

import kvbench.run as kvrun
from kvbench.provenance import git_commit
from kvbench.run import run, write_atomic
from kvbench.schema import ConfigError, register

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DESIGNS = ("paged", "hybrid_separate", "hybrid_unified", "hybrid_jenga", "hybrid_radix")
# per model: overrides, pool (token-equivalents), max_model_len, trace overrides for its size
_SMALL_TRACE = ["trace.question_len.mean=8", "trace.question_len.min=4", "trace.question_len.max=16",
                "trace.output_len.mean=8", "trace.output_len.min=4", "trace.output_len.max=12"]
MODELS = {
    # 16384 token-equivalents = 416 MiB for gemma (26624 B/token): paged holds ~12 shared-prefix
    # requests of ~1.3k tokens, the designs that drop window K/V about twice as many
    "gemma3_1b_like": dict(overrides=["model=gemma3_1b_like"], capacity=16384, max_model_len=4096,
                           shared_prefix=["trace.output_len.max=512"], multi_turn=["trace.output_len.max=512"]),
    "gpt_oss_like": dict(overrides=["model=gpt_oss_like"], capacity=16384, max_model_len=4096,
                         shared_prefix=["trace.output_len.max=512"], multi_turn=["trace.output_len.max=512"]),
    # the two architectures at toy sizes, for the CPU (their own layer patterns: gemma 6 local +
    # 1 global, gpt-oss 2 + 2; windows cut to 32)
    **{f"tiny_{arch}": dict(overrides=[f"model={arch}_like", "model.hidden_size=64",
                                       "model.intermediate_size=64", "model.num_heads=4", "model.num_kv_heads=2",
                                       "model.head_dim=16", "model.vocab_size=512", *extra],
                            capacity=2048, max_model_len=512,
                            shared_prefix=["trace.num_groups=2", "trace.system_len.value=100", *_SMALL_TRACE],
                            multi_turn=["trace.num_chats=3", "trace.user_len.mean=24", "trace.user_len.max=48",
                                        "trace.think_time_s=0.01", "trace.max_prompt_len=200", *_SMALL_TRACE[3:]])
       for arch, extra in (("gemma3_1b", ["model.num_layers=7", "model.layers.groups.local.window=32"]),
                           ("gpt_oss", ["model.num_layers=4", "model.num_experts=8",
                                        "model.layers.groups.sliding.window=32"]))},
    "tiny_hybrid": dict(overrides=["model=tiny", "model.num_layers=7", "model.tie_embeddings=false",
                                   "model.vocab_size=512",
                                   "+model.layers={pattern:[local,local,global],groups:{local:{kind:sliding,window:32},"
                                   "global:{kind:full}}}"],
                        capacity=1024, max_model_len=256,
                        shared_prefix=["trace.num_groups=2", "trace.system_len.value=48", *_SMALL_TRACE],
                        multi_turn=["trace.num_chats=3", "trace.user_len.mean=24", "trace.user_len.max=48",
                                    "trace.think_time_s=0.01", "trace.max_prompt_len=200", *_SMALL_TRACE[3:]]),
}
KEYS = ("finished", "rejected", "request_throughput", "output_throughput", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s",
        "tpot_mean_s", "tpot_p50_s", "tpot_p99_s", "preemptions", "peak_running", "mean_running", "prefix_hit_rate",
        "duration_s", "kv_pool_bytes", "kv_capacity_bytes", "table_build_s", "table_read_s", "kv_tables", "kv_layout",
        "num_steps", "wall_time_s", "cuda_graph_captures", "warmup_s")
MD_COLUMNS = (("design", "design"), ("finished", "finished"), ("rejected", "rejected"),
              ("identical", "identical_to_paged"), ("tok match", "tokens_matching_frac"),
              ("req/s", "request_throughput"), ("out tok/s", "output_throughput"), ("TTFT mean s", "ttft_mean_s"),
              ("TTFT p50 s", "ttft_p50_s"), ("TTFT p99 s", "ttft_p99_s"), ("TPOT mean ms", "tpot_mean_ms"),
              ("TPOT p99 ms", "tpot_p99_ms"), ("preempt", "preemptions"), ("peak run", "peak_running"),
              ("hit rate", "prefix_hit_rate"), ("KV MiB alloc / pool", "kv_mib"), ("tables s", "table_build_s"),
              ("tables % of run", "tables_pct"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        print(f"hybrid_gpu: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = _Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="gemma3_1b_like", choices=sorted(MODELS))
    ap.add_argument("--engine", default="gpu", choices=("gpu", "torch"))
    ap.add_argument("--limit", type=int, default=200, help="requests of the trace slice (>= 1)")
    ap.add_argument("--trace", default="shared_prefix", choices=("shared_prefix", "multi_turn"))
    ap.add_argument("--rate", default="inf", help="arrival rate (req/s, chats/s for multi_turn); inf: offline")
    ap.add_argument("--capacity", type=int, default=None, help="kv_capacity_tokens (default: per model)")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"), help="model.dtype override")
    ap.add_argument("--eager", action="store_true", help="gpu engine without CUDA graphs")
    ap.add_argument("--designs", default=",".join(DESIGNS), help="comma-separated subset (paged always runs)")
    ap.add_argument("set", nargs="*", metavar="KEY=VALUE",
                    help="more Hydra overrides for every design, e.g. model.num_experts=8 (the MoE's size does "
                         "not change the KV shapes the designs pool)")
    args = ap.parse_args(argv)
    if args.limit < 1:
        ap.error(f"--limit {args.limit}: must be >= 1")
    if args.capacity is not None and args.capacity < 1:
        ap.error(f"--capacity {args.capacity}: must be >= 1")
    try:
        if not float(args.rate) > 0:
            raise ValueError
    except ValueError:
        ap.error(f"--rate {args.rate}: must be a number > 0 or inf")
    designs = [d for d in args.designs.split(",") if d]
    if unknown := sorted(set(designs) - set(DESIGNS)):
        ap.error(f"--designs: unknown {unknown}; known: {', '.join(DESIGNS)}")
    args.designs = ["paged"] + [d for d in DESIGNS[1:] if d in designs]
    return args


def overrides(args: argparse.Namespace, design: str) -> list[str]:
    m = MODELS[args.model]
    ov = ["progress=false", "redo=true", *m["overrides"], f"strategy={design}", f"engine={args.engine}",
          "engine.sample=true", f"trace={args.trace}", f"trace.limit={args.limit}", f"trace.rate={args.rate}",
          *m[args.trace], f"kv_capacity_tokens={args.capacity or m['capacity']}", f"max_model_len={m['max_model_len']}"]
    if args.dtype:
        ov.append(f"model.dtype={args.dtype}")
    ov += args.set
    if args.engine == "gpu":
        ov.append(f"engine.cuda_graphs={str(not args.eager).lower()}")
    return ov


def compose_cfg(ov: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=ov)


def replay_design(args: argparse.Namespace, design: str) -> tuple[dict, dict[int, np.ndarray]]:
    """One run through kvbench.run.run; (its summary, {request id: greedy output ids})."""
    seen: list = []
    load = kvrun.load_trace

    def capture(cfg, *rest):  # the requests the run replays (their outputs hold the sampled ids)
        reqs = load(cfg, *rest)
        seen.append(reqs)
        return reqs

    kvrun.load_trace = capture
    try:
        summary = run(compose_cfg(overrides(args, design)), args.out / "runs" / design)
    finally:
        kvrun.load_trace = load
    return summary, {r.id: np.asarray(r.output).copy() for r in seen[0]}


def compare(got: dict[int, np.ndarray], ref: dict[int, np.ndarray]) -> tuple[int, float, list[list[int]]]:
    """(requests whose outputs are identical, share of output tokens before each request's first
    difference, [request id, index of its first differing token, output length] per request whose
    output differs)."""
    same, match, total, differ = 0, 0, 0, []
    for rid, r in ref.items():
        g = got.get(rid)
        total += len(r)
        if g is None or len(g) != len(r):
            continue
        diff = np.nonzero(g != r)[0]
        same += not len(diff)
        match += len(r) if not len(diff) else int(diff[0])
        if len(diff):
            differ.append([int(rid), int(diff[0]), len(r)])
    return same, (match / total if total else 1.0), differ


def markdown(res: dict) -> str:
    rows = []
    for r in res["designs"]:
        ms = {f"tpot_{k}_ms": None if r[f"tpot_{k}_s"] is None else 1e3 * r[f"tpot_{k}_s"] for k in ("mean", "p99")}
        cell = dict(r, **ms,
                    tables_pct=100 * r["table_build_s"] / r["duration_s"] if r["duration_s"] else 0.0,
                    kv_mib=f"{r['kv_pool_bytes'] / 2**20:.1f} / {r['kv_capacity_bytes'] / 2**20:.1f}",
                    identical_to_paged=f"{r['identical_to_paged']}/{r['num_requests']}")
        rows.append([f"{cell[k]:.3g}" if isinstance(cell[k], float) else "-" if cell[k] is None else str(cell[k])
                     for _, k in MD_COLUMNS])
    head = [c for c, _ in MD_COLUMNS]
    lines = [f"# Hybrid pool designs on engine={res['engine']} ({res['device']})", "",
             f"model {res['model']}{' ' + ' '.join(res['overrides']) if res.get('overrides') else ''}"
             f"{', ' + res['dtype'] if res.get('dtype') else ''}, trace {res['trace']} (limit {res['limit']}, rate {res['rate']}), pool "
             f"{res['kv_capacity_tokens']} token-equivalents, commit {res['commit']}, {res['date']}; paged is the "
             "single-pool reference (every layer keeps every token) measured in the same process.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "identical: requests whose greedy output equals paged's; tok match: output tokens before the first "
              "difference; KV MiB alloc / pool: K/V memory the engine allocated / the pool the design accounts; "
              "tables s: host time reading, checking and padding the design's page tables per step (the "
              "strategy.table() calls in it, table_read_s in the json, are not step time: a one-table "
              "strategy's table is read by the scheduler, outside the step; the rest is)."]
    return "\n".join(lines) + "\n"


def _free_device() -> None:
    """Let the next design's engine start from the memory the last one held (weights, pool, graphs)."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    register()
    out: list[dict] = []
    ref = None
    device = "cpu"
    for design in args.designs:
        t0 = time.perf_counter()
        try:
            s, outputs = replay_design(args, design)
        except (ConfigError, HydraException, OmegaConfBaseException, ValueError) as err:  # bad input, e.g. no GPU: one line
            root = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
            print(f"hybrid_gpu: error: {design}: {' '.join(str(root).split())}", file=sys.stderr)
            sys.exit(2)
        ref = outputs if ref is None else ref
        same, frac, differ = compare(outputs, ref)
        row = {"design": design, "num_requests": len(ref), "identical_to_paged": same, "tokens_matching_frac": frac,
               "differing_requests": differ, **{k: s.get(k) for k in KEYS}}
        row["table_build_s"] = row["table_build_s"] or 0.0
        row["table_read_s"] = row["table_read_s"] or 0.0
        device = s.get("device", device)
        out.append(row)
        print(f"hybrid_gpu: {design}: {same}/{len(ref)} identical, {s['output_throughput']:.1f} tok/s, "
              f"{s['preemptions']} preemptions, {time.perf_counter() - t0:.1f} s", flush=True)
        res = {"model": args.model, "engine": args.engine, "device": device, "trace": args.trace, "limit": args.limit,
               "rate": args.rate, "kv_capacity_tokens": args.capacity or MODELS[args.model]["capacity"],
               "dtype": args.dtype, "overrides": args.set, "cuda_graphs": args.engine == "gpu" and not args.eager,
               "commit": git_commit() or "?", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "designs": out}
        args.out.mkdir(parents=True, exist_ok=True)   # after each design: a time limit keeps what ran
        write_atomic(args.out / "hybrid_gpu.json", lambda p: p.write_text(json.dumps(res, indent=2, default=str) + "\n"))
        write_atomic(args.out / "hybrid_gpu.md", lambda p: p.write_text(markdown(res)))
        if args.engine == "gpu":
            _free_device()
    return res


if __name__ == "__main__":
    main()
