"""LRU's hit rate at every cache capacity in one pass (Mattson's stack distances), for the page
stream that paged (strategies/paged.py with LRU eviction) sees when requests are served one at
a time, as experiments/eviction_curves.py replays them.

The stream (`kvbench.traces.belady.block_references`: the trie of whole pages, exact ids, no
hashes): request by request in arrival order, its whole pages of K/V (`kv_len` positions:
prompt and all outputs but the last; the prompt only with `cache_outputs=False`); the first
`(prompt_len - 1) // page_size` are *counted* (they may hit; paged computes at least the last
prompt token). The replay's cache: after each request, the C most recently released pages.

Why one pass is exact. paged releases a request's pages tail first, so every page is released
just after its children and is more recent than any of them: the cache stays prefix-closed and
a request's cached pages are a prefix of its chain, exactly the prefix it hits. Linearize the
stream with each request's pages in release order (last page first); a page's LRU depth when
request i arrives is 1 + the number of distinct pages released after its own last release and
before i. Request i hits its counted pages of depth <= C, at every C at once: a histogram.

Where it is exact (tests/test_stack_distance.py replays the real strategy at many capacities):
- `PagedStrategy(dedup_touch=True)`: at every capacity. A page whose ids are cached but that
  the request recomputes (past its counted pages: the whole-prompt page a request may not hit,
  or an output page it repeats) is touched in release order, as the stream assumes.
- the default `dedup_touch=False` (the cached original keeps its place): at every capacity
  below `first_duplicate_depth` (the least depth at which any such recomputed page is still
  cached; None: never, exact everywhere). Up to the first duplicate the two replays are equal,
  and at C below that depth none ever happens. Above it the replay's order can differ.

Cost: O(R log^2 R) in numpy for R page references (a merge-sort tree over the reuses, one
sorted array per level, queried with one `searchsorted` per level); references never reused
cost O(R). The stream itself (`block_references`) is a Python pass over the pages.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from kvbench.request import Request
from kvbench.traces.belady import BlockRefs, CacheHits, block_references

NEVER = np.iinfo(np.int64).max  # the depth of a page never seen before


class LruCurve(NamedTuple):
    """LRU's hits at every capacity, from one pass over a trace's page stream."""

    refs: BlockRefs
    depth: np.ndarray  # [R] int64 LRU depth of each reference when its request arrives (1 = most recent; NEVER)
    first_duplicate_depth: int | None  # least depth of a cached page a request recomputes (module docstring)

    def hits(self, capacity_pages: int) -> CacheHits:
        """Hits with a cache of `capacity_pages` pages (counted references of depth <= C). Pure."""
        if capacity_pages < 0:
            raise ValueError(f"capacity_pages must be >= 0, got {capacity_pages}")
        r = self.refs
        hit = r.counted & (self.depth <= capacity_pages)
        return CacheHits("lru", int(capacity_pages), r.block_size, int(hit.sum()), r.prompt_blocks,
                         int(r.tokens[hit].sum()), r.prompt_tokens)

    def hit_tokens(self, capacities: Sequence[int]) -> np.ndarray:
        """[len(capacities)] int64 prompt tokens served from cache at each capacity (pages), all
        from one sort of the counted depths. Pure."""
        r = self.refs
        d, tok = self.depth[r.counted], r.tokens[r.counted]
        order = np.argsort(d, kind="stable")
        cum = np.concatenate([[0], np.cumsum(tok[order])])
        caps = np.asarray(capacities, dtype=np.int64)
        if (caps < 0).any():
            raise ValueError(f"capacities must be >= 0, got {caps.min()}")
        return cum[np.searchsorted(d[order], caps, side="right")]

    def exact_for_default_paged(self, capacity_pages: int) -> bool:
        """Whether `hits(capacity_pages)` is also exact for paged's default `dedup_touch=False`."""
        return self.first_duplicate_depth is None or capacity_pages < self.first_duplicate_depth


def release_order(refs: BlockRefs) -> np.ndarray:
    """[R] int64: each reference's position in the stream with every request's pages in release
    order (its last page first). Pure."""
    n = len(refs.node)
    req = np.repeat(np.arange(len(refs.starts) - 1), np.diff(refs.starts))
    return refs.starts[req] + refs.starts[req + 1] - 1 - np.arange(n, dtype=np.int64)


def _count_later_prev(j: np.ndarray, prev: np.ndarray, s: np.ndarray, p: np.ndarray) -> np.ndarray:
    """For each query q: #{k : j[k] < s[q] and prev[k] > p[q]}, for points (j, prev) sorted by j.

    A merge-sort tree over the points in j order: at level b the points are sorted by prev
    within blocks of 2**b; the first m points are the blocks of m's set bits, and each block's
    count of prev > p is one searchsorted on that level's array (block id * big + prev keeps
    each block's values apart, so one global sort and one global search serve every block).
    O((M + Q) log^2 M) in numpy. Pure."""
    m = np.searchsorted(j, s, side="left")  # points with j < s
    out = np.zeros(len(s), dtype=np.int64)
    big = int(max(prev.max(initial=0), p.max(initial=0))) + 2
    idx = np.arange(len(j), dtype=np.int64)
    vals = prev.astype(np.int64)  # prev sorted within the blocks of the level below (level 0: as is)
    level = 0
    while (1 << level) <= len(j):
        size = 1 << level
        block = idx >> level
        # each block is two sorted runs of the level below: timsort merges them (measured 7x
        # faster than sorting every level afresh on 2.5 M points)
        keyed = np.sort(block * big + vals, kind="stable")
        vals = keyed - block * big
        q = np.flatnonzero((m >> level) & 1)
        if len(q):
            b = (m[q] >> level) - 1  # the block of this set bit: [b * size, (b + 1) * size)
            below = np.searchsorted(keyed, b * big + p[q], side="right")  # in block b: prev <= p
            out[q] += (b + 1) * size - below
        level += 1
    return out


def stack_depths(refs: BlockRefs) -> np.ndarray:
    """[R] int64: each reference's LRU depth when its request arrives (1 = the most recently
    released page; NEVER: not seen before). Pure."""
    n = len(refs.node)
    lin = release_order(refs)
    key = np.empty(n, dtype=np.int64)
    key[lin] = refs.node  # the stream in release order
    req = np.repeat(np.arange(len(refs.starts) - 1), np.diff(refs.starts))
    start = np.empty(n, dtype=np.int64)
    start[lin] = refs.starts[req]  # its request's first stream position
    order = np.argsort(key, kind="stable")  # positions grouped by page, ascending
    prev = np.full(n, -1, dtype=np.int64)
    same = key[order[1:]] == key[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    t = np.flatnonzero(prev >= 0)  # reuses: the points, and the queries (already sorted by position)
    p, s = prev[t], start[t]
    # distinct pages in (p, s) = positions there - those whose previous use is there too
    later = _count_later_prev(t, p, s, p)
    depth_lin = np.full(n, NEVER, dtype=np.int64)
    depth_lin[t] = (s - p - 1) - later + 1
    return depth_lin[lin]


def lru_curve(requests: Iterable[Request], page_size: int = 16, cache_outputs: bool = True,
              refs: BlockRefs | None = None) -> LruCurve:
    """LRU's hits at every capacity for `requests` served one at a time (module docstring).
    `refs`: the trace's `block_references(requests, page_size, outputs=cache_outputs)`, if
    already built. Pure."""
    if refs is None:
        refs = block_references(requests, page_size, outputs=cache_outputs)
    depth = stack_depths(refs)
    dup = depth[~refs.counted]
    dup = dup[dup != NEVER]
    return LruCurve(refs, depth, int(dup.min()) if len(dup) else None)
