"""Design 2: one pool, one page size in bytes (vLLM's hybrid KV cache manager).

vLLM (v1 core: kv_cache_utils._get_kv_cache_groups_uniform_page_size, kv_cache_coordinator,
single_type_kv_cache_manager) gives every layer the same page size in bytes and groups the
layers into KV-cache groups of equal layer count, each with its own block table, all drawing
pages from one block pool:

    gemma-like (22 sliding, 4 full layers): group_size = min(22, 4) = 4 (or the max when
    max < 1.5 x min), so 1 full table of 4 layers and ceil(22 / 4) = 6 sliding tables of 4 layers
    (the last serves 2: half its page is padding); a page = page_size tokens x 4 layers.

    one pool: [p0 full][p1 sw0][p2 sw1] ... every table takes pages of the same bytes

A group whose layers hold fewer bytes per token gets more tokens per page (vLLM
unify_kv_cache_spec_page_size: block_size x ratio; the ratio must be whole). Sliding-window and
chunked tables drop the pages that fall out of their window as decoding goes on
(SlidingWindowManager.remove_skipped_blocks); dropped pages that were hashed stay cached.

Hit rule (HybridKVCacheCoordinator.find_longest_cache_hit): the longest prefix, in whole pages
of every table (the lcm of their page sizes), at which every table holds its hits.pages_needed:
full tables all earlier pages, sliding tables the pages of the last window - 1 tokens, chunked
tables the current chunk's. State layers: vLLM sizes the attention block so one page holds one
layer group's state and keeps no snapshot here (before its mamba `align` cache mode), so a model
with state layers hits 0; a running request holds ceil(state bytes / page) pages per state group
(kvbench's simplification: the page is not enlarged to fit a state; the padding is internal).
"""
from __future__ import annotations

from kvbench.sizes import PoolGeometry
from kvbench.strategies.hybrid.base import POOL, TableSpec
from kvbench.strategies.hybrid.paged_groups import GroupPaged, StateSpec


def kv_cache_group_size(layer_counts: list[int]) -> int:
    """vLLM's group size: the fewest layers of any attention type, or the most when the most is
    under 1.5x the fewest (then the smaller types are padded). Pure."""
    lo, hi = min(layer_counts), max(layer_counts)
    return hi if hi < 1.5 * lo else lo


class UnifiedPool(GroupPaged):
    """One pool of equal-byte pages for every KV-cache group (vLLM). `page_size`: tokens per page
    of the layers with the most bytes per token (others get a whole multiple)."""

    hit_rule = ("every table holds its needed pages at the hit point (full: all earlier; sliding: last window-1 "
                "tokens; chunked: the current chunk); state layers: no snapshots, hit 0")

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 16,
                 geometry: PoolGeometry | None = None,
                 prefix_caching: bool = True, name: str = "hybrid_unified") -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name, geometry, prefix_caching)

    def _layout(self):
        attn = [(i, g) for i, g in enumerate(self.groups) if g.kind != "state"]
        layer_page = {i: self.page_size * g.bytes_per_layer_token for i, g in attn}
        top = max(layer_page.values())
        for i, _ in attn:
            if top % layer_page[i]:
                raise ValueError(f"{self.name}: a page of {layer_page[i]} bytes per layer (group "
                                 f"'{self.groups[i].label}') does not divide {top}: vLLM cannot unify these page sizes")
        gs = kv_cache_group_size([g.num_layers for _, g in attn])
        page_bytes = gs * top
        num_pages = self.pool_bytes // page_bytes
        tables = []
        for i, g in attn:
            ps = self.page_size * (top // layer_page[i])
            for k in range(-(-g.num_layers // gs)):
                tables.append(TableSpec(i, min(gs, g.num_layers - k * gs), ps, 0, num_pages, page_bytes))
        states = [StateSpec(i, 0, -(-g.bytes_per_request // page_bytes)) for i, g in enumerate(self.groups)
                  if g.kind == "state"]
        return tables, [(num_pages, page_bytes)], {POOL: self.pool_bytes - num_pages * page_bytes}, states

    @property
    def label(self) -> str:
        return f"{self.name}-{self.page_size}" + ("" if self.prefix_caching else "-nocache")
