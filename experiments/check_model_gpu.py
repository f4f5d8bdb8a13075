"""GPU check of the model runner: correctness at a real shape, and decode speed vs the roofline.

1. Llama-3.2-1B shape, bf16 and fp32, random weights: logits of `GPUEngine` (Triton kernels, paged
   page_size-16 tables in shuffled page order, mixed prefill/decode batches, 8 greedy decode
   steps) against `transformers.LlamaForCausalLM` on the same GPU and weights (one full-sequence
   forward per request); also the same engine on the kernels' torch references, and decode
   steps replayed through CUDA graphs against eager.
2. Llama-3.1-8B shape, bf16, random weights: one decode step at batch 1 and at batch 64 with
   2k context each, paged (shuffled pages) and slab (contiguous) tables, eager and CUDA graphs,
   against the roofline: (weight bytes the step reads, i.e. all but the input embedding table, +
   K/V bytes read) / device-to-device copy bandwidth measured here on a 2 GiB copy. The paged
   graph steps are A/B'd in the same run against: other programmatic-dependent-launch modes and
   (batch 1) cuBLAS for the projections and other split-KV settings.
3. Gemma-3 (gemma3_1b_like: the whole 1B shape) and gpt-oss (gpt_oss_like's layer shapes, 4 layers
   of 8 experts, top-4) against transformers' Gemma3ForCausalLM / GptOssForCausalLM, bf16 and
   fp32, as in 1. but with HF's random init copied into our engine (norms, sinks and biases
   re-drawn so they matter); prompts past the sliding window. Verdict per row: fp32 rel err
   <= 1e-4; bf16 no further from HF fp32 than HF bf16 is (x 1.5 + 1e-3). Skipped, with the
   reason printed, where this transformers lacks the architecture.

    python experiments/check_model_gpu.py --out results/gpu     (needs CUDA + transformers)
    python experiments/check_model_gpu.py --only gemma3,gpt_oss   (just 3., about a minute)
    python experiments/check_model_gpu.py --only gemma3 --cpu-smoke   (3. on CPU at toy shapes)
Parts (--only, comma list; default all): llama (1.), timing (2.), gemma3, gpt_oss (3.).
Writes check_model_gpu.json to --out (default $OUT or results/gpu).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from checkout import use_checkout  # noqa: E402  (experiments/checkout.py)


def model_cfg(name: str):
    import yaml  # PyYAML (a transformers dependency); no hydra on the device
    from kvbench.model import ModelConfig
    return ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text()))


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20), after
    0.3 s of the same copies: an idle H200 clocks its SMs down to 345 MHz, and three warm-up
    copies left the measurement up to 3 % low (4.12 against 4.22 TB/s in one process each on
    the same host, 2026-12-01), which flatters every fraction of the roofline."""
    n = 2 * 2**30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t_end = time.perf_counter() + 0.3
    while time.perf_counter() < t_end:
        b.copy_(a)
        torch.cuda.synchronize(device)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / float(np.median(times))


def hf_from_ours(eng, dtype: torch.dtype | None = None):
    """transformers.LlamaForCausalLM with the engine's weights (cast to `dtype`, default the
    engine's), on the engine's device."""
    import transformers
    from kvbench.model import hf_tensor_map
    c = eng.cfg
    rope = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        rope.update(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    shape = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_embeddings, max_position_embeddings=131072)
    try:  # transformers 5
        cfg = transformers.LlamaConfig(rope_parameters=rope, **shape)
    except TypeError:  # transformers 4
        theta = rope.pop("rope_theta")
        cfg = transformers.LlamaConfig(rope_theta=theta, rope_scaling=rope, **shape)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hf = hf.to(dtype or eng.model.embed.weight.dtype).to_empty(device=eng.device).eval()
    rot = hf.model.rotary_emb  # its buffers are empty after to_empty: ours equal HF's (tested)
    rot.inv_freq = eng.model.inv_freq.clone()
    if hasattr(rot, "original_inv_freq"):
        rot.original_inv_freq = eng.model.inv_freq.clone()
    sd = hf.state_dict()
    with torch.no_grad():
        for name, src in hf_tensor_map(eng.model):
            sd[name].copy_(src)
        if c.tie_embeddings:
            hf.lm_head.weight.copy_(eng.model.embed.weight)
    return hf


def drive(eng, reqs, tables, page_size, num_pages, chunk=512, graphs_too=False):
    """Toy scheduler: request i joins at step i; prefill chunks of `chunk`, then decode.
    Returns ({rid: logits [output_len, vocab] fp32}, max |eager - graph| over the steps a graph
    replays: decode steps, and steps with prefill of up to `graph_max_tokens` tokens)."""
    from kvbench.batch import ScheduledSeq, StepBatch
    pos = {r.id: 0 for r in reqs}
    got = {r.id: [] for r in reqs}
    graph_err, step = 0.0, 0
    while any(pos[r.id] < r.kv_len for r in reqs):
        seqs = []
        for i, r in enumerate(reqs):
            s = pos[r.id]
            if step < i or s >= r.kv_len:
                continue
            n = min(chunk, r.prompt_len - s) if s < r.prompt_len else 1
            seqs.append(ScheduledSeq(r, s, n, tables[r.id][:-(-(s + n) // page_size)]))
        batch = StepBatch(seqs, page_size, num_pages, False, [])
        eng.step(batch)
        logits = {k: v.float() for k, v in eng.last_logits.items()}
        if graphs_too and sum(sq.num_new for sq in seqs) <= eng.graph_max_tokens:  # decode or mixed
            eng.cuda_graphs = True  # same batch again: rewrites the same K/V, replays a graph
            eng.step(batch)
            eng.cuda_graphs = False
            graph_err = max(graph_err, max((eng.last_logits[k].float() - v).abs().max().item()
                                           for k, v in logits.items()))
        for sq in seqs:
            pos[sq.request.id] += sq.num_new
            if sq.emits_token:
                got[sq.request.id].append(logits[sq.request.id])
        step += 1
    return {k: torch.stack(v) for k, v in got.items()}, graph_err


def check_correctness(res: dict, dtype: str) -> None:
    """Engine (triton, then reference attention) vs transformers at the same dtype; for bf16
    also both against transformers in fp32 on the same (upcast) weights: the noise floor."""
    from dataclasses import replace

    from kvbench.engines.gpu_engine import GPUEngine
    from kvbench.request import Request
    cfg = replace(model_cfg("llama3_2_1b"), dtype=dtype)
    lens, out_len, ps = [37, 300, 1000, 129], 9, 16
    rng = np.random.default_rng(0)
    rows, hf, hf32 = {}, None, None

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    for attention in ("triton", "reference"):
        eng = GPUEngine(cfg, attention=attention, sample=True, keep_logits=True, kv_cache_gb=1.0)
        num_pages = eng.kv_capacity_tokens(None) // ps
        eng.bind(ps, num_pages)
        reqs = [Request(i, 0.0, np.random.default_rng(i).integers(0, cfg.vocab_size, n).astype(np.int32),
                        np.zeros(out_len, np.int32)) for i, n in enumerate(lens)]
        order = rng.permutation(num_pages)
        tables, at = {}, 0
        for r in reqs:
            n = -(-r.kv_len // ps)
            tables[r.id] = order[at:at + n].astype(np.int32)
            at += n
        t0 = time.perf_counter()
        ours, graph_err = drive(eng, reqs, tables, ps, num_pages, graphs_too=attention == "triton")
        wall = time.perf_counter() - t0
        if hf is None:  # both engines hold the same seeded weights
            hf = hf_from_ours(eng)
        if hf32 is None and dtype != "float32":
            hf32 = hf_from_ours(eng, torch.float32)
        row = dict(rel_err_vs_hf=0.0, top1_agree_vs_hf=1.0, wall_s=wall,
                   graph_vs_eager_max_abs=graph_err if attention == "triton" else None)
        with torch.no_grad():
            for r in reqs:
                ids = torch.from_numpy(r.token_ids()[:r.kv_len].astype(np.int64)).to(eng.device)[None]
                ref = hf(input_ids=ids).logits[0, r.prompt_len - 1:].float()  # [out_len, vocab]
                row["rel_err_vs_hf"] = max(row["rel_err_vs_hf"], rel(ours[r.id], ref))
                row["top1_agree_vs_hf"] = min(row["top1_agree_vs_hf"],
                                              (ours[r.id].argmax(-1) == ref.argmax(-1)).float().mean().item())
                if hf32 is not None:
                    truth = hf32(input_ids=ids).logits[0, r.prompt_len - 1:].float()
                    row["rel_err_vs_hf_fp32"] = max(row.get("rel_err_vs_hf_fp32", 0.0), rel(ours[r.id], truth))
                    row["hf_same_dtype_rel_err_vs_hf_fp32"] = max(
                        row.get("hf_same_dtype_rel_err_vs_hf_fp32", 0.0), rel(ref, truth))
        row["logits_std"] = ref.std().item()
        row["outputs"] = [r.output.tolist() for r in reqs]
        rows[attention] = row
        del eng
        torch.cuda.empty_cache()
    rows["greedy_equal_triton_vs_reference"] = rows["triton"]["outputs"] == rows["reference"]["outputs"]
    res[f"correctness_llama3_2_1b_{dtype}"] = dict(prompt_lens=lens, decode_steps=out_len - 1,
                                                   page_size=ps, **rows)


# Gemma-3 / gpt-oss: (base yaml, overrides at GPU scale, HF class, prompt lengths (past the window))
ARCH_CHECKS = {
    "gemma3": ("gemma3_1b_like", {}, "Gemma3ForCausalLM", [37, 700, 1000, 129]),
    "gpt_oss": ("gpt_oss_like", dict(num_layers=4, num_experts=8), "GptOssForCausalLM", [37, 300, 1000, 129]),
}
# --cpu-smoke: toy shapes through the torch engine (checks this script, not the GPU)
SMOKE = dict(num_layers=4, hidden_size=64, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
             vocab_size=512)


def hf_twin_config(cfg):
    """The transformers config of our Gemma-3 / gpt-oss ModelConfig (legacy rope keys: transformers
    4.5x and 5.x both take them)."""
    import transformers
    types = ["sliding_attention" if w else "full_attention" for w, _ in cfg.layer_bounds()]
    window = max(w for w, _ in cfg.layer_bounds())
    shape = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                 num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                 tie_word_embeddings=cfg.tie_embeddings, sliding_window=window, layer_types=types,
                 rope_theta=cfg.rope_theta, initializer_range=0.02,
                 max_position_embeddings=131072 if cfg.arch == "gpt_oss" else 32768)
    rs = cfg.rope_scaling
    if rs is not None:
        keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
                "low_freq_factor", "high_freq_factor", "attention_factor")
        shape["rope_scaling"] = {"rope_type": rs.rope_type, **{k: getattr(rs, k) for k in keep
                                                               if getattr(rs, k) is not None}}
    if cfg.arch == "gemma3":
        return transformers.Gemma3TextConfig(
            query_pre_attn_scalar=cfg.query_pre_attn_scalar, rope_local_base_freq=cfg.rope_local_theta,
            final_logit_softcapping=cfg.final_logit_softcapping, attention_bias=cfg.attention_bias, **shape)
    return transformers.GptOssConfig(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                                     swiglu_limit=cfg.swiglu_limit, attention_bias=cfg.attention_bias, **shape)


@torch.no_grad()
def hf_twin(cfg, device, hf_class: str, seed: int = 0):
    """transformers' model of `cfg` in fp32 on `device`, HF's random init with norms, sinks and
    biases re-drawn (HF starts them at 0 / 1: they would check nothing)."""
    import transformers
    hcfg = hf_twin_config(cfg)
    hcfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        hf = getattr(transformers, hf_class)(hcfg).float().eval()
    g = torch.Generator(device=device).manual_seed(seed)
    for n, p in hf.named_parameters():
        if n.endswith("norm.weight"):
            p.normal_(1.0 if cfg.arch == "gpt_oss" else 0.0, 0.2, generator=g)
        elif n.endswith("sinks"):
            p.normal_(0.0, 1.0, generator=g)
        elif n.endswith("bias"):
            p.normal_(0.0, 0.02, generator=g)
    return hf


def check_arch(res: dict, arch: str, dtype: str, smoke: bool = False,
               attentions: tuple[str, ...] = ("triton", "reference")) -> None:
    """Our engine (triton, then reference attention) with the weights of transformers' twin
    against it, at `dtype`; bf16 also against the twin in fp32 (the noise floor)."""
    import copy
    from dataclasses import replace

    import transformers

    from kvbench.model import DTYPES, hf_tensor_map
    from kvbench.request import Request
    base, overrides, hf_class, lens = ARCH_CHECKS[arch]
    key = f"correctness_{arch}_{dtype}"
    if not hasattr(transformers, hf_class):
        why = f"transformers {transformers.__version__} has no {hf_class}"
        print(f"[{arch} {dtype}] skipped: {why}", flush=True)
        res[key] = dict(skipped=why)
        return
    cfg = replace(model_cfg(base), dtype=dtype, **overrides)
    if smoke:
        groups = {k: dict(v, window=min(v.get("window", 0), 8)) if v["kind"] == "sliding" else v
                  for k, v in cfg.layers["groups"].items()}
        cfg = replace(cfg, **SMOKE, layers=dict(cfg.layers, groups=groups))
        lens = [11, 5]
    device = torch.device("cpu" if smoke else "cuda")
    hf32 = hf_twin(cfg, device, hf_class)
    hf = hf32 if dtype == "float32" else copy.deepcopy(hf32).to(DTYPES[dtype])
    sd = hf.state_dict()
    out_len, ps = 9, 16
    rows = {}

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    for attention in attentions:
        if smoke:
            from kvbench.engines.torch_engine import TorchEngine
            if attention == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            eng = TorchEngine(cfg, attention=attention, sample=True, keep_logits=True)
            num_pages = 64
        else:
            from kvbench.engines.gpu_engine import GPUEngine
            eng = GPUEngine(cfg, attention=attention, sample=True, keep_logits=True, kv_cache_gb=1.0,
                            profile_tokens=2048, warmup=False)   # nothing here is timed
            num_pages = eng.kv_capacity_tokens(None) // ps
        with torch.no_grad():
            for name, dst in hf_tensor_map(eng.model):
                dst.copy_(sd[name])
        eng.bind(ps, num_pages)
        reqs = [Request(i, 0.0, np.random.default_rng(i).integers(0, cfg.vocab_size, n).astype(np.int32),
                        np.zeros(out_len, np.int32)) for i, n in enumerate(lens)]
        order = np.random.default_rng(0).permutation(num_pages)
        tables, at = {}, 0
        for r in reqs:
            n = -(-r.kv_len // ps)
            tables[r.id] = order[at:at + n].astype(np.int32)
            at += n
        t0 = time.perf_counter()
        ours, graph_err = drive(eng, reqs, tables, ps, num_pages, graphs_too=attention == "triton" and not smoke)
        row = dict(rel_err_vs_hf=0.0, top1_agree_vs_hf=1.0, wall_s=time.perf_counter() - t0,
                   graph_vs_eager_max_abs=graph_err if attention == "triton" and not smoke else None)
        with torch.no_grad():
            for r in reqs:
                ids = torch.from_numpy(r.token_ids()[:r.kv_len].astype(np.int64)).to(device)[None]
                ref = hf(input_ids=ids).logits[0, r.prompt_len - 1:].float()
                row["rel_err_vs_hf"] = max(row["rel_err_vs_hf"], rel(ours[r.id], ref))
                row["top1_agree_vs_hf"] = min(row["top1_agree_vs_hf"],
                                              (ours[r.id].argmax(-1) == ref.argmax(-1)).float().mean().item())
                if dtype != "float32":
                    truth = hf32(input_ids=ids).logits[0, r.prompt_len - 1:].float()
                    row["rel_err_vs_hf_fp32"] = max(row.get("rel_err_vs_hf_fp32", 0.0), rel(ours[r.id], truth))
                    row["hf_same_dtype_rel_err_vs_hf_fp32"] = max(
                        row.get("hf_same_dtype_rel_err_vs_hf_fp32", 0.0), rel(ref, truth))
        row["logits_std"] = ref.std().item()
        row["ok"] = (row["rel_err_vs_hf"] <= 1e-4 if dtype == "float32" else
                     row["rel_err_vs_hf_fp32"] <= 1.5 * row["hf_same_dtype_rel_err_vs_hf_fp32"] + 1e-3)
        row["outputs"] = [r.output.tolist() for r in reqs]
        rows[attention] = row
        print(f"[{arch} {dtype} {attention}] rel err vs HF {row['rel_err_vs_hf']:.2e}, top1 "
              f"{row['top1_agree_vs_hf']:.3f}, vs HF fp32 {row.get('rel_err_vs_hf_fp32', float('nan')):.2e} "
              f"(HF {dtype} vs HF fp32 {row.get('hf_same_dtype_rel_err_vs_hf_fp32', float('nan')):.2e}), "
              f"graph-eager {graph_err if row['graph_vs_eager_max_abs'] is not None else '-'}: "
              f"{'ok' if row['ok'] else 'FAIL'}", flush=True)
        del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(rows) == 2:
        rows["greedy_equal_triton_vs_reference"] = rows["triton"]["outputs"] == rows["reference"]["outputs"]
    res[key] = dict(model=base, overrides=overrides, prompt_lens=lens, decode_steps=out_len - 1, page_size=ps, **rows)


def kernel_profile(eng, batch, top: int = 12) -> dict:
    """GPU time of one eager step by kernel: where a step's time goes, launch gaps excluded."""
    from torch.profiler import ProfilerActivity, profile
    eng.step(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.step(batch)
        torch.cuda.synchronize()
    by = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:60]
            us, n = by.get(name, (0.0, 0))
            by[name] = (us + e.device_time_total, n + 1)
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])
    return dict(kernels=sum(n for _, (_, n) in rows), kernel_us=sum(us for _, (us, _) in rows),
                top=[dict(name=k, us=round(us, 1), count=n) for k, (us, n) in rows[:top]])


def time_step(eng, batch, graphs, batch_size, ctx, layout, wbytes, bpt, bw, variant=None) -> dict:
    """Median engine step time (host batch building included) and, with CUDA graphs, the graph
    replay alone; both against the (weights read + K/V read) / copy-bandwidth roofline."""
    eng.cuda_graphs = graphs
    for _ in range(3):
        eng.step(batch)
    t = float(np.median([eng.step(batch) for _ in range(20)]))
    kv_read = batch_size * (ctx + 1) * bpt
    row = dict(batch=batch_size, context=ctx, layout=layout, cuda_graphs=graphs, variant=variant,
               step_ms=t * 1e3, weight_roofline_ms=wbytes / bw * 1e3,
               weight_kv_roofline_ms=(wbytes + kv_read) / bw * 1e3,
               frac_of_roofline=(wbytes + kv_read) / bw / t, tokens_per_s=batch_size / t)
    if graphs:  # the forward alone: the graph replay, without the host's batch building
        g = next(reversed(eng._graphs.values()))  # captured by this batch
        times = []
        for _ in range(20):
            s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s0.record()
            g.graph.replay()
            s1.record()
            s1.synchronize()
            times.append(s0.elapsed_time(s1) / 1e3)
        row["gpu_ms"] = float(np.median(times)) * 1e3
        row["gpu_frac_of_roofline"] = (wbytes + kv_read) / bw / (row["gpu_ms"] / 1e3)
    return row


AB_VARIANTS = ("no PDL", "PDL early", "cublas", "decode splits >= 128 tokens", "decode splits >= 256 tokens",
               "decode fused merge", "cuBLAS API (torch's default)", "general decode host path",
               "decode walk by shift", "decode walk by tiles", "decode walk by division")


@contextlib.contextmanager
def ab_variant(name: str):
    """Run the engine with one change against the default (kernels with programmatic dependent
    launch in mode "late"; `linear` for batches <= 16, cuBLASLt above; split-KV decode with splits
    of >= 64 tokens and a merge kernel; a decode step's short host path)."""
    from kvbench.engines import torch_engine
    from kvbench.kernels import _common
    from kvbench.kernels import decode_attention as dmod
    from kvbench.kernels import linear as linmod
    mode = {"no PDL": "off", "PDL early": "early"}.get(name)
    fast_host = torch_engine.FAST_DECODE_HOST
    if name == "general decode host path":   # the step's host part without `_flatten_decode` / short fills
        torch_engine.FAST_DECODE_HOST = False
    was = _common.set_pdl(mode) if mode else None
    blas = torch.backends.cuda.preferred_blas_library()
    if name.startswith("cuBLAS API"):       # the engine's default is cuBLASLt (engine.blas)
        torch.backends.cuda.preferred_blas_library("cublas")
    saved = linmod.MAX_M, dmod.MIN_SPLIT_TOKENS, dmod.DECODE_CONFIG
    if name == "cublas":
        linmod.MAX_M = 0
    if name.startswith("decode splits"):
        dmod.MIN_SPLIT_TOKENS = int(name.split()[3])
    if name == "decode fused merge":
        dmod.DECODE_CONFIG = dict(saved[2], FUSED_MERGE=1)
    if name.startswith("decode walk by"):   # the page-table walk forced (`page_walk_choice` picks per launch)
        dmod.DECODE_CONFIG = dict(saved[2], **{"shift": dict(TILE_WALK=0, PAGE_LOG2=4), "tiles": dict(TILE_WALK=1),
                                               "division": dict(TILE_WALK=0, PAGE_LOG2=-1)}[name.split()[-1]])
    try:
        yield
    finally:
        if mode:
            _common.set_pdl(was)
        torch.backends.cuda.preferred_blas_library(blas)
        linmod.MAX_M, dmod.MIN_SPLIT_TOKENS, dmod.DECODE_CONFIG = saved
        torch_engine.FAST_DECODE_HOST = fast_host


def ab_medians(rows: list[dict]) -> dict:
    """Medians over `time_step` rows of one variant (an A/B's rounds): step and graph-replay ms,
    their fractions of the roofline, and the host part (step - graph replay) in µs."""
    med = lambda key: float(np.median([r[key] for r in rows]))  # noqa: E731
    return dict(step_ms=med("step_ms"), gpu_ms=med("gpu_ms"), frac=med("frac_of_roofline"),
                gpu_frac=med("gpu_frac_of_roofline"),
                host_us=float(np.median([r["step_ms"] - r["gpu_ms"] for r in rows])) * 1e3)


def decode_setup(batch_sizes=(1, 64), ctx: int = 2048, ps: int = 16, model: str = "llama3_1_8b"):
    """What the host-path scripts time (experiments/host_path_ab.py, step_host_profile.py,
    decode_bucket_ab.py): the gpu engine of `model` (default the 8B) bound to the pool
    `gpu_memory_utilization=0.9` sizes (pages of `ps`), the roofline's
    bytes (weights a step reads, K/V bytes a token), and per batch size the decode of token `ctx`
    after a `ctx`-token context, paged, pages in a fixed random order (as `time_decode`'s).
    -> (eng, wbytes, bpt, {batch size: StepBatch})"""
    from kvbench.batch import ScheduledSeq, StepBatch
    from kvbench.engines.gpu_engine import GPUEngine
    from kvbench.model import kv_bytes_per_token
    from kvbench.request import Request
    cfg = model_cfg(model)
    eng = GPUEngine(cfg, attention="triton", gpu_memory_utilization=0.9)
    cap = eng.kv_capacity_tokens(None)
    eng.bind(ps, cap // ps)
    order = np.random.default_rng(1).permutation(cap // ps).astype(np.int32)
    n = -(-(ctx + 1) // ps)
    batches = {}
    for b in batch_sizes:
        reqs = [Request(i, 0.0, np.random.default_rng(i).integers(0, 32000, ctx).astype(np.int32),
                        np.zeros(3, np.int32)) for i in range(b)]
        batches[b] = StepBatch([ScheduledSeq(r, ctx, 1, order[i * n:(i + 1) * n]) for i, r in enumerate(reqs)], ps,
                               cap // ps, False, [])
    return eng, eng.model.step_weight_bytes(), kv_bytes_per_token(cfg), batches


def time_decode(res: dict, bw: float) -> None:
    from kvbench.batch import ScheduledSeq, StepBatch
    from kvbench.engines.gpu_engine import GPUEngine
    from kvbench.model import kv_bytes_per_token
    from kvbench.request import Request
    cfg = model_cfg("llama3_1_8b")
    eng = GPUEngine(cfg, attention="triton", gpu_memory_utilization=0.9)
    cap = eng.kv_capacity_tokens(None)
    ps = 16
    eng.bind(ps, cap // ps)
    # the roofline counts the weights a step reads: not the input embedding table (one row a token)
    wbytes, bpt = eng.model.step_weight_bytes(), kv_bytes_per_token(cfg)
    res["llama3_1_8b_sizing"] = dict(weight_bytes=eng.model.weight_bytes(), step_weight_bytes=wbytes,
                                     activation_peak_bytes=eng.activation_peak,
                                     kv_capacity_tokens=cap, kv_bytes_per_token=bpt)
    order = np.random.default_rng(1).permutation(cap // ps).astype(np.int32)
    rows = []
    for batch_size, ctx in ((1, 2048), (64, 2048)):
        n = -(-(ctx + 1) // ps)
        reqs = [Request(i, 0.0, np.random.default_rng(i).integers(0, 32000, ctx).astype(np.int32),
                        np.zeros(3, np.int32)) for i in range(batch_size)]
        # decode of token `ctx` after a 2k context (its K/V is whatever the pool holds)
        for layout in ("paged", "slab"):
            tables = ([order[i * n:(i + 1) * n] for i in range(batch_size)] if layout == "paged"
                      else [np.arange(i * n, (i + 1) * n, dtype=np.int32) for i in range(batch_size)])
            batch = StepBatch([ScheduledSeq(r, ctx, 1, t) for r, t in zip(reqs, tables)], ps,
                              cap // ps, layout == "slab", [])
            for graphs in (False, True):
                rows.append(time_step(eng, batch, graphs, batch_size, ctx, layout, wbytes, bpt, bw))
            for variant in AB_VARIANTS if layout == "paged" else ():   # A/B, same run, graphs
                if batch_size > 1 and variant not in ("no PDL", "PDL early", "cuBLAS API (torch's default)",
                                                      "general decode host path", "decode walk by shift",
                                                      "decode walk by tiles"):
                    continue                         # batch 64: cuBLAS anyway, no split-KV
                with ab_variant(variant):
                    eng.drop_graphs()
                    rows.append(time_step(eng, batch, True, batch_size, ctx, layout, wbytes, bpt, bw,
                                          variant=variant))
                eng.drop_graphs()
            if layout == "paged":
                eng.cuda_graphs = False
                res[f"llama3_1_8b_profile_b{batch_size}"] = kernel_profile(eng, batch)
    eng.cuda_graphs = False
    # one 2k-token prefill, for the record: FLOP-bound, 2 * params * tokens
    r = Request(999, 0.0, np.arange(2048, dtype=np.int32), np.zeros(2, np.int32))
    batch = StepBatch([ScheduledSeq(r, 0, 2048, order[:128])], ps, cap // ps, False, [])
    for _ in range(2):
        eng.step(batch)
    t = float(np.median([eng.step(batch) for _ in range(5)]))
    res["llama3_1_8b_prefill_2048"] = dict(step_ms=t * 1e3, tflops=2 * wbytes / 2 * 2048 / t / 1e12)
    res["llama3_1_8b_decode"] = rows
    res["engine_summary_8b"] = eng.summary()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "results" / "gpu")))
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--correctness-dtypes", default="bfloat16,float32",
                    help="comma list of the dtypes checked against transformers")
    ap.add_argument("--only", default="llama,timing,gemma3,gpt_oss",
                    help="comma list of parts: llama, timing, gemma3, gpt_oss")
    ap.add_argument("--attentions", default="triton,reference",
                    help="gemma3 / gpt_oss parts: attention backends to check (fp32 Triton kernels take minutes "
                         "to compile on the GPU: ieee dots; reference is the torch attention over the same pages)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="gemma3 / gpt_oss parts only, on CPU at toy shapes (checks the script)")
    args = ap.parse_args()
    only = args.only.split(",")
    if bad := sorted(set(only) - {"llama", "timing", *ARCH_CHECKS}):
        print(f"check_model_gpu: --only {bad}: parts are llama, timing, {', '.join(ARCH_CHECKS)}", file=sys.stderr)
        sys.exit(2)
    attentions = tuple(a for a in args.attentions.split(",") if a)
    if not attentions or set(attentions) - {"triton", "reference"}:
        print(f"check_model_gpu: --attentions {args.attentions!r}: a comma list of triton, reference", file=sys.stderr)
        sys.exit(2)
    use_checkout()
    import transformers
    import triton
    dtypes = [] if args.skip_correctness else args.correctness_dtypes.split(",")
    if args.cpu_smoke:
        res = {}
        for arch in (a for a in ARCH_CHECKS if a in only):
            for d in dtypes:
                check_arch(res, arch, d, smoke=True, attentions=attentions)
        return
    dev = torch.device("cuda")
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               device=torch.cuda.get_device_name(dev), torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__)
    bw = copy_bandwidth(dev) if "timing" in only else None
    res["d2d_copy_bandwidth_bytes_per_s"] = bw
    print(f"{res['device']}  torch {torch.__version__}  triton {triton.__version__}  transformers "
          f"{transformers.__version__}" + (f"  copy bw {bw / 1e12:.2f} TB/s (read+write)" if bw else ""), flush=True)
    errors = {}
    parts = [(f"correctness {d}", lambda d=d: check_correctness(res, d)) for d in dtypes if "llama" in only]
    parts += [(f"{a} {d}", lambda a=a, d=d: check_arch(res, a, d, attentions=attentions)) for a in ARCH_CHECKS if a in only for d in dtypes]
    if "timing" in only:
        parts.append(("decode timing", lambda: time_decode(res, bw)))
        # the copy again after the timing rows: how far the denominator drifted during them
        parts.append(("copy after", lambda: res.update(d2d_copy_bandwidth_after_bytes_per_s=copy_bandwidth(dev))))
    for name, fn in parts:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # keep the other part's numbers
            import traceback
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        torch.cuda.empty_cache()
        res["errors"] = errors
        Path(args.out).mkdir(parents=True, exist_ok=True)  # after each part: survives a timeout
        (Path(args.out) / "check_model_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    print("\nLlama-3.2-1B shape, paged ps16 (shuffled), prefill + 8 greedy decodes vs transformers")
    print(f"{'dtype':<9} {'attention':<10} {'rel err':>9} {'top1':>6} {'graph-eager':>12} "
          f"{'vs HF fp32':>10} {'HF vs HF fp32':>13}")
    for dtype in ("bfloat16", "float32"):
        c = res.get(f"correctness_llama3_2_1b_{dtype}")
        for a in ("triton", "reference") if c else ():
            r = c[a]
            g, t, h = (r.get(k) for k in ("graph_vs_eager_max_abs", "rel_err_vs_hf_fp32",
                                          "hf_same_dtype_rel_err_vs_hf_fp32"))
            print(f"{dtype:<9} {a:<10} {r['rel_err_vs_hf']:>9.2e} {r['top1_agree_vs_hf']:>6.3f} "
                  f"{'-' if g is None else f'{g:.2e}':>12} {'-' if t is None else f'{t:.2e}':>10} "
                  f"{'-' if h is None else f'{h:.2e}':>13}")
        if c:
            print(f"  {dtype}: greedy outputs triton == reference: {c['greedy_equal_triton_vs_reference']}")
    if "llama3_1_8b_decode" in res:
        s = res["llama3_1_8b_sizing"]
        print(f"\nLlama-3.1-8B shape, bf16: weights {s['weight_bytes'] / 2**30:.2f} GiB, activation peak "
              f"{s['activation_peak_bytes'] / 2**30:.2f} GiB, KV capacity {s['kv_capacity_tokens']} tokens")
        print(f"{'batch':>5} {'ctx':>5} {'layout':>6} {'graphs':>6} {'variant':>27} {'step ms':>8} {'W roof ms':>9} "
              f"{'W+KV roof':>9} {'of roof':>7} {'tok/s':>8} {'GPU ms':>7} {'of roof':>7}")
        for r in res["llama3_1_8b_decode"]:
            print(f"{r['batch']:>5} {r['context']:>5} {r.get('layout', 'paged'):>6} "
                  f"{str(r['cuda_graphs']):>6} {r.get('variant') or '':>27} {r['step_ms']:>8.2f} "
                  f"{r['weight_roofline_ms']:>9.2f} {r['weight_kv_roofline_ms']:>9.2f} "
                  f"{r['frac_of_roofline']:>7.1%} {r['tokens_per_s']:>8.0f} "
                  f"{r.get('gpu_ms', float('nan')):>7.2f} {r.get('gpu_frac_of_roofline', float('nan')):>7.1%}")
        for b in (1, 64):
            pr = res.get(f"llama3_1_8b_profile_b{b}")
            if pr:
                print(f"batch {b} eager step: {pr['kernels']} kernels, {pr['kernel_us'] / 1e3:.2f} ms of GPU time")
                for r in pr["top"]:
                    print(f"  {r['us']:>9.1f} us {r['count']:>5}x  {r['name']}")
        p = res["llama3_1_8b_prefill_2048"]
        print(f"prefill 2048 tokens: {p['step_ms']:.1f} ms = {p['tflops']:.0f} TFLOP/s")
    arch_rows = [(k, a, v[a]) for k, v in res.items() if k.startswith(("correctness_gemma3", "correctness_gpt_oss"))
                 for a in ("triton", "reference") if a in v]
    if arch_rows:
        print("\nGemma-3 / gpt-oss vs transformers (paged ps16 shuffled, prefill + 8 greedy decodes)")
        print(f"{'check':<30} {'attention':<10} {'rel err':>9} {'top1':>6} {'vs HF fp32':>10} {'HF vs HF fp32':>13}  verdict")
        for k, a, r in arch_rows:
            t, h = r.get("rel_err_vs_hf_fp32"), r.get("hf_same_dtype_rel_err_vs_hf_fp32")
            print(f"{k[12:]:<30} {a:<10} {r['rel_err_vs_hf']:>9.2e} {r['top1_agree_vs_hf']:>6.3f} "
                  f"{'-' if t is None else f'{t:.2e}':>10} {'-' if h is None else f'{h:.2e}':>13}  "
                  f"{'ok' if r['ok'] else 'FAIL'}")
    for k, v in res.items():
        if k.startswith("correctness_") and "skipped" in v:
            print(f"{k[12:]}: skipped ({v['skipped']})")
    if errors:
        print("\nERRORS:", json.dumps(errors, indent=1))


if __name__ == "__main__":
    main()
