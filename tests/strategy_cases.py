"""Every strategy yaml in configs/strategy/, plus variants of their options, built small.

A new strategy is one file in strategies/ and one yaml: the shared tests pick it up from here.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

STRATEGY_DIR = Path(__file__).resolve().parents[1] / "configs" / "strategy"
STRATEGY_YAMLS = sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))

# option variants worth covering beyond each yaml's defaults
VARIANTS = {
    "slab": [{}, {"reservation": "pow2", "placement": "best_fit"}, {"reservation": "oracle", "page_size": 4}],
    "paged": [{}, {"page_size": 4}, {"page_size": 4, "prefix_caching": False},
              {"page_size": 3, "prefix_visibility": "scheduled"}, {"page_size": 3, "dedup_touch": True},
              # host tier (issue 14): 2x the property tests' pool, and a small one that evicts often
              {"page_size": 3, "host_tier_tokens": 384}, {"page_size": 2, "host_tier_tokens": 24,
                                                          "host_tier_eviction": "fifo"}],
    "radix": [{}, {"page_size": 4}, {"prefix_visibility": "scheduled"}, {"page_size": 3, "prefix_visibility": "scheduled"},
              # host tier (issue 14): 2x the property tests' pool, and a small one that evicts often
              {"page_size": 1, "host_tier_tokens": 384}, {"page_size": 3, "host_tier_tokens": 24,
                                                          "host_tier_eviction": "fifo"}],
}


# page sizes each kind of strategy (the yaml's `name:`) is checked at by the content model
PAGE_SIZES = {"slab": (1, 3), "paged": (1, 2, 3, 16), "radix": (1, 2, 3, 16),
              "hybrid_separate": (1, 3, 4), "hybrid_unified": (1, 3, 4), "hybrid_jenga": (1, 3, 4),
              "hybrid_radix": (1, 3, 4)}

# A hybrid pool design (a constructor with `geometry=`, strategies/hybrid/) is built on a small
# model with layer groups (option `model=`, default "sliding"): windows and chunks of a few pages
# at the page sizes above, so pages leave windows in every test.
HYBRID_MODELS = {
    "sliding": {"pattern": ["local", "local", "global"],  # 4 sliding layers (window 7), 2 full
                "groups": {"local": {"kind": "sliding", "window": 7}, "global": {"kind": "full"}}},
    "chunked": {"pattern": ["chunk", "chunk", "chunk", "global"],  # Llama-4-like: chunks of 6
                "groups": {"chunk": {"kind": "chunked", "chunk": 6}, "global": {"kind": "full"}}},
    "mixed": {"pattern": ["local", "global", "wide"],  # two windows, and a group with 2x the bytes per token
              "groups": {"local": {"kind": "sliding", "window": 5}, "global": {"kind": "full"},
                         "wide": {"kind": "sliding", "window": 11, "num_kv_heads": 2}}},
    "state": {"pattern": ["linear", "linear", "global"],  # recurrent state layers (hits: none)
              "groups": {"linear": {"kind": "state", "state_bytes": 96}, "global": {"kind": "full"}}},
}
for _name in ("hybrid_separate", "hybrid_unified"):
    VARIANTS[_name] = [{}, {"model": "chunked"}, {"model": "mixed", "page_size": 2}, {"model": "state"},
                       {"prefix_caching": False}]
VARIANTS["hybrid_separate"].append({"split": [0.5, 0.5]})
VARIANTS["hybrid_jenga"] = [{}, {"model": "chunked"}, {"model": "mixed", "page_size": 2},
                            {"model": "state", "page_size": 2, "state_interval": 4}]  # (strategies/hybrid/jenga.py)
VARIANTS["hybrid_radix"] = [{}, {"model": "chunked"}, {"model": "mixed", "page_size": 2}, {"model": "state"},
                            {"swa_full_tokens_ratio": 0.4}]  # (strategies/hybrid/hybrid_radix.py)


def yaml_name(stem: str) -> str:
    """The `name:` a yaml gives its strategy (several yamls share one, e.g. slab_pow2 → slab)."""
    return str(OmegaConf.load(STRATEGY_DIR / f"{stem}.yaml").name)


def page_size_cases() -> list[tuple[str, dict]]:
    """Every yaml at every page size its kind allows, plus the variants of `VARIANTS` that set
    an option other than the page size."""
    out = []
    for stem in STRATEGY_YAMLS:
        name = yaml_name(stem)
        default = int(OmegaConf.load(STRATEGY_DIR / f"{stem}.yaml").get("page_size", 1))
        out += [(stem, {"page_size": ps}) for ps in PAGE_SIZES.get(name, (default,))]
        out += [(stem, v) for v in VARIANTS.get(stem, []) if set(v) - {"page_size"}]
    return out


def cases() -> list[tuple[str, dict]]:
    return [(name, opts) for name in STRATEGY_YAMLS for opts in VARIANTS.get(name, [{}])]


def case_id(case: tuple[str, dict]) -> str:
    name, opts = case
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def hybrid_geometry(model, page_size: int, capacity_tokens: int):
    """The PoolGeometry of a HYBRID_MODELS shape (1 KV head of dim 2, float32: 16 B per
    layer-token), or of a model config (a mapping: e.g. the tiny Llama the torch engine runs)."""
    from kvbench.sizes import PoolGeometry

    if isinstance(model, str):
        layers = HYBRID_MODELS[model]
        model = {"num_layers": 2 * len(layers["pattern"]), "num_kv_heads": 1, "head_dim": 2, "dtype": "float32",
                 "layers": layers}
    return PoolGeometry.of(model, page_size, capacity_tokens // page_size)


def build(name: str, capacity_tokens: int, max_model_len: int, **opts):
    """The strategy of yaml `name` with `opts`; a hybrid pool design gets the geometry of option
    `model` (a HYBRID_MODELS name, default "sliding", or a model config); others ignore it."""
    model = opts.pop("model", "sliding")
    cfg = OmegaConf.merge(OmegaConf.load(STRATEGY_DIR / f"{name}.yaml"), opts)
    if "geometry" in inspect.signature(get_class(cfg._target_)).parameters:  # a hybrid pool design
        geometry = hybrid_geometry(model, int(cfg.get("page_size", 1)), capacity_tokens)
        return instantiate(cfg, _partial_=True)(capacity_tokens=capacity_tokens, max_model_len=max_model_len,
                                                geometry=geometry)
    return instantiate(cfg, capacity_tokens=capacity_tokens, max_model_len=max_model_len)
