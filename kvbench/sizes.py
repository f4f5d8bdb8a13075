"""KV sizes, computed in one place: dtype bytes, bytes per token, and the pool's geometry.

Torch-free (the sim sizes its pool without importing torch); `kvbench.model` maps these dtype
names to torch dtypes and takes their byte counts from here.

    model (yaml / ModelConfig) ──► layer_groups ──► bytes per token (sum over groups)
    strategy (page_size, num_pages) ──┐
                                      ▼
    PoolGeometry (frozen, built once per run by kvbench.run):
        capacity_tokens = num_pages × page_size
        bytes_per_page  = page_size × bytes_per_token
        capacity_bytes  = num_pages × bytes_per_page

Today a model is one group of full-attention layers; the layer groups of issue 16 (sliding
window, chunked, recurrent state) become more `LayerGroup`s of a `PoolGeometry`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

GIB = 2**30

#: bytes of one element, by dtype name (the names of torch's dtypes).
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}
#: older names configs may use, and the dtype each means (vLLM's `fp8` KV cache is e4m3).
DTYPE_ALIASES: dict[str, str] = {"float8": "float8_e4m3fn", "fp8": "float8_e4m3fn"}
#: every name a config may give as `model.dtype`.
DTYPE_NAMES: tuple[str, ...] = (*DTYPE_BYTES, *DTYPE_ALIASES)


def dtypes_text() -> str:
    """The accepted names, for error messages."""
    aliases = ", ".join(f"{a} = {c}" for a, c in DTYPE_ALIASES.items())
    return f"one of {', '.join(DTYPE_BYTES)} (aliases: {aliases})"


def canonical_dtype(name: str) -> str:
    """`name` with an alias resolved; ValueError naming the accepted names if it is unknown."""
    name = DTYPE_ALIASES.get(str(name), str(name))
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r}: must be {dtypes_text()}")
    return name


def dtype_bytes(name: str) -> int:
    """Bytes of one element of dtype `name` (an alias is accepted)."""
    return DTYPE_BYTES[canonical_dtype(name)]


def _field(cfg, name: str):
    return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)


@dataclass(frozen=True)
class LayerGroup:
    """Layers that store the same K/V per token: `num_layers` x (K, V) x `num_kv_heads` x `head_dim`
    elements of `dtype` per token."""

    kind: str  # "full" (full attention); issue 16 adds "sliding", "chunked", "state"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # canonical name (a key of DTYPE_BYTES)

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layer group '{self.kind}': {name}={value!r} must be an integer >= 1")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"layer group '{self.kind}': dtype {self.dtype!r} must be {dtypes_text()}")

    @property
    def bytes_per_token(self) -> int:
        """2 (K, V) x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]


def layer_groups(model_cfg) -> tuple[LayerGroup, ...]:
    """The KV layer groups of a model config (a yaml mapping, DictConfig or ModelConfig): one group
    of full-attention layers today."""
    return (LayerGroup("full", int(_field(model_cfg, "num_layers")), int(_field(model_cfg, "num_kv_heads")),
                       int(_field(model_cfg, "head_dim")), canonical_dtype(_field(model_cfg, "dtype"))),)


def kv_bytes_per_token(model_cfg) -> int:
    """KV bytes one token holds across all layers: 2 (K, V) x layers x kv_heads x head_dim x dtype bytes."""
    return sum(g.bytes_per_token for g in layer_groups(model_cfg))


def tokens_in_gib(gib: float, bytes_per_token: int) -> int:
    """Whole tokens of `bytes_per_token` that `gib` GiB hold."""
    return int(float(gib) * GIB) // bytes_per_token


@dataclass(frozen=True)
class PoolGeometry:
    """The KV pool of one run: `num_pages` pages of `page_size` token slots, each slot holding one
    token's K/V in every layer group. Frozen; built once per run (`of`), after the strategy has
    rounded the capacity down to whole pages."""

    page_size: int
    num_pages: int
    groups: tuple[LayerGroup, ...]

    def __post_init__(self):
        for name in ("page_size", "num_pages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"pool geometry: {name}={value!r} must be an integer >= 1")
        if not self.groups or not all(isinstance(g, LayerGroup) for g in self.groups):
            raise ValueError(f"pool geometry: groups={self.groups!r} must be a non-empty tuple of LayerGroup")

    @classmethod
    def of(cls, model_cfg, page_size: int, num_pages: int) -> PoolGeometry:
        return cls(int(page_size), int(num_pages), layer_groups(model_cfg))

    @property
    def bytes_per_token(self) -> int:
        return sum(g.bytes_per_token for g in self.groups)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def bytes_per_page(self) -> int:
        return self.page_size * self.bytes_per_token

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page
