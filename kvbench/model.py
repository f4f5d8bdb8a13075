"""A Llama-architecture decoder (Llama 2/3, Qwen2) over a flat, paged, variable-length batch.

One forward runs a mixed step: prefill chunks and decode tokens of B requests, flattened into
T tokens. Per layer: (residual add +) RMSNorm -> qkv proj -> rope + write the new K/V into the
pool through `slot_mapping` -> attention over each request's page table -> o proj -> (residual
add +) RMSNorm -> gate|up proj -> SiLU * up -> down proj. Elementwise steps are fused kernels
(`rms_norm`, `rope_kv_write`, `silu_mul`), so a decode layer is about nine launches; the
projections of batches of up to 16 tokens use the `linear` kernel, larger ones cuBLAS.

    kv_pool: [num_layers, 2 (K, V), num_slots, H_kv, D]      num_slots = num_pages * page_size
    token i of request b lives in slot page_table[b, i // page_size] * page_size + i % page_size

Per-layer attention kinds (issue 16): a config's `layers:` description (kvbench.sizes) makes
a layer full, sliding-window or chunked; each layer passes its (window, chunk) to the attention
kernels and their references, over the one shared page table and pool. Gemma-3 / gpt-oss
specifics beyond the bound (per-kind rope bases, q/k norms, sandwich norms, GeGLU, sinks, MoE)
are not modelled: those yamls run as Llama-architecture layers with their attention bounds.

The model never sees a strategy: only the page tables in `AttnMetadata`. Attention goes
through `kvbench.kernels` ("triton") or their torch references ("reference", CPU).
Weights: seeded random (`init_random`) or a local Hugging Face folder (`load_checkpoint`).
"""
from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from kvbench.sizes import kv_bytes_per_token, layer_groups  # noqa: F401  (sizes live in kvbench.sizes; re-exported)

#: the torch dtypes the model computes in, by their kvbench.sizes name (bytes: sizes.DTYPE_BYTES).
#: fp8 names size a sim run's KV pool only: the model has no fp8 weights or kernels.
DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16")}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (HF `rope_scaling: {rope_type: llama3, ...}`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a Llama-style decoder; mirrors configs/model/*.yaml field by field."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama with attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (HF Llama's attention_bias sets both)
    dtype: str = "bfloat16"
    checkpoint: str | None = None  # local HF folder (config.json + *.safetensors), or None
    # per-layer attention kinds (issue 16), as the yaml's `layers:` ({pattern: [group names],
    # groups: {name: {kind: full|sliding|chunked|state, window, chunk, ...}}}, see
    # kvbench.sizes.layer_groups); None: every layer full attention. Plain dicts/lists (not hashed)
    layers: Mapping | None = field(default=None, hash=False)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model '{self.name}': dtype '{self.dtype}' not in {sorted(DTYPES)} "
                             "(the dtypes the torch model runs in; fp8 sizes the sim's KV pool only)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model '{self.name}': num_heads {self.num_heads} is not a multiple "
                             f"of num_kv_heads {self.num_kv_heads}")
        if self.layers is not None:
            layer_groups(self)  # raises ValueError naming the bad key of `layers:`

    def layer_bounds(self) -> tuple[tuple[int, int], ...]:
        """(window, chunk) of each layer's attention, 0 = no bound: full (0, 0), sliding
        (window, 0), chunked (0, chunk). ValueError for what the model runner cannot run: state
        (recurrent) layers, and groups whose KV heads / head dim differ from the model's (the
        runner keeps one pool tensor of one shape for every layer)."""
        if self.layers is None:
            return ((0, 0),) * self.num_layers
        pattern, groups = self.layers["pattern"], self.layers["groups"]
        out = []
        for i in range(self.num_layers):
            name = str(pattern[i % len(pattern)])
            g = groups[name]
            kind = g["kind"]
            if kind == "state":
                raise ValueError(f"model '{self.name}': layer {i} (group '{name}') is a state layer: "
                                 "the simulation sizes those, the model runner has no recurrent layers")
            for key in ("num_kv_heads", "head_dim"):
                if key in g and g[key] != getattr(self, key):
                    raise ValueError(f"model '{self.name}': group '{name}' has {key}={g[key]}, the model "
                                     f"{getattr(self, key)}: the model runner's one KV pool needs one shape")
            out.append((int(g.get("window", 0)) if kind == "sliding" else 0,
                        int(g.get("chunk", 0)) if kind == "chunked" else 0))
        return tuple(out)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        """From a yaml group / DictConfig / dict; unknown keys are an error naming them."""
        d = {k: d[k] for k in d}
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"model config {d.get('name', '?')}: unknown field(s) {unknown}; "
                             f"known: {sorted(known)}")
        rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, RopeScaling):
            rs = {k: rs[k] for k in rs}
            rs.setdefault("rope_type", rs.pop("type", "llama3"))
            if rs["rope_type"] != "llama3":
                raise ValueError(f"rope_scaling type '{rs['rope_type']}' not supported (llama3 only)")
            d["rope_scaling"] = RopeScaling(**rs)
        if d.get("layers") is not None:
            d["layers"] = _plain(d["layers"])
        return cls(**d)

    @classmethod
    def from_hf(cls, path: str | Path, dtype: str | None = None) -> ModelConfig:
        """Read a Hugging Face `config.json` (Llama or Qwen2) into a ModelConfig."""
        path = Path(path)
        c = json.loads((path / "config.json").read_text())
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        scaling = None
        if rope.get("rope_type", rope.get("type", "default")) == "llama3":
            scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
        qwen = c.get("model_type", "llama").startswith("qwen2")
        heads = c["num_attention_heads"]
        layers = _hf_layers(c)
        return cls.from_dict(dict(
            name=path.name, num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab_size=c["vocab_size"],
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            rope_scaling=scaling, rms_norm_eps=c.get("rms_norm_eps", 1e-5),
            tie_embeddings=c.get("tie_word_embeddings", False),
            attention_bias=qwen or c.get("attention_bias", False),
            attention_out_bias=not qwen and c.get("attention_bias", False),
            dtype=dtype or {"float16": "float16", "float32": "float32"}.get(
                c.get("torch_dtype") or c.get("dtype"), "bfloat16"),
            checkpoint=str(path), layers=layers))


def _plain(x):
    """A yaml mapping / DictConfig / list as plain dicts, lists and scalars."""
    if isinstance(x, Mapping):
        return {str(k): _plain(x[k]) for k in x}
    if isinstance(x, (list, tuple)) or (hasattr(x, "__len__") and hasattr(x, "__getitem__")
                                        and not isinstance(x, (str, bytes))):
        return [_plain(v) for v in x]
    return x


def _hf_layers(c: dict) -> dict | None:
    """A HF config.json's per-layer attention (`layer_types`: full_attention / sliding_attention /
    chunked_attention, with `sliding_window` / `attention_chunk_size`) as a `layers:` description;
    None when every layer is full attention."""
    types = c.get("layer_types")
    if not types or all(t == "full_attention" for t in types):
        return None
    kinds = {"full_attention": {"kind": "full"},
             "sliding_attention": {"kind": "sliding", "window": int(c.get("sliding_window") or 0)},
             "chunked_attention": {"kind": "chunked", "chunk": int(c.get("attention_chunk_size") or 0)}}
    if unknown := sorted(set(types) - set(kinds)):
        raise ValueError(f"config.json: layer_types {unknown} not supported ({sorted(kinds)})")
    names = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}
    return {"pattern": [names[t] for t in types], "groups": {names[t]: kinds[t] for t in sorted(set(types))}}


def as_model_config(cfg) -> ModelConfig:
    return cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[D/2] float32 inverse frequencies, with Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor  # longer: divide by factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor  # shorter: keep
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass
class AttnMetadata:
    """Where a step's tokens live in the pool; built by the engine from a StepBatch."""

    slot_mapping: torch.Tensor  # [T] int64: pool slot of each new token
    page_table: torch.Tensor  # [B, max_pages] int32, rows padded with 0
    query_start_loc: torch.Tensor  # [B+1] int32: request b's new tokens are q[qsl[b]:qsl[b+1]]
    seq_lens: torch.Tensor  # [B] int32: cached prefix + new tokens
    logits_idx: torch.Tensor  # [B_emit] int64: flat index of the last token of emitting requests
    page_size: int
    contiguous: bool  # every page table is a consecutive run (slab): kernels' fast path
    decode_only: bool  # every request has exactly one new token
    max_seq_len: int  # max(seq_lens), known on the host (sizes decode's split-KV, no sync)
    num_decode: int = 0  # leading requests with one new token each: the decode kernel serves them
    extend_start_loc: torch.Tensor | None = None  # [B - num_decode + 1] the rest's query_start_loc, from 0


def attention_ops(backend: str) -> SimpleNamespace:
    """The kernel launchers of `kvbench.kernels`, bound to a backend: "triton" (the kernels) or
    "reference" (the launchers' torch path: same shape checks, then the `*_ref` functions)."""
    if backend not in ("reference", "triton"):
        raise ValueError(f"attention backend '{backend}' is not 'reference' or 'triton'")
    names = ("linear", "rms_norm", "rope_kv_write", "silu_mul", "kv_write", "decode_attention",
             "extend_attention", "page_copy")
    kernel_backend = "torch" if backend == "reference" else "triton"
    fns = {n: partial(getattr(importlib.import_module(f"kvbench.kernels.{n}"), n),
                      backend=kernel_backend) for n in names}
    return SimpleNamespace(**fns, backend=backend)


class RMSNorm(nn.Module):
    """Holds the weight; the norm itself (fused with the residual add) is `ops.rms_norm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0, chunk: int = 0):
        super().__init__()
        self.cfg = cfg
        # this layer's attention bound (0 = none): sliding window / chunk, passed to the kernels
        self.window, self.chunk = window, chunk
        hq, hkv, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.qkv = nn.Linear(h, (hq + 2 * hkv) * d, bias=cfg.attention_bias)  # q | k | v rows
        self.o_proj = nn.Linear(hq * d, h, bias=cfg.attention_out_bias)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)  # gate | up rows
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(self, x, residual, cos, sin, meta: AttnMetadata, k_cache, v_cache, ops):
        """x [T, hidden]: the previous layer's MLP output, or the embeddings (residual None);
        residual [T, hidden]: the stream before x is added (updated in place).
        cos/sin [T, D]; k_cache/v_cache [num_slots, H_kv, D]. Returns (MLP output, residual)."""
        c, t = self.cfg, x.shape[0]
        if residual is None:
            residual, h = x, ops.rms_norm(x, self.input_norm.weight, c.rms_norm_eps)
        else:  # residual += x; h = norm(residual)
            h = ops.rms_norm(x, self.input_norm.weight, c.rms_norm_eps, residual)
        qkv = ops.linear(h, self.qkv.weight, self.qkv.bias)  # [T, (H_q + 2 H_kv) D]
        # rotates q, k in place; writes k, v into their slots; q/k/v are strided views of qkv
        q, k, v = ops.rope_kv_write(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                    c.num_heads, c.num_kv_heads)
        scale = c.head_dim ** -0.5
        bound = dict(window=self.window, chunk=self.chunk)
        if meta.decode_only:  # T == B: one query per request
            o = ops.decode_attention(q, k_cache, v_cache, meta.page_table, meta.seq_lens,
                                     meta.page_size, sm_scale=scale, contiguous=meta.contiguous,
                                     max_seq_len=meta.max_seq_len, **bound)
        elif meta.num_decode == 0:
            # the prefix through the page table, the new tokens' K/V straight from qkv
            o = ops.extend_attention(q, k_cache, v_cache, meta.page_table, meta.query_start_loc,
                                     meta.seq_lens, meta.page_size, sm_scale=scale,
                                     contiguous=meta.contiguous, k_new=k, v_new=v,
                                     max_seq_len=meta.max_seq_len, **bound)
        else:  # a mixed step: its one-token rows (first) by the decode kernel, the chunks by extend
            d = meta.num_decode
            o = torch.empty((t, c.num_heads, c.head_dim), dtype=q.dtype, device=q.device)
            ops.decode_attention(q[:d], k_cache, v_cache, meta.page_table[:d], meta.seq_lens[:d],
                                 meta.page_size, sm_scale=scale, contiguous=meta.contiguous,
                                 max_seq_len=meta.max_seq_len, out=o[:d], **bound)
            ops.extend_attention(q[d:], k_cache, v_cache, meta.page_table[d:], meta.extend_start_loc,
                                 meta.seq_lens[d:], meta.page_size, sm_scale=scale,
                                 contiguous=meta.contiguous, k_new=k[d:], v_new=v[d:], out=o[d:],
                                 max_seq_len=meta.max_seq_len, **bound)
        a = ops.linear(o.reshape(t, c.num_heads * c.head_dim), self.o_proj.weight, self.o_proj.bias)
        h = ops.rms_norm(a, self.post_norm.weight, c.rms_norm_eps, residual)  # residual += a
        gate_up = ops.linear(h, self.gate_up.weight)  # [T, 2 intermediate]
        return ops.linear(ops.silu_mul(gate_up), self.down.weight), residual


class LlamaModel(nn.Module):
    """Build with `build_model`; parameters are created on the meta device, then materialized."""

    def __init__(self, cfg: ModelConfig, attention: str = "reference"):
        super().__init__()
        self.cfg = cfg
        self.ops = attention_ops(attention)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w, ch) for w, ch in cfg.layer_bounds())
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size,
                                                                 bias=False)
        self.inv_freq: torch.Tensor | None = None  # [D/2] fp32, set by build_model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_pool: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] int64; kv_pool [L, 2, slots, H_kv, D] -> logits [B_emit, V]."""
        x, residual = self.embed(input_ids), None  # [T, hidden]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2] fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D], HF's layout (halves repeated)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, meta, kv_pool[i, 0], kv_pool[i, 1], self.ops)
        idx = meta.logits_idx  # only emitting tokens: the last add and norm on B_emit rows
        x = self.ops.rms_norm(x[idx], self.norm.weight, self.cfg.rms_norm_eps, residual[idx])
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w)  # [B_emit, vocab]

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def step_weight_bytes(self) -> int:
        """Weight bytes a forward step reads: all but the input embedding table, of which it
        gathers one row per token (tied embeddings are read whole, as the lm_head)."""
        emb = self.embed.weight
        return self.weight_bytes() - (0 if self.lm_head is None else emb.numel() * emb.element_size())


def build_model(cfg, device: str | torch.device = "cpu", attention: str = "reference",
                seed: int = 0) -> LlamaModel:
    """Allocate the model on `device` in `cfg.dtype`; load `cfg.checkpoint` or init from `seed`."""
    cfg = as_model_config(cfg)
    with torch.device("meta"):  # no memory, no init: the dtype cast is free here
        model = LlamaModel(cfg, attention).to(DTYPES[cfg.dtype])
    model = model.to_empty(device=device).eval().requires_grad_(False)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    if cfg.checkpoint:
        if (Path(cfg.checkpoint) / "config.json").exists():  # the yaml must describe the checkpoint
            hf = ModelConfig.from_hf(cfg.checkpoint, dtype=cfg.dtype)
            diff = {f.name: (getattr(cfg, f.name), getattr(hf, f.name)) for f in fields(cfg)
                    if f.name not in ("name", "checkpoint", "layers") and getattr(cfg, f.name) != getattr(hf, f.name)}
            if cfg.layer_bounds() != hf.layer_bounds():  # group names may differ: compare (window, chunk)s
                diff["layers (window, chunk) per layer"] = (cfg.layer_bounds(), hf.layer_bounds())
            if diff:
                raise ValueError(f"model '{cfg.name}' differs from {cfg.checkpoint}/config.json in "
                                 f"(ours, checkpoint's): {diff}")
        load_checkpoint(model, cfg.checkpoint)
    else:
        init_random(model, seed)
    return model


@torch.no_grad()
def init_random(model: LlamaModel, seed: int) -> None:
    """Deterministic for a (seed, device): N(0, 0.02) matrices, unit norms, zero biases."""
    g = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=g)


def hf_tensor_map(model: LlamaModel) -> list[tuple[str, torch.Tensor]]:
    """(HF Llama parameter name, the slice of our parameter it fills), in load order."""
    c = model.cfg
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    out = [("model.embed_tokens.weight", model.embed.weight), ("model.norm.weight", model.norm.weight)]
    if model.lm_head is not None:
        out.append(("lm_head.weight", model.lm_head.weight))
    for i, l in enumerate(model.layers):
        p = f"model.layers.{i}."
        a = [("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))]
        out += [(f"{p}self_attn.{n}.weight", l.qkv.weight[s]) for n, s in a]
        if c.attention_bias:
            out += [(f"{p}self_attn.{n}.bias", l.qkv.bias[s]) for n, s in a]
        out.append((f"{p}self_attn.o_proj.weight", l.o_proj.weight))
        if c.attention_out_bias:
            out.append((f"{p}self_attn.o_proj.bias", l.o_proj.bias))
        out += [(f"{p}mlp.gate_proj.weight", l.gate_up.weight[:inter]),
                (f"{p}mlp.up_proj.weight", l.gate_up.weight[inter:]),
                (f"{p}mlp.down_proj.weight", l.down.weight),
                (f"{p}input_layernorm.weight", l.input_norm.weight),
                (f"{p}post_attention_layernorm.weight", l.post_norm.weight)]
    return out


@torch.no_grad()
def load_checkpoint(model: LlamaModel, path: str | Path) -> None:
    """Copy HF-named tensors from `path/*.safetensors` (sharded or not) into the model."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        where = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"checkpoint {path}: no *.safetensors files")
        where = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                where.update({k: f for k in h.keys()})
    wanted = hf_tensor_map(model)
    if missing := [n for n, _ in wanted if n not in where]:
        raise KeyError(f"checkpoint {path}: missing tensor(s) {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''} ({len(missing)} missing); "
                       f"does model '{model.cfg.name}' (tie_embeddings={model.cfg.tie_embeddings}, "
                       f"attention_bias={model.cfg.attention_bias}) match the checkpoint?")
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, dst in wanted:
        by_file.setdefault(where[name], []).append((name, dst))
    for f, items in by_file.items():
        with safe_open(f, framework="pt", device="cpu") as h:
            for name, dst in items:
                shape = tuple(h.get_slice(name).get_shape())
                if shape != tuple(dst.shape):
                    raise ValueError(f"checkpoint {f}: tensor '{name}' has shape {shape}, "
                                     f"model '{model.cfg.name}' expects {tuple(dst.shape)}")
                dst.copy_(h.get_tensor(name))
