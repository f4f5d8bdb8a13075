"""Every strategy yaml in configs/strategy/, plus variants of their options, built small.

A new strategy is one file in strategies/ and one yaml: the shared tests pick it up from here.
"""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
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
PAGE_SIZES = {"slab": (1, 3), "paged": (1, 2, 3, 16), "radix": (1, 2, 3, 16)}


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


def build(name: str, capacity_tokens: int, max_model_len: int, **opts):
    cfg = OmegaConf.merge(OmegaConf.load(STRATEGY_DIR / f"{name}.yaml"), opts)
    return instantiate(cfg, capacity_tokens=capacity_tokens, max_model_len=max_model_len)
