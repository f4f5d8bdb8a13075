"""A Llama-style decoder (Llama 2/3, Qwen2; Gemma-3, gpt-oss) over a flat, paged, variable-length batch.

One forward runs a mixed step: prefill chunks and decode tokens of B requests, flattened into
T tokens. Per layer: (residual add +) RMSNorm -> qkv proj -> rope + write the new K/V into the
pool through `slot_mapping` -> attention over each request's page table -> o proj -> (residual
add +) RMSNorm -> gate|up proj -> SiLU * up -> down proj. Elementwise steps are fused kernels
(`rms_norm`, `rope_kv_write`, `silu_mul`), so a decode layer is about nine launches (eight at
batch 1, where the gate|up kernel applies SiLU * up itself); the projections of batches of up to
16 tokens use the `linear` kernel, larger ones cuBLAS.

    kv_pool: [num_layers, 2 (K, V), num_slots, H_kv, D]      num_slots = num_pages * page_size
    token i of request b lives in slot page_table[b, i // page_size] * page_size + i % page_size

Per-layer attention kinds (issue 16): a config's `layers:` description (kvbench.sizes) makes
a layer full, sliding-window or chunked; each layer passes its (window, chunk) to the attention
kernels and their references, over the one shared page table and pool.

Architectures (`ModelConfig.arch`, logits checked against transformers in
tests/test_model_gemma.py and tests/test_model_gptoss.py): "llama"; "gemma3" (Gemma3ForCausalLM:
(1 + w) RMSNorms in fp32, q/k norms, a norm after attention and around the MLP, GeGLU, scaled
embeddings, query_pre_attn_scalar, the sliding layers' own rope base, optional final logit
softcapping); "gpt_oss" (GptOssForCausalLM: attention sinks in the attention kernels, q/k/v/o
biases, YaRN rope, a top-k MoE of clamped-SwiGLU experts). Gemma's norms and GeGLU, gpt-oss's
norms and MoE are torch ops in HF's rounding, not fused kernels; the MoE loops over experts
(correctness, not speed). Not modelled: attention logit softcapping (Gemma-2), the multimodal
Gemma-3 (text checkpoints only), gpt-oss's MXFP4 expert tensors (load unquantized ones).

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
    """Rope frequency scaling (HF `rope_scaling` / `rope_parameters`): "llama3" (Llama-3.1: factor,
    low/high_freq_factor, original_max_position_embeddings), "linear" (Gemma-3 4B+: factor) or
    "yarn" (gpt-oss: factor, original_max_position_embeddings, beta_fast/slow, truncate,
    attention_factor; cos/sin are scaled by the attention factor)."""

    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: str = "llama3"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None


#: the keys each rope_type needs (the others of RopeScaling are optional / that type's defaults)
ROPE_TYPES = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "linear": ("factor",),
              "yarn": ("factor", "original_max_position_embeddings")}
#: model architectures the runner models (ModelConfig.arch)
ARCHS = ("llama", "gemma3", "gpt_oss")


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
    # the layer's architecture (issue 16). "llama": Llama 2/3, Qwen2. "gemma3" (HF Gemma3ForCausalLM):
    # RMSNorms x * (1 + w) in fp32, q/k norms per head, a norm after attention and around the MLP,
    # GeGLU (gelu tanh), embeddings x sqrt(hidden_size), sliding layers on rope_local_theta.
    # "gpt_oss" (HF GptOssForCausalLM): attention sinks, a top-k MoE of clamped-SwiGLU experts
    arch: str = "llama"
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim)
    rope_local_theta: float | None = None  # rope base of sliding layers, unscaled (None: as full layers)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap) (None: off)
    num_experts: int = 0  # gpt_oss: experts per MoE layer (num_local_experts)
    experts_per_token: int = 0  # gpt_oss: top-k (num_experts_per_tok)
    swiglu_alpha: float = 1.702  # gpt_oss experts: glu = gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # gpt_oss experts: gate <= limit, |up| <= limit

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model '{self.name}': dtype '{self.dtype}' not in {sorted(DTYPES)} "
                             "(the dtypes the torch model runs in; fp8 sizes the sim's KV pool only)")
        if self.arch not in ARCHS:
            raise ValueError(f"model '{self.name}': arch '{self.arch}' not in {list(ARCHS)}")
        for key in ("query_pre_attn_scalar", "rope_local_theta", "final_logit_softcapping"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"model '{self.name}': {key}={v!r} must be a number > 0 or null")
        moe = self.arch == "gpt_oss"
        if moe and not (isinstance(self.num_experts, int) and isinstance(self.experts_per_token, int)
                        and 1 <= self.experts_per_token <= self.num_experts):
            raise ValueError(f"model '{self.name}': arch gpt_oss needs 1 <= experts_per_token "
                             f"({self.experts_per_token!r}) <= num_experts ({self.num_experts!r})")
        if not moe and (self.num_experts or self.experts_per_token):
            raise ValueError(f"model '{self.name}': num_experts / experts_per_token are for arch gpt_oss "
                             f"(the MoE), not '{self.arch}'")
        if moe and not (self.swiglu_alpha > 0 and self.swiglu_limit > 0):
            raise ValueError(f"model '{self.name}': swiglu_alpha {self.swiglu_alpha!r} and swiglu_limit "
                             f"{self.swiglu_limit!r} must be > 0")
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
            need = ROPE_TYPES.get(rs["rope_type"])
            if need is None:
                raise ValueError(f"rope_scaling type '{rs['rope_type']}' not supported ({sorted(ROPE_TYPES)})")
            known = {f.name for f in fields(RopeScaling)}
            if bad := sorted(set(rs) - known) + [f"{k} (missing)" for k in need if rs.get(k) is None]:
                raise ValueError(f"model config {d.get('name', '?')}: rope_scaling ({rs['rope_type']}): "
                                 f"bad key(s) {bad}; needs {list(need)}, may have {sorted(known - set(need))}")
            d["rope_scaling"] = RopeScaling(**rs)
        if d.get("layers") is not None:
            d["layers"] = _plain(d["layers"])
        return cls(**d)

    @classmethod
    def from_hf(cls, path: str | Path, dtype: str | None = None) -> ModelConfig:
        """Read a Hugging Face `config.json` (Llama, Qwen2, Gemma-3 text, gpt-oss) into a ModelConfig.
        ValueError for what the runner does not model (named)."""
        path = Path(path)
        c = json.loads((path / "config.json").read_text())
        mt = c.get("model_type", "llama")
        if mt == "gemma3":
            raise ValueError(f"{path}/config.json: model_type gemma3 is the multimodal Gemma-3; the runner "
                             "reads text-only checkpoints (model_type gemma3_text, Gemma3ForCausalLM)")
        arch = {"gemma3_text": "gemma3", "gpt_oss": "gpt_oss"}.get(mt, "llama")
        n = c["num_hidden_layers"]
        rope, extra = c.get("rope_parameters") or c.get("rope_scaling") or {}, {}
        if arch == "gemma3":
            bad = {k: c.get(k) for k in ("attn_logit_softcapping", "use_bidirectional_attention") if c.get(k)}
            if c.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
                bad["hidden_activation"] = c["hidden_activation"]
            if bad:
                raise ValueError(f"{path}/config.json: Gemma-3 with {bad} is not modelled")
            per = c.get("rope_parameters") if "full_attention" in (c.get("rope_parameters") or {}) else None
            # transformers 5: rope_parameters per layer type; older: rope_theta, rope_local_base_freq, rope_scaling
            rope = dict(per["full_attention"]) if per else dict(c.get("rope_scaling") or {})
            rope.setdefault("rope_theta", c.get("rope_theta", 1_000_000.0))
            local = per["sliding_attention"] if per else {"rope_theta": c.get("rope_local_base_freq", 10_000.0)}
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"{path}/config.json: scaled rope on sliding layers ({local}) is not modelled")
            extra = dict(rope_local_theta=float(local["rope_theta"]),
                         query_pre_attn_scalar=c.get("query_pre_attn_scalar", 256),
                         final_logit_softcapping=c.get("final_logit_softcapping"))
            if not c.get("layer_types"):  # older configs: every sliding_window_pattern-th layer is global
                pat = c.get("sliding_window_pattern", 6)
                c = dict(c, layer_types=["sliding_attention" if (i + 1) % pat else "full_attention" for i in range(n)])
        elif arch == "gpt_oss":
            extra = dict(num_experts=c["num_local_experts"], experts_per_token=c["num_experts_per_tok"],
                         swiglu_alpha=c.get("swiglu_alpha", 1.702), swiglu_limit=c.get("swiglu_limit", 7.0))
            if not c.get("layer_types"):  # HF's default: sliding, full, sliding, ...
                c = dict(c, layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)])
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind != "default":
            if kind not in ROPE_TYPES:
                raise ValueError(f"{path}/config.json: rope type '{kind}' not supported ({sorted(ROPE_TYPES)})")
            scaling = {f.name: rope[f.name] for f in fields(RopeScaling) if rope.get(f.name) is not None}
            scaling["rope_type"] = kind
        qwen = mt.startswith("qwen2")
        heads = c["num_attention_heads"]
        bias = c.get("attention_bias", arch == "gpt_oss")
        return cls.from_dict(dict(
            name=path.name, num_layers=n, hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab_size=c["vocab_size"],
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 150000.0 if arch == "gpt_oss" else 10000.0))),
            rope_scaling=scaling, rms_norm_eps=c.get("rms_norm_eps", 1e-5),
            tie_embeddings=c.get("tie_word_embeddings", arch == "gemma3"),
            attention_bias=qwen or bias, attention_out_bias=not qwen and bias,
            dtype=dtype or {"float16": "float16", "float32": "float32"}.get(
                c.get("torch_dtype") or c.get("dtype"), "bfloat16"),
            checkpoint=str(path), layers=_hf_layers(c), arch=arch, **extra))


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


def rope_inv_freq(cfg: ModelConfig, sliding: bool = False) -> torch.Tensor:
    """[D/2] float32 inverse frequencies of the full layers, scaled as configured; `sliding`: of
    the sliding layers (Gemma-3's unscaled rope_local_theta where set, else the full layers')."""
    return rope_params(cfg, sliding)[0]


def rope_params(cfg: ModelConfig, sliding: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [D/2] fp32, attention scaling of cos/sin: YaRN's, else 1.0), as HF's
    rope init functions compute them (default, llama3, linear, yarn)."""
    d = cfg.head_dim
    local = sliding and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = None if local else cfg.rope_scaling
    if s is None:
        return inv, 1.0
    if s.rope_type == "linear":
        return inv / s.factor, 1.0
    if s.rope_type == "yarn":
        return _yarn(inv, s, d, theta)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor  # longer: divide by factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor  # shorter: keep
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn(inv: torch.Tensor, s: RopeScaling, d: int, base: float) -> tuple[torch.Tensor, float]:
    """YaRN (HF `_compute_yarn_parameters`, without DeepSeek's mscale keys): frequencies above the
    beta_fast / beta_slow correction range kept, below divided by `factor`, a linear ramp between;
    cos/sin scaled by attention_factor (default 0.1 ln(factor) + 1)."""
    attn = s.attention_factor if s.attention_factor is not None else (
        1.0 if s.factor <= 1 else 0.1 * math.log(s.factor) + 1.0)

    def dim_of(rotations):
        return d * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # HF: no singularity
    keep = 1 - ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)  # inv = 1 / pos_freqs
    return 1.0 / (s.factor * pos_freqs) * (1 - keep) + inv * keep, attn


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype):
    """cos, sin [T, D] in `dtype` (HF's layout: halves repeated; x attention scaling in fp32)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2] fp32
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


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
    # hybrid pools (issue 16; kvbench.engines.torch_engine.HybridKV): one AttnMetadata per page
    # table (its own slot_mapping and page_table, the rest equal to this one's), and the table
    # each layer reads. None: every layer reads this one (one pool, one page table).
    table_metas: tuple[AttnMetadata, ...] | None = None
    layer_table: tuple[int, ...] | None = None

    def for_layer(self, i: int) -> AttnMetadata:
        """The metadata layer i reads: its page table's under a hybrid pool, else this one."""
        return self if self.layer_table is None else self.table_metas[self.layer_table[i]]


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


#: a mixed step's decode rows and prefill chunks as parallel branches of a CUDA graph (`side_stream`)
PARALLEL_MIXED = True
_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream a captured mixed step's decode attention forks onto, one per device (made
    outside any capture: `GPUEngine._capture` calls this before it captures)."""
    k = device.index if device.index is not None else torch.cuda.current_device()
    st = _SIDE_STREAMS.get(k)
    if st is None:
        st = _SIDE_STREAMS[k] = torch.cuda.Stream(torch.device("cuda", k))
    return st


#: RMSNorm rounding per architecture (RMSNorm.style)
NORM_STYLES = {"llama": "llama", "gemma3": "gemma", "gpt_oss": "gpt_oss"}


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, in the rounding of an architecture's HF module:
    "llama": weight * normed.to(dtype), by the fused kernel `ops.rms_norm`;
    "gemma": (normed * (1 + weight)) in fp32, then rounded (Gemma3RMSNorm; torch ops);
    "gpt_oss": (weight * normed) in fp32, then rounded (GptOssRMSNorm; torch ops)."""

    def __init__(self, dim: int, eps: float, style: str = "llama"):
        super().__init__()
        self.eps, self.style = eps, style
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, ops, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x), or with `residual`: residual += x (in place, rounded to its dtype), norm(residual)."""
        if self.style == "llama":
            return ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = residual.add_(x)
        xf = x.float()
        h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        return (h * (1.0 + w) if self.style == "gemma" else w * h).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0, chunk: int = 0):
        super().__init__()
        self.cfg = cfg
        # this layer's attention bound (0 = none): sliding window / chunk, passed to the kernels
        self.window, self.chunk = window, chunk
        # its rope table (LlamaModel.rope_tables): sliding layers have their own base where configured
        self.rope = "sliding" if window and cfg.rope_local_theta is not None else "full"
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5  # of the attention softmax
        hq, hkv, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        gemma = cfg.arch == "gemma3"
        norm = partial(RMSNorm, eps=cfg.rms_norm_eps, style=NORM_STYLES[cfg.arch])
        self.input_norm = norm(h)
        self.qkv = nn.Linear(h, (hq + 2 * hkv) * d, bias=cfg.attention_bias)  # q | k | v rows
        self.o_proj = nn.Linear(hq * d, h, bias=cfg.attention_out_bias)
        # Gemma-3: each head's q and k normed (before rope), the attention output normed before
        # the residual add, the MLP output normed
        self.q_norm, self.k_norm = (norm(d), norm(d)) if gemma else (None, None)
        self.attn_out_norm = norm(h) if gemma else None
        self.post_norm = norm(h)  # residual add + norm before the MLP (Gemma-3: pre_feedforward_layernorm)
        self.mlp_out_norm = norm(h) if gemma else None
        # gpt-oss: a learned logit per query head, in each softmax's denominator (no value)
        self.sinks = nn.Parameter(torch.empty(hq)) if cfg.arch == "gpt_oss" else None
        if cfg.arch == "gpt_oss":
            self.moe = MoE(cfg)
        else:
            self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)  # gate | up rows
            self.down = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(self, x, residual, cos, sin, meta: AttnMetadata, k_cache, v_cache, ops):
        """x [T, hidden]: the previous layer's MLP output, or the embeddings (residual None);
        residual [T, hidden]: the stream before x is added (updated in place).
        cos/sin [T, D]; k_cache/v_cache [num_slots, H_kv, D]. Returns (MLP output, residual)."""
        c, t = self.cfg, x.shape[0]
        if residual is None:
            residual, h = x, self.input_norm(x, ops)
        else:  # residual += x; h = norm(residual)
            h = self.input_norm(x, ops, residual)
        qkv = ops.linear(h, self.qkv.weight, self.qkv.bias)  # [T, (H_q + 2 H_kv) D]
        if self.q_norm is not None:  # Gemma-3: q and k normed per head before rope, in place in qkv
            qn, kn = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            for part, norm in ((qkv[:, :qn], self.q_norm), (qkv[:, qn:qn + kn], self.k_norm)):
                heads = part.view(t, -1, c.head_dim)  # [T, H, D] view into qkv
                heads.copy_(norm(heads, ops))
        # rotates q, k in place; writes k, v into their slots; q/k/v are strided views of qkv
        q, k, v = ops.rope_kv_write(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                    c.num_heads, c.num_kv_heads)
        scale = self.scale
        bound = dict(window=self.window, chunk=self.chunk)
        if self.sinks is not None:  # gpt-oss
            bound["sinks"] = self.sinks
        # the attention output is written over q (dead after attention; out=q: no allocation),
        # so o is a strided view of qkv, its heads of a token adjacent: reshape is a view
        if meta.decode_only:  # T == B: one query per request
            o = ops.decode_attention(q, k_cache, v_cache, meta.page_table, meta.seq_lens,
                                     meta.page_size, sm_scale=scale, contiguous=meta.contiguous,
                                     max_seq_len=meta.max_seq_len, out=q, **bound)
        elif meta.num_decode == 0:
            # the prefix through the page table, the new tokens' K/V straight from qkv
            o = ops.extend_attention(q, k_cache, v_cache, meta.page_table, meta.query_start_loc,
                                     meta.seq_lens, meta.page_size, sm_scale=scale,
                                     contiguous=meta.contiguous, k_new=k, v_new=v, out=q,
                                     max_seq_len=meta.max_seq_len, **bound)
        else:  # a mixed step: its one-token rows (first) by the decode kernel, the chunks by extend
            d = meta.num_decode
            qd, qe, o = q[:d], q[d:], q
            # in a CUDA graph the two run as parallel branches (`side_stream`): each is a few
            # programs per SM and latency-bound, so the shorter one hides under the other. They
            # read the caches and write disjoint rows of q (and their own split scratch).
            fork = PARALLEL_MIXED and q.is_cuda and torch.cuda.is_current_stream_capturing()
            if fork:
                main, side = torch.cuda.current_stream(q.device), side_stream(q.device)
                side.wait_stream(main)
                torch.cuda.set_stream(side)
            ops.decode_attention(qd, k_cache, v_cache, meta.page_table[:d], meta.seq_lens[:d],
                                 meta.page_size, sm_scale=scale, contiguous=meta.contiguous,
                                 max_seq_len=meta.max_seq_len, out=qd, **bound)
            if fork:
                torch.cuda.set_stream(main)
            ops.extend_attention(qe, k_cache, v_cache, meta.page_table[d:], meta.extend_start_loc,
                                 meta.seq_lens[d:], meta.page_size, sm_scale=scale,
                                 contiguous=meta.contiguous, k_new=k[d:], v_new=v[d:], out=qe,
                                 max_seq_len=meta.max_seq_len, **bound)
            if fork:
                main.wait_stream(side)
        a = ops.linear(o.reshape(t, c.num_heads * c.head_dim), self.o_proj.weight, self.o_proj.bias)
        if self.attn_out_norm is not None:  # Gemma-3
            a = self.attn_out_norm(a, ops)
        h = self.post_norm(a, ops, residual)  # residual += a
        return self.feed_forward(h, ops), residual

    def feed_forward(self, h: torch.Tensor, ops) -> torch.Tensor:
        """The MLP of h [T, hidden] -> [T, hidden]: SwiGLU (llama), GeGLU then its norm (gemma3),
        the MoE (gpt_oss)."""
        if self.cfg.arch == "gpt_oss":
            return self.moe(h)
        if self.cfg.arch == "llama":  # silu(gate) * up: at batch 1 in the gate_up kernel, else its own launch
            return ops.linear(ops.linear(h, self.gate_up.weight, silu_mul=True), self.down.weight)
        gate_up = ops.linear(h, self.gate_up.weight)  # [T, 2 intermediate]
        gate, up = gate_up.chunk(2, dim=-1)  # Gemma-3: gelu(gate, tanh) * up (torch ops, HF's rounding)
        return self.mlp_out_norm(ops.linear(F.gelu(gate, approximate="tanh") * up, self.down.weight), ops)


class MoE(nn.Module):
    """gpt-oss's feed-forward (HF GptOssMLP). The router (linear + bias) picks each token's top-k
    experts and softmaxes their k logits. Expert e: gate_up = x @ gate_up_proj[e] + bias (gate and
    up interleaved), gate clamped to <= limit, up to [-limit, limit], out = ((up + 1) * gate *
    sigmoid(alpha * gate)) @ down_proj[e] + bias; a token's output is the routing-weighted sum.
    Plain torch, one expert at a time (correctness, not speed: no grouped GEMM, no fused kernel):
    eager, over the experts the step routes to (a host sync); while a CUDA graph is captured,
    every expert over every token with zero weights where not routed (same values)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.top_k, self.alpha, self.limit = cfg.experts_per_token, cfg.swiglu_alpha, cfg.swiglu_limit
        self.router = nn.Linear(h, e, bias=True)
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))  # HF's layout: x @ w; gate, up interleaved
        self.gate_up_bias = nn.Parameter(torch.empty(e, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_bias = nn.Parameter(torch.empty(e, h))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [N, hidden] -> [N, hidden] (HF GptOssExperts, same rounding)."""
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_bias[e]  # [N, 2I]
        gate = gate_up[..., ::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return ((up + 1) * glu) @ self.down_proj[e] + self.down_bias[e]

    def forward(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] in x's dtype. dense: every expert on every token (None:
        while a CUDA graph is being captured)."""
        logits = F.linear(x, self.router.weight, self.router.bias)  # [T, E]
        top, idx = torch.topk(logits, self.top_k, dim=-1)  # [T, k]
        weights = torch.softmax(top, dim=1, dtype=top.dtype)
        out = torch.zeros_like(x)
        if dense is None:
            dense = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if dense:
            for e in range(self.gate_up_proj.shape[0]):
                w = (weights * (idx == e)).sum(-1, keepdim=True)  # [T, 1]: 0 where not routed
                out += (self.expert(e, x) * w).to(x.dtype)
            return out
        for e in torch.unique(idx).tolist():
            tok, k = torch.where(idx == e)
            out.index_add_(0, tok, (self.expert(e, x[tok]) * weights[tok, k, None]).to(x.dtype))
        return out


class LlamaModel(nn.Module):
    """Build with `build_model`; parameters are created on the meta device, then materialized."""

    def __init__(self, cfg: ModelConfig, attention: str = "reference"):
        super().__init__()
        self.cfg = cfg
        self.ops = attention_ops(attention)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w, ch) for w, ch in cfg.layer_bounds())
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, NORM_STYLES[cfg.arch])
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size,
                                                                 bias=False)
        self.inv_freq: torch.Tensor | None = None  # [D/2] fp32 of the full layers, set by build_model
        # {DecoderLayer.rope: (inv_freq [D/2] fp32, cos/sin scaling)}, set by build_model
        self.rope_tables: dict[str, tuple[torch.Tensor, float]] = {}
        # Gemma-3 scales the embeddings by sqrt(hidden_size) rounded to the model dtype (as HF does)
        self.embed_scale = (float(torch.tensor(cfg.hidden_size ** 0.5, device="cpu").to(DTYPES[cfg.dtype]))
                            if cfg.arch == "gemma3" else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_pool) -> torch.Tensor:
        """input_ids, positions [T] int64; kv_pool [L, 2, slots, H_kv, D], or per layer a (k_cache,
        v_cache) pair of [slots, H_kv, D] views (hybrid pools: each layer in its table's space,
        with `meta.for_layer(i)` its table's slots) -> logits [B_emit, V]."""
        per_layer = not isinstance(kv_pool, torch.Tensor)
        x, residual = self.embed(input_ids), None  # [T, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        rope = {k: _cos_sin(positions, inv, sc, x.dtype) for k, (inv, sc) in self.rope_tables.items()}
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_pool[i] if per_layer else (kv_pool[i, 0], kv_pool[i, 1])
            x, residual = layer(x, residual, *rope[layer.rope], meta.for_layer(i), k_cache, v_cache, self.ops)
        idx = meta.logits_idx  # only emitting tokens: the last add and norm on B_emit rows
        x = self.norm(x[idx], self.ops, residual[idx])
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, w)  # [B_emit, vocab]
        if (cap := self.cfg.final_logit_softcapping) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

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
    model.rope_tables = {k: (inv.to(device), sc) for k, (inv, sc) in
                         (("full", rope_params(cfg)), ("sliding", rope_params(cfg, sliding=True)))
                         if any(layer.rope == k for layer in model.layers)}
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
    """Deterministic for a (seed, device): N(0, 0.02) matrices (and gpt-oss sinks), unit norms
    (Gemma's x * (1 + w): w = 0), zero biases."""
    g = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(0.0 if model.cfg.arch == "gemma3" else 1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=g)


def hf_tensor_map(model: LlamaModel) -> list[tuple[str, torch.Tensor]]:
    """(HF parameter name, the slice of our parameter it fills), in load order: Llama / Qwen2,
    Gemma3ForCausalLM, GptOssForCausalLM (its experts unquantized: bf16 / fp32 tensors, not the
    MXFP4 `_blocks` / `_scales` of the released checkpoints)."""
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
        out.append((f"{p}input_layernorm.weight", l.input_norm.weight))
        if c.arch == "gemma3":
            out += [(f"{p}self_attn.q_norm.weight", l.q_norm.weight),
                    (f"{p}self_attn.k_norm.weight", l.k_norm.weight),
                    (f"{p}post_attention_layernorm.weight", l.attn_out_norm.weight),
                    (f"{p}pre_feedforward_layernorm.weight", l.post_norm.weight),
                    (f"{p}post_feedforward_layernorm.weight", l.mlp_out_norm.weight)]
        else:
            out.append((f"{p}post_attention_layernorm.weight", l.post_norm.weight))
        if c.arch == "gpt_oss":
            m, x = l.moe, f"{p}mlp.experts."
            out += [(f"{p}self_attn.sinks", l.sinks), (f"{p}mlp.router.weight", m.router.weight),
                    (f"{p}mlp.router.bias", m.router.bias), (f"{x}gate_up_proj", m.gate_up_proj),
                    (f"{x}gate_up_proj_bias", m.gate_up_bias), (f"{x}down_proj", m.down_proj),
                    (f"{x}down_proj_bias", m.down_bias)]
        else:
            out += [(f"{p}mlp.gate_proj.weight", l.gate_up.weight[:inter]),
                    (f"{p}mlp.up_proj.weight", l.gate_up.weight[inter:]),
                    (f"{p}mlp.down_proj.weight", l.down.weight)]
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
