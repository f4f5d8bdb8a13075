"""What every figure shares: one colour per strategy label, one per slot state, readable names.

A label keeps its colour and its line style in every figure and every report (they depend only
on the label): slab variants are warm, paged variants blue/purple, radix variants green, and
within a family no two known labels share a hue; each known label also has its own dash pattern,
marker and bar hatch, so curves that lie on top of each other stay visible (the dashes of one
show through the other's) and the figures still read in greyscale. An unknown label gets a
colour and a style from its name's hash.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple

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

_KNOWN = {  # distinct hues and lightness (greyscale: dark red, orange, brown, blue, purple, green)
    "slab-max": "#b2182b", "slab-pow2": "#f28e2b", "slab-oracle": "#8c510a",
    "paged-16": "#2166ac", "paged-16-nocache": "#9467bd", "radix-1": "#1b9e77",
    "slab": "#b2182b", "paged": "#2166ac", "paged-nocache": "#9467bd", "radix": "#1b9e77",
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


class LineStyle(NamedTuple):
    ls: object  # a matplotlib dash pattern
    marker: str
    hatch: str  # for bars


_STYLES = [LineStyle("-", "o", ""), LineStyle((0, (5, 2)), "s", "//"), LineStyle((0, (1, 1.5)), "^", ".."),
           LineStyle((0, (7, 2, 1, 2)), "D", "\\\\"), LineStyle((0, (3, 3)), "v", "xx"),
           LineStyle((0, (8, 2, 1, 2, 1, 2)), "P", "--")]
_KNOWN_STYLE = {"slab-max": 0, "slab-pow2": 1, "slab-oracle": 2, "paged-16": 3, "paged-16-nocache": 4,
                "radix-1": 5, "slab": 0, "paged": 3, "paged-nocache": 4, "radix": 5}


def line_style(label: str) -> LineStyle:
    """The dash pattern, marker and hatch of a strategy label (stable across figures)."""
    k = _KNOWN_STYLE.get(label)
    return _STYLES[k if k is not None else zlib.crc32(label.encode()) % len(_STYLES)]


def line_kw(label: str) -> dict:
    """colour, dash pattern and marker of a label's line, for ax.plot(..., **line_kw(label))."""
    s = line_style(label)
    return {"color": colour(label), "linestyle": s.ls, "marker": s.marker, "markersize": 4}


_VARIANTS = {"max": 0, "pow2": 1, "oracle": 2}  # slab reservations, in the vLLM paper's order


def label_order(labels) -> list[str]:
    """slab (max, pow2, oracle), then paged, then radix variants; numbers sort numerically."""
    def key(label: str):
        parts = label.split("-")
        return (_ORDER.get(parts[0], 3), [(0, int(p), "") if p.isdigit() else (1, _VARIANTS.get(p, 9), p)
                                          for p in parts[1:]])
    return sorted(set(labels), key=key)
