"""The records of strategies/paged.py: a request's pages and hashes (`_Seq`), the kept match of a
waiting request (`_Match`), and how a page's ids are cut from a request's tokens as bytes. Shared
by paged.py and its lazy registration (_paged_lazy.py); not a strategy (no yaml registers it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvbench.strategies.base import PageId, RequestId

_ROOT_HASH = 0x6B7662656E6368  # any fixed seed for the first page's parent hash
_NEVER = 1 << 62  # hash_at of a request that hashes no more pages (admission options)


@dataclass(slots=True, eq=False)
class _Seq:
    tokens: np.ndarray  # all ids the request will hold
    kv_len: int
    pages: list[PageId] = field(default_factory=list)
    length: int = 0  # positions with room (computed between steps)
    hashes: list[int] = field(default_factory=list)  # chained hashes of its first full pages (lazy: its first only)
    hash_at: int = 0  # length at which its next unhashed page is full: (registered pages + 1) * page_size
    lazy: bool = False  # it owns its chain: its pages 1.. are registered without their hash (strategies/_paged_lazy.py)
    ndef: int = 0  # of those, how many are still registered (not evicted)
    gone: bool = False  # released
    reserved: int = 0  # this request's share of the pool's reserved slots
    cache_pages: int = 1 << 62  # its leading pages that may be hashed (admission options)
    data: bytes | None = None  # `tokens` as bytes, made at its first page registration (a page's ids
    # are a slice of it: ~10x cheaper than a numpy slice's tobytes)
    table: tuple | None = None  # (pages held, last page, `page_table`'s array of them): `pages` only
    # grows at its end or has its last page replaced (copy-on-write), so the two say whether it changed


class _Match:
    """The prefix match of one waiting request, kept exact between its retries (see strategies/paged.py's
    docstring). `hits[i]` holds page i's ids, under hash `hashes[i]`."""

    __slots__ = ("rid", "tokens", "num_full", "hashes", "hits", "index", "nidx", "cached", "data", "owner", "odata")

    def __init__(self, rid: RequestId, tokens: np.ndarray, num_full: int) -> None:
        self.rid, self.tokens, self.num_full = rid, tokens, num_full  # num_full: pages it may hit
        self.hashes: list[int] = []  # chained hashes of its first pages, computed up to the first miss
        self.hits: list[PageId] = []
        self.index: set[PageId] = set()  # the hit pages (filled when the request is refused), hits[:nidx]
        self.nidx = 0  # (hits from nidx on are one owner's pages registered lazily: not indexed)
        self.cached = 0  # hits with ref 0 (in the LRU): admitting takes them out of the evictable set
        self.data: bytes | None = None  # `tokens` as bytes, made once the match is a few pages long
        self.owner: _Seq | None = None  # the owner whose lazily registered pages it last compared
        self.odata: bytes = b""  # that owner's ids as bytes


class _Rare:
    """A paged strategy's options and its rarely touched state, in one attribute of it (CPython
    3.11 keeps at most 29 instance attributes in a shared-keys dict: past that every `self.x` of
    the hot paths is a dict lookup and no method load is specialized; tests/test_paged_bulk.py
    holds the count). Options (fixed at construction): see strategies/paged.py's docstring;
    `admission`: cache_outputs false or min_cache_len > 0; `tracks`: the eviction policy is told
    each admitted / released request. State: the host tier's maps (chained hash → host page,
    host page → its hash, host page → its ids as bytes; empty with the tier off) and the prompt
    tokens served from each tier (every admission)."""

    __slots__ = ("prefix_caching", "prefix_visibility", "dedup_touch", "eviction", "cache_outputs",
                 "min_cache_len", "admission", "tracks", "host_tier_tokens", "host_tier_eviction",
                 "host_table", "host_hash", "host_ids", "hits_gpu", "hits_host")

    def __init__(self, prefix_caching: bool, prefix_visibility: str, dedup_touch: bool, cache_outputs: bool,
                 min_cache_len: int, host_tier_tokens: int, host_tier_eviction: str) -> None:
        self.prefix_caching, self.prefix_visibility, self.dedup_touch = prefix_caching, prefix_visibility, dedup_touch
        self.cache_outputs, self.min_cache_len = cache_outputs, min_cache_len
        self.admission = not cache_outputs or min_cache_len > 0
        self.host_tier_tokens, self.host_tier_eviction = host_tier_tokens, host_tier_eviction
        self.eviction, self.tracks = "", False  # (set once the eviction policy is made)
        self.host_table: dict[int, int] = {}
        self.host_hash: dict[int, int] = {}
        self.host_ids: dict[int, bytes] = {}
        self.hits_gpu = self.hits_host = 0


_VOIDS: dict[int, np.dtype] = {}


def _void(nb: int) -> np.dtype:
    """The numpy dtype of one page's ids as one opaque item of `nb` bytes (its `tolist()` gives
    `bytes`, equal to the slice of the same bytes). Cached per size."""
    dt = _VOIDS.get(nb)
    if dt is None:
        dt = _VOIDS[nb] = np.dtype((np.void, nb))
    return dt


def _page_ids(seq: _Seq, i: int, ps: int) -> bytes:
    """Page i of `seq`'s ids as bytes (what its registration stores). Pure."""
    if seq.data is not None:
        nb = ps * seq.tokens.itemsize
        return seq.data[i * nb:(i + 1) * nb]
    return seq.tokens[i * ps:(i + 1) * ps].tobytes()
