"""Pool design 3, Jenga (Zhang et al., SOSP'25): a two-level allocator whose large page is the
least common multiple of the groups' page sizes in bytes, split on demand into one group's small
pages, with request-aware placement and prefix caching with a two-level LRU eviction.

    large page (lcm bytes)     [ group a: 2 small pages ][ group b: 11 small pages ... ]
    pool   L0 [a a] L1 [b b b b b b b b b b b] L2 (free) L3 [a a] ...
           small page id of group g = large id x ratio(g) + index in the large page

What follows the paper and its artifact (heheda12345/Jenga-SOSP25-AE, vLLM v0 based; our own
code): each group (all layers of one kind share a page table: Gemma-3's 22 sliding layers are
one group) has small pages of `page_size` tokens x its bytes per token (a state group: one small
page of its whole per-request state); the large page is the lcm of those sizes; a free large page
belongs to no group. A small page for request r of group g comes, in the artifact's order, from
(1) r's own large pages of g (request-aware placement: a large page remembers the request that
split it, its free small pages are that request's while it runs), (2) a new large page, (3) a
free small page of a large page whose request has left (r adopts that large page), (4) the
eviction of a whole cached large page (level 0), (5) a free small page of another running
request's large page, (6) the eviction of one cached small page of g (level 1). So a request's
small pages of one kind share large pages, and when it finishes its large pages empty together
and return to the free pool whole. Prefix caching: a full page is registered by the chained hash
of its ids (verified against the ids on a hit), per group; at release its pages stay cached. The
hit rule is the hybrid one (hits.py): every group holds what it needs at the hit point. Sliding
and chunked pages that leave the window of their request are released at the next step, cached
but oldest (the artifact's "last access -200"), so they are evicted first (`dropped_pages:
refresh` re-keys them at the request's release instead, aging with its prefix). Eviction is LRU by
(last access, deeper page first) within a group (level 1); a large page none of whose small
pages is in use is a level-0 victim keyed by its most recent small page, and level-0 victims go
first, least recent across all groups.

What is simplified: (a) the artifact sets a per-step "quota" of new large pages from the
scheduler's min/max estimate; here a request gets whole new large pages when the free pool holds
enough for all its groups, else only what its groups' free small pages cannot cover. (b) A large
page is a level-0 victim when none of its small pages is in use (the artifact: when all are
cached): free small pages in it go with it. (c) A level-0 victim whose group would then lack the
pages this same allocation needs is skipped (the artifact allocates page by page and may evict a
large page it then needs). (d) State groups: the artifact keeps no state across requests; here a
request keeps one snapshot of its state at the last multiple of `state_interval` before its
prompt ends (vLLM's align mode), cached like a page: so the zero-hit failure of vLLM #45238
(a snapshot that lands in the request-unique suffix) happens here too. (e) Jenga's common-prefix
predictor and cache simulator that trade hits for batch size are left out. (f) No fork (answers
False: parallel sampling is not part of the hybrid comparison).

Slot states per group are in that group's bytes; free large pages are free bytes of no group.
Costs: a decode step's page is O(1) (r's own free small page or a new large page); under memory
pressure an allocation sorts the level-0 victims (O(n log n)) and pops level-1 victims from a
lazy heap (O(log n)); a large page's level-0 key is recomputed over its small pages (O(ratio)).
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from itertools import count, islice
from math import lcm
from typing import NamedTuple

import numpy as np

from kvbench.sizes import PoolGeometry
from kvbench.strategies.base import Admission, InvariantError, RequestId
from kvbench.strategies.hybrid import hits
from kvbench.strategies.hybrid.base import NULL_PAGE, POOL, GroupSlotStates, HybridStrategy, TableSpec

_ROOT = 0x6B7662656E6368
_UNSPLIT, _FREE, _USED, _CACHED = 0, 1, 2, 3  # a small page's state (_UNSPLIT: its large page is free)
_OLD, _NORMAL = 0, 1  # eviction tier of a cached page: out of its window (evicted first), released


@dataclass(slots=True)
class _Req:
    tokens: np.ndarray
    kv_len: int
    num_prompt: int
    length: int  # positions with room (computed between calls)
    computed: int  # positions computed when its tables were last trimmed
    pages: dict[int, list[int]]  # attention group -> small pages in token order (NULL_PAGE: dropped)
    first: dict[int, int]  # attention group -> index of its first held page
    hashed: int  # leading full pages registered (all attention groups alike)
    chain: list[int] = field(default_factory=list)  # chained hashes of its full pages
    state: dict[int, int] = field(default_factory=dict)  # state group -> its state's small page
    dropped: list[tuple[int, int, int, int]] = field(default_factory=list)  # (group, small, hash, index) cached at trim


class _Plan(NamedTuple):
    """Where an allocation's small pages come from (see `_plan`); applied by `_apply`."""

    takes: dict[int, list[int]]  # group -> free small pages taken by id (own, adopted, stolen)
    new: dict[int, int]  # group -> free large pages split for it
    victims: list[tuple[int, int]]  # (cached large page evicted whole, group it is split for)
    lv1: dict[int, int]  # group -> cached small pages of the group evicted one by one


class Jenga(HybridStrategy):
    """Jenga's two-level LCM allocator with request-aware placement (module docstring)."""

    caches_prefixes = True
    hit_rule = ("every group holds what it needs at the hit point (full: all earlier pages; sliding: the last "
                "window-1 tokens; chunked: the current chunk; state: a snapshot kept at the last multiple of "
                "state_interval before a request's prompt end)")

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 16,
                 geometry: PoolGeometry | None = None, prefix_caching: bool = True,
                 state_interval: int | None = None, dropped_pages: str = "oldest",
                 name: str = "hybrid_jenga") -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name, geometry)
        self.prefix_caching = self.caches_prefixes = bool(prefix_caching)
        if dropped_pages not in ("oldest", "refresh"):
            raise ValueError(f"{name}: dropped_pages={dropped_pages!r} must be oldest or refresh")
        self.dropped_pages = dropped_pages
        self._refresh = dropped_pages == "refresh"
        ps = self.page_size
        self.state_interval = ps if state_interval is None else int(state_interval)
        if self.state_interval < ps or self.state_interval % ps:
            raise ValueError(f"{name}: state_interval={state_interval} must be a multiple of page_size {ps}")
        self._attn = [i for i, g in enumerate(self.groups) if g.kind != "state"]
        self._states = [i for i, g in enumerate(self.groups) if g.kind == "state"]
        self._small = [g.bytes_per_request if g.kind == "state" else ps * g.bytes_per_token for g in self.groups]
        self.large_bytes = lcm(*self._small)
        self._ratio = [self.large_bytes // b for b in self._small]
        if max(self._ratio) > 1 << 16:
            raise ValueError(f"{name}: the lcm of the groups' page sizes {self._small} is {self.large_bytes} bytes, "
                             f"{max(self._ratio)} small pages: pick a page_size whose page sizes share more factors")
        self.num_large = self.pool_bytes // self.large_bytes
        if self.num_large < 1:
            raise ValueError(f"{name}: the pool ({self.pool_bytes} bytes) is smaller than one large page "
                             f"({self.large_bytes} bytes, the lcm of {self._small})")
        self._tb = [g.bytes_per_token for g in self.groups]
        self._tables = tuple(TableSpec(g, self.groups[g].num_layers, ps, g, self.num_large * self._ratio[g],
                                       self._small[g]) for g in self._attn)
        n = self.num_large
        self._free_large: deque[int] = deque(range(n))
        self._split = [-1] * n  # group a large page is split for (-1: free)
        self._aff = [-1] * n  # the running request that split or adopted it (Jenga's large_block_to_seq_id)
        self._owned: dict[int, set[int]] = {}  # running request -> large pages it split or adopted
        self._nfree, self._nused, self._ncached = [0] * n, [0] * n, [0] * n
        self._lv0: dict[int, tuple] = {}  # level-0 victims (no small page in use): large -> key
        self._lv0_heap: list[tuple] = []  # (key, large), lazy: an entry is live while _lv0[large] == key
        self._st = {g: bytearray(n * self._ratio[g]) for g in range(len(self.groups))}
        self._ref = {g: [0] * (n * self._ratio[g]) for g in range(len(self.groups))}
        self._fill = {g: [0] * (n * self._ratio[g]) for g in self._attn}
        self._hash: dict[int, dict[int, int]] = {g: {} for g in range(len(self.groups))}  # small -> chain hash
        self._stored: dict[int, dict[int, bytes]] = {g: {} for g in range(len(self.groups))}  # small -> its ids
        self._index: dict[int, dict[int, int]] = {g: {} for g in range(len(self.groups))}  # chain hash -> small
        self._key: dict[int, dict[int, tuple]] = {g: {} for g in range(len(self.groups))}  # cached small -> key
        self._heap: dict[int, list] = {g: [] for g in range(len(self.groups))}  # (key, small), lazy: level-1 LRU
        self._pref: dict[int, dict[int, dict[int, None]]] = {g: {} for g in range(len(self.groups))}
        self._nopref: dict[int, dict[int, None]] = {g: {} for g in range(len(self.groups))}
        self._where: dict[int, dict[int, int]] = {g: {} for g in range(len(self.groups))}  # free small -> rid/-1
        self._clock = count(1)
        self._reqs: dict[RequestId, _Req] = {}
        self._memo: tuple | None = None  # (rid, tokens, chain) of the last admit that was refused
        self._tok = {g: 0 for g in self._attn}  # filled positions of held pages
        self._held = {g: 0 for g in range(len(self.groups))}  # small pages in use
        self._reserved = {g: 0 for g in self._attn}

    # ---- contract: layout -------------------------------------------------------------------
    @property
    def tables(self) -> tuple[TableSpec, ...]:
        return self._tables

    def table(self, rid, t) -> np.ndarray:
        return np.asarray(self._reqs[rid].pages[self._tables[t].group], dtype=np.int32)

    def never_fits(self, kv_len: int) -> str | None:
        if kv_len + 1 > self.max_model_len:
            return f"max_model_len: prompt + output = {kv_len + 1} tokens exceeds max_model_len {self.max_model_len}"
        need = sum(-(-self.pages_for(kv_len) // self._ratio[g]) for g in self._attn) + len(self._states)
        if need > self.num_large:
            return (f"pool: needs {kv_len} KV slots ({need} large pages of {self.large_bytes} bytes, windows "
                    f"counted whole), the pool holds {self.num_large}")
        return None

    # ---- prefix hits --------------------------------------------------------------------------
    def _chain_of(self, tokens: np.ndarray, upto: int, chain: list[int]) -> list[int]:
        ps = self.page_size
        for i in range(len(chain), upto):
            chain.append(hash((chain[-1] if i else _ROOT, tokens[i * ps:(i + 1) * ps].tobytes())))
        return chain

    def _lookup(self, g: int, tokens: np.ndarray, chain: list[int], j: int) -> int | None:
        """The small page of group g holding page j of `tokens` (verified), else None. Pure but
        for `chain` (extended as needed)."""
        h = self._chain_of(tokens, j + 1, chain)[j]
        s = self._index[g].get(h)
        ps = self.page_size
        if s is None or self._stored[g][s] != tokens[j * ps:(j + 1) * ps].tobytes():
            return None
        return s

    def _longest_hit(self, tokens: np.ndarray, num_prompt: int, chain: list[int]) -> tuple[int, dict[int, list[int]]]:
        """(hit length, {group: small pages it needs at that point, snapshot for a state group})."""
        if not self.prefix_caching:
            return 0, {}
        tabs = [(self.groups[g], self.page_size) for g in self._attn]
        states = [(self.groups[g], 0) for g in self._states]

        def snap(point: int) -> bool:
            return point % self.state_interval == 0 and all(
                self._lookup(g, tokens, chain, point // self.page_size - 1) is not None for g in self._states)

        point = hits.longest_hit(tabs + states, lambda t, j: self._lookup(self._attn[t], tokens, chain, j) is not None,
                                 num_prompt - 1, self.page_size, snap if self._states else None)
        if not point:
            return 0, {}
        out = {g: [self._lookup(g, tokens, chain, j) for j in hits.pages_needed(self.groups[g], point, self.page_size)]
               for g in self._attn}
        for g in self._states:
            out[g] = [self._lookup(g, tokens, chain, point // self.page_size - 1)]
        return point, out

    def cached_prefix_len(self, tokens, num_prompt) -> int:
        return self._longest_hit(tokens, num_prompt, [])[0]

    # ---- two-level allocation -----------------------------------------------------------------
    def _plan(self, rid: RequestId, need: dict[int, int], pinned: set[tuple[int, int]]) -> _Plan | None:
        """Where `need[g]` small pages of each group g would come from for request `rid`, in
        Jenga's order (module docstring), without touching cached pages in `pinned` ((group,
        small) pairs a hit is about to use); None if they cannot all be had. Pure."""
        takes: dict[int, list[int]] = {}
        rem: dict[int, int] = {}
        for g, n in need.items():
            own = self._pref[g].get(rid, {})
            takes[g] = list(islice(own, min(n, len(own))))
            rem[g] = n - len(takes[g])
        others = {g: self._free_small(g) - len(self._pref[g].get(rid, ())) for g in need}  # not rid's own
        want = {g: -(-r // self._ratio[g]) for g, r in rem.items()}
        if sum(want.values()) > len(self._free_large):  # too few for whole pages: only what free smalls lack
            want = {g: -(-max(0, r - others[g]) // self._ratio[g]) for g, r in rem.items()}
        new, left = {}, len(self._free_large)
        for g in need:
            new[g] = min(want[g], left)
            left -= new[g]
            rem[g] = max(0, rem[g] - new[g] * self._ratio[g])
        for g in need:  # free small pages of large pages whose request has left (adopted)
            if rem[g]:
                k = min(rem[g], len(self._nopref[g]))
                takes[g] += islice(self._nopref[g], k)
                rem[g] -= k
        victims: list[tuple[int, int]] = []
        gone: set[int] = set()
        if any(rem.values()) and self._lv0:
            taken = {s // self._ratio[g] for g, ss in takes.items() for s in ss}  # large pages this plan uses
            taken |= {s // self._ratio[g] for g, s in pinned}
            pin = {g: sum(1 for h, _ in pinned if h == g) for g in range(len(self.groups))}
            supply = {g: others[g] - len(self._nopref[g]) + self._ncached_of(g) - pin[g] for g in rem if rem[g]}
            first = sum(-(-r // self._ratio[g]) for g, r in rem.items())
            start_rem, start_supply = dict(rem), dict(supply)
            while True:  # the least recent victims first: a prefix of the order, longer if it runs out
                order, rem, supply = self._lv0_order(first), dict(start_rem), dict(start_supply)
                victims, gone = [], set()
                for key, c in order:
                    target = next((g for g in need if rem[g]), None)
                    if target is None:
                        break
                    if c in taken:
                        continue
                    gc = self._split[c]
                    loss = self._nfree[c] + self._ncached[c]
                    if rem.get(gc) and supply[gc] - loss < rem[gc]:
                        continue  # its own group would then lack pages this allocation needs
                    if rem.get(gc):
                        supply[gc] -= loss
                    victims.append((c, target))
                    gone.add(c)
                    rem[target] = max(0, rem[target] - self._ratio[target])
                if not any(rem.values()) or len(order) == len(self._lv0):
                    break
                first *= 4
        lv1: dict[int, int] = {}
        for g in need:
            if not rem[g]:
                continue
            ratio = self._ratio[g]
            for other, pages in self._pref[g].items():  # steal another running request's free small pages
                if other == rid:
                    continue
                for s in pages:
                    if s // ratio not in gone:
                        takes[g].append(s)
                        rem[g] -= 1
                        if not rem[g]:
                            break
                if not rem[g]:
                    break
            if rem[g]:
                avail = self._ncached_of(g) - sum(1 for h, _ in pinned if h == g) - sum(
                    self._ncached[c] for c in gone if self._split[c] == g)
                if avail < rem[g]:
                    return None
                lv1[g] = rem[g]
        return _Plan(takes, new, victims, lv1)

    def _lv0_order(self, first: int) -> list[tuple]:
        """The `first` least recent level-0 victims, (key, large), in eviction order (all of them
        if fewer). Pure. (`_lv0_clean` keeps the heap's top live between calls: one victim is O(1).)"""
        heap, lv0 = self._lv0_heap, self._lv0
        if first == 1 and heap and lv0.get(heap[0][1]) == heap[0][0]:
            return [heap[0]]
        if first >= len(lv0):
            return sorted((k, c) for c, k in lv0.items())
        m = first
        while True:
            live = sorted({(k, c) for k, c in heapq.nsmallest(m, heap) if lv0.get(c) == k})
            if len(live) >= first or m >= len(heap):
                return live[:first]
            m *= 4

    def _lv0_clean(self) -> None:
        """Drop stale entries from the top of the level-0 heap (rebuild it when most are stale)."""
        heap, lv0 = self._lv0_heap, self._lv0
        if len(heap) > 4 * len(lv0) + 64:
            heap[:] = [(k, c) for c, k in lv0.items()]
            heapq.heapify(heap)
        while heap and lv0.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def _ncached_of(self, g: int) -> int:
        return len(self._key[g])

    def _free_small(self, g: int) -> int:
        return len(self._where[g])

    def _apply(self, rid: RequestId, need: dict[int, int], plan: _Plan) -> dict[int, list[int]]:
        """Carry out `plan` (`_plan` found it feasible): returns the small pages per group, each
        marked in use by `rid` (ref 1, fill 0)."""
        for c, g in plan.victims:
            self._evict_large(c)
            self._split_for(c, g, rid)
        for g, k in plan.new.items():
            for _ in range(k):
                self._split_for(self._free_large.popleft(), g, rid)
        out: dict[int, list[int]] = {}
        for g, n in need.items():
            got = []
            for s in plan.takes[g]:
                self._unfree(g, s, rid)
                got.append(s)
            own = self._pref[g].get(rid, {})
            while len(got) < n - plan.lv1.get(g, 0):
                s = next(iter(own))
                self._unfree(g, s, rid)
                got.append(s)
            for _ in range(plan.lv1.get(g, 0)):
                s = self._pop_cached(g)
                self._drop_hash(g, s)
                self._st[g][s] = _USED
                big = s // self._ratio[g]
                self._ncached[big] -= 1
                self._nused[big] += 1
                self._lv0_update(big)
                got.append(s)
            for s in got:
                self._ref[g][s] = 1
                if g in self._fill:
                    self._fill[g][s] = 0
            self._held[g] += len(got)
            out[g] = got
        return out

    def _split_for(self, big: int, g: int, rid: RequestId) -> None:
        """A free large page becomes group g's, its small pages free and `rid`'s."""
        r = self._ratio[g]
        self._split[big], self._aff[big], self._nfree[big] = g, rid, r
        self._owned.setdefault(rid, set()).add(big)
        own = self._pref[g].setdefault(rid, {})
        for s in range(big * r, (big + 1) * r):
            self._st[g][s] = _FREE
            own[s] = None
            self._where[g][s] = rid

    def _unfree(self, g: int, s: int, rid: RequestId) -> None:
        """Free small page s of group g goes into use by `rid` (adopting its large page if its
        request has left)."""
        where = self._where[g].pop(s)
        big = s // self._ratio[g]
        if where < 0:
            del self._nopref[g][s]
            self._adopt(g, big, rid)
        else:
            del self._pref[g][where][s]
        self._st[g][s] = _USED
        self._nfree[big] -= 1
        self._nused[big] += 1
        self._lv0.pop(big, None)

    def _adopt(self, g: int, big: int, rid: RequestId) -> None:
        """`rid` takes over a large page whose request has left: its free small pages become rid's."""
        self._aff[big] = rid
        self._owned.setdefault(rid, set()).add(big)
        r = self._ratio[g]
        own = self._pref[g].setdefault(rid, {})
        for s in range(big * r, (big + 1) * r):
            if self._where[g].get(s) == -1:
                del self._nopref[g][s]
                own[s] = None
                self._where[g][s] = rid

    def _give_back(self, g: int, s: int) -> None:
        """Small page s of group g (in use, not cached) is free again: to its large page's
        request if it runs, else to the pages of no request; a large page with every small page
        free returns to the free pool whole."""
        big = s // self._ratio[g]
        owner = self._aff[big]  # (-1 once its request has left)
        self._st[g][s] = _FREE
        self._nused[big] -= 1
        self._nfree[big] += 1
        if owner >= 0:
            self._pref[g].setdefault(owner, {})[s] = None
            self._where[g][s] = owner
        else:
            self._nopref[g][s] = None
            self._where[g][s] = -1
        if self._nfree[big] == self._ratio[g]:
            self._unsplit(big)
        else:
            self._lv0_update(big)

    def _unsplit(self, big: int) -> None:
        g, r = self._split[big], self._ratio[self._split[big]]
        for s in range(big * r, (big + 1) * r):
            where = self._where[g].pop(s)
            if where < 0:
                del self._nopref[g][s]
            else:
                del self._pref[g][where][s]
            self._st[g][s] = _UNSPLIT
        self._disown(big)
        self._split[big], self._aff[big], self._nfree[big] = -1, -1, 0
        self._lv0.pop(big, None)
        self._free_large.append(big)

    def _evict_large(self, big: int) -> None:
        """Level 0: every cached small page of a large page leaves the cache, its free ones the
        free lists; the large page is free (not in the free pool: the caller splits it)."""
        g, r = self._split[big], self._ratio[self._split[big]]
        for s in range(big * r, (big + 1) * r):
            if self._st[g][s] == _CACHED:
                self._drop_hash(g, s)
                del self._key[g][s]
            else:
                where = self._where[g].pop(s)
                if where < 0:
                    del self._nopref[g][s]
                else:
                    del self._pref[g][where][s]
            self._st[g][s] = _UNSPLIT
        self._disown(big)
        self._split[big], self._aff[big], self._nfree[big], self._ncached[big] = -1, -1, 0, 0
        del self._lv0[big]

    def _disown(self, big: int) -> None:
        if self._aff[big] >= 0:
            self._owned[self._aff[big]].discard(big)

    def _pop_cached(self, g: int) -> int:
        """Level 1: the least recent cached small page of group g (out-of-window pages first,
        then by last access, the deeper page first)."""
        keys, heap = self._key[g], self._heap[g]
        while True:
            key, s = heapq.heappop(heap)
            if keys.get(s) == key:  # (lazy deletion: an entry whose page left the cache is skipped)
                del keys[s]
                return s

    def _drop_hash(self, g: int, s: int) -> None:
        del self._index[g][self._hash[g].pop(s)]
        del self._stored[g][s]

    def _lv0_update(self, big: int) -> None:
        g = self._split[big]
        if g < 0 or self._nused[big] or not self._ncached[big]:
            self._lv0.pop(big, None)
            return
        r, keys = self._ratio[g], self._key[g]
        key = max(keys[s] for s in range(big * r, (big + 1) * r) if s in keys)
        if self._lv0.get(big) != key:
            self._lv0[big] = key
            heapq.heappush(self._lv0_heap, (key, big))

    def _cache(self, g: int, s: int, key: tuple) -> None:
        """Small page s of group g (in use, hashed) is no longer used: cached, evictable."""
        big = s // self._ratio[g]
        self._st[g][s] = _CACHED
        self._key[g][s] = key
        heapq.heappush(self._heap[g], (key, s))
        self._nused[big] -= 1
        self._ncached[big] += 1
        self._lv0_update(big)

    def _revive(self, g: int, s: int) -> None:
        """A cached small page goes back into use (a hit)."""
        big = s // self._ratio[g]
        self._st[g][s] = _USED
        del self._key[g][s]
        self._ncached[big] -= 1
        self._nused[big] += 1
        self._lv0.pop(big, None)

    def _uncache(self, g: int, s: int) -> None:
        """Level 1 outside an allocation (`evict`): a cached small page becomes a free one."""
        self._drop_hash(g, s)
        big = s // self._ratio[g]
        self._ncached[big] -= 1
        self._nused[big] += 1  # (as if in use for an instant: `_give_back` frees it)
        self._st[g][s] = _USED
        self._give_back(g, s)

    def _unref(self, g: int, s: int, key: tuple) -> None:
        self._ref[g][s] -= 1
        if self._ref[g][s]:
            return
        self._held[g] -= 1
        if g in self._tok:
            self._tok[g] -= self._fill[g][s]
        if s in self._hash[g]:
            self._cache(g, s, key)
        else:
            self._give_back(g, s)

    # ---- contract: verbs ----------------------------------------------------------------------
    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        memo = self._memo
        chain = memo[2] if memo is not None and memo[0] == rid and memo[1] is tokens else []
        cached, hit = self._longest_hit(tokens, num_prompt, chain)
        length = cached + min(max_new, num_prompt - cached)
        ps, j = self.page_size, cached // self.page_size
        need = {g: self.pages_for(length) - j for g in self._attn}
        need.update({g: 1 for g in self._states})
        pinned = {(g, s) for g, pages in hit.items() for s in pages if self._st[g][s] == _CACHED}
        plan = self._plan(rid, need, pinned)
        if plan is None:
            self._memo = (rid, tokens, chain)  # (a memo of pure work: the retry hashes nothing again)
            return Admission(False)
        self._memo = None
        req = _Req(tokens, kv_len, num_prompt, cached, cached, {}, {}, j, chain)
        self._reqs[rid] = req
        now = next(self._clock)
        for g in self._attn:
            held = hit.get(g, [])
            skip = j - len(held)  # pages before its window or chunk at the hit point (all of them at a chunk start)
            for s in held:
                if self._st[g][s] == _CACHED:
                    self._revive(g, s)
                    self._held[g] += 1
                    self._tok[g] += self._fill[g][s]
                self._ref[g][s] += 1
            req.pages[g] = [NULL_PAGE] * skip + held
            req.first[g] = skip
        for g in self._states:  # a snapshot hit is copied into the request's own state: the snapshot stays cached
            if g in hit:
                s = hit[g][0]
                self._key[g][s] = (_NORMAL, now, 0)
                heapq.heappush(self._heap[g], ((_NORMAL, now, 0), s))
                self._lv0_update(s // self._ratio[g])
        got = self._apply(rid, need, plan)
        for g in self._states:
            req.state[g] = got[g][0]
        self._extend(req, length, got)
        self._lv0_clean()
        return Admission(True, cached)

    def grow(self, rid, num_tokens) -> bool:
        req = self._reqs[rid]
        new_len = req.length + num_tokens
        if new_len > req.kv_len:
            raise ValueError(f"request {rid} grows past its final length {req.kv_len}")
        n = self.pages_for(new_len)
        need = {g: n - len(req.pages[g]) for g in self._attn if n > len(req.pages[g])}
        plan = self._plan(rid, need, set()) if need else None
        if need and plan is None:
            return False  # (pages its window frees at this grow are not counted: they free after it)
        if self.prefix_caching:
            self._register(req)
        got = self._apply(rid, need, plan) if need else {}
        self._extend(req, new_len, got)
        self._trim(req)
        self._lv0_clean()
        return True

    def release(self, rid) -> None:
        req = self._reqs.pop(rid)
        for big in self._owned.pop(rid, ()):  # its large pages belong to no request now
            self._aff[big] = -1
        for g in range(len(self.groups)):  # nor their free small pages
            for s in self._pref[g].pop(rid, {}):
                self._nopref[g][s] = None
                self._where[g][s] = -1
        if self.prefix_caching:
            self._register(req)
        now = next(self._clock)
        for g in self._attn:
            pages = req.pages[g]
            self._reserved[g] -= self._res_of(req, g)
            for i in range(len(pages) - 1, req.first[g] - 1, -1):  # the tail first: deeper pages older
                self._unref(g, pages[i], (_NORMAL, now, -i))
        for g, s, h, i in req.dropped:  # dropped_pages=refresh: they age with the rest of its prefix
            if self._st[g][s] == _CACHED and self._hash[g].get(s) == h:
                self._key[g][s] = (_NORMAL, now, -i)
                heapq.heappush(self._heap[g], ((_NORMAL, now, -i), s))
                self._lv0_update(s // self._ratio[g])
        point = min(req.num_prompt - 1, req.length) // self.state_interval * self.state_interval
        for g, s in req.state.items():
            j = point // self.page_size
            h = self._chain_of(req.tokens, j, req.chain)[j - 1] if point else None
            if self.prefix_caching and point and h not in self._index[g]:  # keep a snapshot at `point`
                self._index[g][h] = s
                self._hash[g][s] = h
                self._stored[g][s] = req.tokens[point - self.page_size:point].tobytes()
            self._unref(g, s, (_NORMAL, now, 0))
        self._lv0_clean()

    def evict(self, num_slots) -> int:
        goal, freed = num_slots * self.unit_bytes, 0
        while freed < goal and self._lv0:
            big = self._lv0_order(1)[0][1]
            self._evict_large(big)
            self._free_large.append(big)
            freed += self.large_bytes
            self._lv0_clean()
        for g in range(len(self.groups)):
            while freed < goal and self._key[g]:
                self._uncache(g, self._pop_cached(g))
                freed += self._small[g]
        self._lv0_clean()
        return -(-freed // self.unit_bytes)

    # ---- request pages ------------------------------------------------------------------------
    def _res_of(self, req: _Req, g: int) -> int:
        return min(req.kv_len, len(req.pages[g]) * self.page_size) - req.length

    def _extend(self, req: _Req, new_len: int, got: dict[int, list[int]]) -> None:
        """Positions [length, new_len) in every attention table, on the pages `got`."""
        ps = self.page_size
        for g in self._attn:
            pages, fill, new = req.pages[g], self._fill[g], iter(got.get(g, ()))
            self._reserved[g] -= self._res_of(req, g)
            pos = req.length
            while pos < new_len:
                if pos // ps == len(pages):
                    pages.append(next(new))
                k = min(ps - pos % ps, new_len - pos)
                fill[pages[pos // ps]] += k
                self._tok[g] += k
                pos += k
            self._reserved[g] += min(req.kv_len, len(pages) * ps) - new_len
        req.computed, req.length = req.length, new_len

    def _register(self, req: _Req) -> None:
        """Hash its full computed pages not hashed yet, in every attention group (a page whose
        ids another page already holds stays unhashed: freed, not cached, at release)."""
        ps, full = self.page_size, req.length // self.page_size
        if req.hashed >= full:
            return
        chain = self._chain_of(req.tokens, full, req.chain)
        for g in self._attn:
            pages, index, hashes, stored = req.pages[g], self._index[g], self._hash[g], self._stored[g]
            for i in range(req.hashed, full):
                s = pages[i]
                if s != NULL_PAGE and s not in hashes and chain[i] not in index:
                    index[chain[i]] = s
                    hashes[s] = chain[i]
                    stored[s] = req.tokens[i * ps:(i + 1) * ps].tobytes()
        req.hashed = full

    def _trim(self, req: _Req) -> None:
        """Drop the pages its sliding / chunked groups no longer read (entirely before
        first_needed(computed)): hashed ones stay cached but oldest (evicted first)."""
        now = None
        for g in self._attn:
            pages = req.pages[g]
            drop = min(hits.first_needed(self.groups[g], req.computed) // self.page_size, len(pages))
            if drop <= req.first[g]:
                continue
            now = next(self._clock) if now is None else now
            for i in range(req.first[g], drop):
                s = pages[i]
                if self._refresh and s in self._hash[g]:
                    req.dropped.append((g, s, self._hash[g][s], i))
                self._unref(g, s, (_OLD, now, -i))
                pages[i] = NULL_PAGE
            req.first[g] = drop

    # ---- accounting ---------------------------------------------------------------------------
    def _out_of_window(self) -> dict[int, int]:
        """Per attention group: positions of held pages that no holder reads any more (the head
        of a first held page partly before first_needed(computed)); a shared page counts once."""
        out = {g: 0 for g in self._attn}
        ps = self.page_size
        for g in self._attn:
            group = self.groups[g]
            if group.kind == "full":
                continue
            heads: dict[int, list[int]] = {}
            for req in self._reqs.values():
                i = req.first[g]
                if i < len(req.pages[g]):
                    s = req.pages[g][i]
                    off = min(hits.first_needed(group, req.computed) - i * ps, self._fill[g][s])
                    if off > 0:
                        heads.setdefault(s, []).append(off)
            out[g] = sum(min(offs) for s, offs in heads.items() if len(offs) == self._ref[g][s])
        return out

    def _peak(self, kv_len: int) -> dict[int, int]:
        """Small pages per group a request of kv_len holds at most (windows counted whole). Pure."""
        out = {g: self.pages_for(kv_len) for g in self._attn}
        out.update({g: 1 for g in self._states})
        return out

    def group_slot_states(self, waiting_kv_len: int | None) -> dict[str, GroupSlotStates]:
        out: dict[str, GroupSlotStates] = {}
        oow = self._out_of_window()
        for g, group in enumerate(self.groups):
            small, tb = self._small[g], self._tb[g]
            held = self._held[g] * small
            if group.kind == "state":
                token, reserved, out_w = held, 0, 0
            else:
                token, reserved, out_w = (self._tok[g] - oow[g]) * tb, self._reserved[g] * tb, oow[g] * tb
            out[group.label] = GroupSlotStates(token=token, reserved=reserved, internal=held - token - reserved - out_w,
                                               cached=len(self._key[g]) * small, out_of_window=out_w,
                                               free=self._free_small(g) * small)
        out[POOL] = GroupSlotStates(internal=self.pool_bytes - self.num_large * self.large_bytes,
                                    free=len(self._free_large) * self.large_bytes)
        if waiting_kv_len is not None:  # free small pages stranded in other kinds' large pages
            need = self._peak(waiting_kv_len)
            short = sum(-(-max(0, n - self._free_small(g) - len(self._key[g])) // self._ratio[g])
                        for g, n in need.items())
            if short > len(self._free_large) + len(self._lv0):
                for g, n in need.items():
                    extra = max(0, self._free_small(g) - n) * self._small[g]
                    if extra:
                        st = out[self.groups[g].label]
                        out[self.groups[g].label] = st._replace(free=st.free - extra, external=st.external + extra)
        return out

    def check_invariants(self) -> None:
        ngroups = len(self.groups)
        holders = {g: {} for g in range(ngroups)}
        tok, held, res = {g: 0 for g in self._attn}, {g: 0 for g in range(ngroups)}, {g: 0 for g in self._attn}
        ps = self.page_size
        for rid, req in self._reqs.items():
            for g in self._attn:
                pages, first = req.pages[g], req.first[g]
                if len(pages) != self.pages_for(req.length):
                    raise InvariantError(f"request {rid} group {g}: {len(pages)} pages for {req.length} positions")
                if first > hits.first_needed(self.groups[g], req.computed) // ps or \
                        any(p != NULL_PAGE for p in pages[:first]) or NULL_PAGE in pages[first:]:
                    raise InvariantError(f"request {rid} group {g}: held pages {pages} (first {first})")
                for i in range(first, len(pages)):
                    holders[g][pages[i]] = holders[g].get(pages[i], 0) + 1
                    if self._fill[g][pages[i]] != min(ps, req.length - i * ps):
                        raise InvariantError(f"request {rid} group {g} page {i}: fill {self._fill[g][pages[i]]}")
                res[g] += self._res_of(req, g)
            if set(req.state) != set(self._states):
                raise InvariantError(f"request {rid}: state pages {req.state}")
            for g, s in req.state.items():
                holders[g][s] = holders[g].get(s, 0) + 1
        free_large = list(self._free_large)
        if len(set(free_large)) != len(free_large) or any(self._split[c] != -1 for c in free_large):
            raise InvariantError("a large page twice in the free pool, or split and free")
        lv0 = {}
        for c in range(self.num_large):
            g = self._split[c]
            if g < 0 and c not in self._free_large:
                raise InvariantError(f"large page {c} is neither split nor free")
            counts = [0, 0, 0, 0]
            for h in range(ngroups):
                r = self._ratio[h]
                for s in range(c * r, (c + 1) * r):
                    st = self._st[h][s]
                    if (st == _UNSPLIT) != (h != g):
                        raise InvariantError(f"large page {c} split for {g}: small page {s} of group {h} in state {st}")
                    if h != g:
                        continue
                    counts[st] += 1
                    ref, n = self._ref[h][s], holders[h].get(s, 0)
                    if ref != n or (st == _USED) != (n > 0):
                        raise InvariantError(f"group {h} small page {s}: state {st}, ref {ref}, {n} holders")
                    if (st == _CACHED) != (s in self._key[h]) or (st == _CACHED and s not in self._hash[h]):
                        raise InvariantError(f"group {h} small page {s}: state {st}, key or hash out of step")
                    if (st == _FREE) != (s in self._where[h]) or (st == _FREE and s in self._hash[h]):
                        raise InvariantError(f"group {h} small page {s}: state {st}, free lists out of step")
                    if st == _FREE:
                        w = self._where[h][s]
                        live = self._aff[c] in self._reqs
                        if (w < 0 and (s not in self._nopref[h] or live)) or (w >= 0 and (
                                w != self._aff[c] or s not in self._pref[h].get(w, ()))):
                            raise InvariantError(f"group {h} free small page {s} filed under {w}, large page "
                                                 f"of request {self._aff[c]}")
                    if st == _USED:
                        held[h] += 1
                        if h in tok:
                            tok[h] += self._fill[h][s]
            if g >= 0:
                if counts[_FREE:] != [self._nfree[c], self._nused[c], self._ncached[c]]:
                    raise InvariantError(f"large page {c}: counts {counts} != "
                                         f"{self._nfree[c], self._nused[c], self._ncached[c]}")
                if counts[_FREE] == self._ratio[g]:
                    raise InvariantError(f"large page {c}: every small page free but still split")
                if not self._nused[c] and self._ncached[c]:
                    r = self._ratio[g]
                    lv0[c] = max(self._key[g][s] for s in range(c * r, (c + 1) * r) if s in self._key[g])
        owned = {}
        for c in range(self.num_large):
            if self._aff[c] >= 0:
                owned.setdefault(self._aff[c], set()).add(c)
        if set(owned) - set(self._reqs) or any(owned.get(r, set()) != self._owned.get(r, set()) for r in
                                                set(owned) | set(self._owned)):
            raise InvariantError(f"large pages filed under requests {self._owned} != recount {owned}")
        if lv0 != self._lv0:
            raise InvariantError(f"level-0 victims {sorted(self._lv0)} != recount {sorted(lv0)}")
        for g in range(ngroups):
            if sum(map(len, self._pref[g].values())) + len(self._nopref[g]) != len(self._where[g]):
                raise InvariantError(f"group {g}: free lists hold {len(self._where[g])} pages, files disagree")
            if set(self._pref[g]) - set(self._reqs):
                raise InvariantError(f"group {g}: free pages filed under requests that left")
            for s, h in self._hash[g].items():
                if self._index[g].get(h) != s or s not in self._stored[g]:
                    raise InvariantError(f"group {g} small page {s}: hash not indexed")
            if len(self._index[g]) != len(self._hash[g]) or len(self._stored[g]) != len(self._hash[g]):
                raise InvariantError(f"group {g}: index of {len(self._index[g])} for {len(self._hash[g])} hashed pages")
        if (tok, held, res) != (self._tok, self._held, self._reserved):
            raise InvariantError(f"counters ({self._tok}, {self._held}, {self._reserved}) != "
                                 f"recount ({tok}, {held}, {res})")
        self._check_state_sums()

    @property
    def label(self) -> str:
        return (f"{self.name}-{self.page_size}" + ("" if self.prefix_caching else "-nocache")
                + ("-refresh" if self._refresh else ""))

    def summary(self) -> dict:
        return {**super().summary(), "prefix_caching": self.prefix_caching, "large_page_bytes": self.large_bytes,
                "dropped_pages": self.dropped_pages,
                "num_large_pages": self.num_large, "state_interval": self.state_interval,
                "small_pages_per_large": {self.groups[g].label: self._ratio[g] for g in range(len(self.groups))}}
