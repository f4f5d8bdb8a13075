"""What every figure shares: one colour per strategy label, one per slot state, readable names.

A label keeps its colour in every figure and every report (it depends only on the label):
slab variants are warm, paged variants blue, radix variants green; an unknown label gets a
colour from its name's hash.
"""
from __future__ import annotations

import zlib

# the six slot states of DESIGN.md, in stacking order: held by requests first, then the rest
STATES = ["token_states", "reserved", "internal_frag", "external_frag", "cached", "free"]
HELD = STATES[:4]
STATE_NAMES = {"token_states": "token states", "reserved": "reserved (future tokens)",
               "internal_frag": "internal fragmentation", "external_frag": "external fragmentation",
               "cached": "cached prefix (evictable)", "free": "free"}
STATE_COLOURS = {"token_states": "#4daf4a", "reserved": "#ffd92f", "internal_frag": "#ff7f00",
                 "external_frag": "#e41a1c", "cached": "#80b1d3", "free": "#e0e0e0"}
# the timeline's column of each state (kvbench.metrics.TIMELINE_COLUMNS)
TIMELINE_STATE = {"token_states": "token", "reserved": "reserved", "internal_frag": "internal",
                  "external_frag": "external", "cached": "cached", "free": "free"}

_KNOWN = {
    "slab-max": "#b2182b", "slab-pow2": "#ef8a62", "slab-oracle": "#f4a582",
    "paged-16": "#2166ac", "paged-16-nocache": "#67a9cf", "radix-1": "#1b7837",
    "slab": "#b2182b", "paged": "#2166ac", "paged-nocache": "#67a9cf", "radix": "#1b7837",
}
_FAMILIES = {  # shades for labels not listed above, by the part before the first "-"
    "slab": ["#b2182b", "#d6604d", "#ef8a62", "#f4a582", "#8c510a", "#bf812d"],
    "paged": ["#053061", "#2166ac", "#4393c3", "#67a9cf", "#92c5de", "#5e3c99"],
    "radix": ["#00441b", "#1b7837", "#5aae61", "#a6dba0", "#35978f", "#80cdc1"],
}
_OTHER = ["#762a83", "#9970ab", "#e7298a", "#666666", "#a6761d", "#1f78b4"]
_ORDER = {"slab": 0, "paged": 1, "radix": 2}


def colour(label: str) -> str:
    """The colour of a strategy label (stable across figures and reports)."""
    if label in _KNOWN:
        return _KNOWN[label]
    family = label.split("-", 1)[0]
    shades = _FAMILIES.get(family, _OTHER)
    return shades[zlib.crc32(label.encode()) % len(shades)]


_VARIANTS = {"max": 0, "pow2": 1, "oracle": 2}  # slab reservations, in the vLLM paper's order


def label_order(labels) -> list[str]:
    """slab (max, pow2, oracle), then paged, then radix variants; numbers sort numerically."""
    def key(label: str):
        parts = label.split("-")
        return (_ORDER.get(parts[0], 3), [(0, int(p), "") if p.isdigit() else (1, _VARIANTS.get(p, 9), p)
                                          for p in parts[1:]])
    return sorted(set(labels), key=key)
