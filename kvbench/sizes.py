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

A Llama-like model is one group of full-attention layers. A model with a `layers:` description
(issue 16: Gemma-3, gpt-oss, hybrids) has several `LayerGroup`s (full, sliding, chunked, state);
bytes per token sum over them, and the pool's bytes are `capacity_tokens x bytes_per_token` in
every design, so designs compare at equal pool bytes. The single-group strategies (paged, radix,
slab) keep every group's K/V for every token (the uniform layout; they ignore windows and hold no
state); the hybrid designs (strategies/hybrid/) lay the same bytes out per group.
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


def _field(cfg, name: str, default=None):
    if isinstance(cfg, Mapping):
        return cfg[name] if name in cfg or default is None else cfg.get(name, default)
    return getattr(cfg, name) if default is None else getattr(cfg, name, default)


#: layer kinds: what a layer keeps per request and which earlier positions its attention reads
#: (kvbench.strategies.hybrid.hits states each kind's prefix-hit rule)
KINDS: tuple[str, ...] = ("full", "sliding", "chunked", "state")


@dataclass(frozen=True)
class LayerGroup:
    """Layers that store the same K/V per token: `num_layers` x (K, V) x `num_kv_heads` x `head_dim`
    elements of `dtype` per token.

    kind: "full" (attends to every earlier position), "sliding" (the last `window` positions,
    itself included), "chunked" (the positions of its own `chunk`-aligned chunk), or "state"
    (a recurrent layer: no K/V per token, `state_bytes` per layer per request; simulation only).
    name: the group's name in the model's `layers:` description (default: its kind).
    """

    kind: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # canonical name (a key of DTYPE_BYTES)
    window: int = 0  # sliding: positions a query reads (itself included); else 0
    chunk: int = 0  # chunked: chunk length in positions; else 0
    state_bytes: int = 0  # state: bytes of one layer's recurrent state per request; else 0
    name: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"layer group '{self.label}': kind={self.kind!r} must be one of {', '.join(KINDS)}")
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layer group '{self.label}': {name}={value!r} must be an integer >= 1")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"layer group '{self.label}': dtype {self.dtype!r} must be {dtypes_text()}")
        own = {"sliding": "window", "chunked": "chunk", "state": "state_bytes"}.get(self.kind)
        for name in ("window", "chunk", "state_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"layer group '{self.label}': {name}={value!r} must be an integer")
            if name == own and value < 1:
                raise ValueError(f"layer group '{self.label}': kind {self.kind} needs {name} >= 1, got {value}")
            if name != own and value != 0:
                raise ValueError(f"layer group '{self.label}': {name}={value} is for kind "
                                 f"{ {'window': 'sliding', 'chunk': 'chunked', 'state_bytes': 'state'}[name]} only")

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def bytes_per_token(self) -> int:
        """2 (K, V) x layers x kv_heads x head_dim x dtype bytes (0 for a state group)."""
        if self.kind == "state":
            return 0
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_layer_token(self) -> int:
        """K/V bytes of one layer for one token (0 for a state group)."""
        return self.bytes_per_token // self.num_layers

    @property
    def bytes_per_request(self) -> int:
        """Fixed bytes a running request holds in this group: layers x state_bytes (state), else 0."""
        return self.num_layers * self.state_bytes


_GROUP_KEYS = ("kind", "window", "chunk", "state_bytes", "num_kv_heads", "head_dim")


def _layers_error(model_cfg, what: str) -> ValueError:
    return ValueError(f"model.layers{what}")


def _described_groups(model_cfg, layers) -> tuple[LayerGroup, ...]:
    """The groups of a `layers:` description (see `layer_groups`); ValueError naming the key."""
    if not isinstance(layers, Mapping) or set(layers) - {"pattern", "groups"} or "pattern" not in layers \
            or "groups" not in layers:
        raise _layers_error(model_cfg, f"={dict(layers) if isinstance(layers, Mapping) else layers!r}: must be a "
                            "mapping with keys pattern (a list of group names) and groups (name: {kind: ...})")
    pattern, groups = layers["pattern"], layers["groups"]
    if isinstance(pattern, (str, bytes)) or not hasattr(pattern, "__len__") or not len(pattern):
        raise _layers_error(model_cfg, f".pattern={pattern!r}: must be a non-empty list of group names")
    if not isinstance(groups, Mapping) or not len(groups):
        raise _layers_error(model_cfg, f".groups={groups!r}: must be a mapping of group name to {{kind: ...}}")
    for name in pattern:
        if str(name) not in groups:
            raise _layers_error(model_cfg, f".pattern: {name!r} is not a group of model.layers.groups "
                                f"({', '.join(map(str, groups))})")
    num_layers = int(_field(model_cfg, "num_layers"))
    counts = {str(n): 0 for n in groups}
    for i in range(num_layers):  # the pattern repeats over the model's layers
        counts[str(pattern[i % len(pattern)])] += 1
    dtype = canonical_dtype(_field(model_cfg, "dtype"))
    out = []
    for name, spec in groups.items():
        name = str(name)
        if not counts[name]:
            continue  # (a group the pattern never reaches within num_layers holds nothing)
        if not isinstance(spec, Mapping) or "kind" not in spec or set(spec) - set(_GROUP_KEYS):
            raise _layers_error(model_cfg, f".groups.{name}={spec!r}: must be a mapping with kind "
                                f"({', '.join(KINDS)}) and optionally {', '.join(_GROUP_KEYS[1:])}")
        kw = {}
        for key in _GROUP_KEYS[1:]:
            value = spec.get(key, 0 if key in ("window", "chunk", "state_bytes") else _field(model_cfg, key))
            if not isinstance(value, int) or isinstance(value, bool):
                raise _layers_error(model_cfg, f".groups.{name}.{key}={value!r}: must be an integer")
            kw[key] = int(value)
        try:
            out.append(LayerGroup(str(spec["kind"]), counts[name], dtype=dtype, name=name, **kw))
        except ValueError as err:
            raise _layers_error(model_cfg, f".groups.{name}: {err}") from None
    if not any(g.kind != "state" for g in out):
        raise _layers_error(model_cfg, ": every layer is a state layer; a model needs at least one attention layer")
    return tuple(out)


def layer_groups(model_cfg) -> tuple[LayerGroup, ...]:
    """The KV layer groups of a model config (a yaml mapping, DictConfig or ModelConfig).

    Without `layers:` (every Llama/Qwen yaml): one group of full-attention layers, as before.
    With it, e.g. Gemma-3's five sliding-window layers to one full layer:

        layers:
          pattern: [local, local, local, local, local, global]   # repeated over num_layers
          groups:
            local: {kind: sliding, window: 512}
            global: {kind: full}

    Each group's kind is full | sliding (window) | chunked (chunk) | state (state_bytes per layer
    per request; simulation only); `num_kv_heads` / `head_dim` default to the model's and may
    be set per group. Groups come in the order of `groups:`; one the pattern never reaches is
    left out. Raises ValueError naming the key (kvbench.schema turns it into a ConfigError)."""
    layers = _field(model_cfg, "layers", default=False)
    if layers is not None and layers is not False:
        return _described_groups(model_cfg, layers)
    return (LayerGroup("full", int(_field(model_cfg, "num_layers")), int(_field(model_cfg, "num_kv_heads")),
                       int(_field(model_cfg, "head_dim")), canonical_dtype(_field(model_cfg, "dtype"))),)


def kv_bytes_per_token(model_cfg) -> int:
    """KV bytes one token holds across all layers: the sum over attention groups of
    2 (K, V) x layers x kv_heads x head_dim x dtype bytes (a state group holds none per token)."""
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

    # ---- per group (issue 16) ------------------------------------------------------------------
    @property
    def hybrid(self) -> bool:
        """More than one group, or one that is not full attention (a hybrid pool design applies)."""
        return len(self.groups) > 1 or self.groups[0].kind != "full"

    def group_bytes_per_page(self, i: int) -> int:
        """Bytes of one page of `page_size` tokens of group i alone (0 for a state group)."""
        return self.page_size * self.groups[i].bytes_per_token

    def group_capacity_bytes(self, i: int) -> int:
        """Bytes group i holds in the uniform layout (every slot holds a token of every group:
        the layout of the single-group strategies)."""
        return self.num_pages * self.group_bytes_per_page(i)

    @property
    def state_bytes_per_request(self) -> int:
        """Fixed bytes a running request holds in the state groups."""
        return sum(g.bytes_per_request for g in self.groups)
