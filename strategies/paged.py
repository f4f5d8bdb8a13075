"""PagedAttention (vLLM): fixed-size pages from a free list, reference counts, copy-on-write,
and automatic prefix caching by a chained hash of each full page's token ids.

    request a: [p0][p1][p2..]      p0, p1 full and hashed: h0 = H(root, ids[0:16]),
    request b: [p0][p1][p7..]                              h1 = H(h0, ids[16:32])
    b's prompt hashes to h0, h1 → it shares p0, p1 (ref 2); its own tokens start in p7.

Page states: in use (ref > 0), cached (ref 0, hashed, in the LRU), free (ref 0, not hashed),
fresh (never handed out: ids >= a high-water mark, free). The per-page lists cover the pages
handed out so far and grow by half when they run out, so a pool of 1e9 slots costs nothing
before it is used.

Costs: allocate and free are O(1) (a stack of returned pages, then the next fresh id: pages are
handed out 0, 1, 2, … as a full stack would; a grow takes its k new pages in one bulk, a slice
of the stack, a range of fresh ids and one eviction loop, in the order k single takes give); a
cached page is revived or evicted in O(1) (LRU: `PageLRU`, a list in LRU order with lazy
deletion, so a prefill's victims are one slice, a release's cached pages one extend and a
returning request's cached hits, where they are still one run of it, one slice removed; the
other policies: their own structures); a prefix lookup is
one dict probe per page plus a token comparison of the hit (a hash is never trusted alone). A
prompt's page hashes are computed lazily, up to its first miss; a full page is hashed once, in
bytes (a numpy slice compare costs ~1.5 us, a bytes compare ~0.1 us). With prefix caching off,
`grow` pays one boolean test. A quiet run's page-taking steps (kvbench/quiet.py) are one
`quiet_pages` call: the grows per taker and step it replaces, inline.

Lazy registration (prefix caching with plain LRU, no host tier, no dedup_touch, before any
fork; strategies/_paged_lazy.py): a request that registers a page below which nothing is
registered owns its chain from there, its later pages registered without a hash until another
request hits them; every answer equals registering every page hashed.

A request that waits for memory is matched once: the match (its hit pages, their page hashes,
and how many of them are cached) is kept in a memo and kept exact incrementally. An eviction of
one of its pages cuts it there (one set probe per eviction); a page of it that turns cached
counts there (one probe per freed hashed page); a retry only probes the page after its last hit
(pages registered since extend it). So a retry is O(1) plus the new hits, not O(prefix). (The
hits are indexed for those probes only when the request is refused: an admission that succeeds
at once pays nothing for the memo but its creation.)

Options that differ between engines (defaults: kvbench's original behaviour):
- `prefix_visibility`: when a computed page becomes hittable. `computed` (default): once the step
  that computes it has run (the next `grow`/`release` of its request registers it). `scheduled`
  (vLLM v1 caches a block's hash when it allocates it for the step): at once, in the `admit` or
  `grow` that schedules it, so a request admitted later in the same step hits it (the engine
  writes a step's K/V before any attention of the step reads it).
- `dedup_touch`: a page whose ids another page already caches (a request recomputed a prefix it
  could not hit) is not hashed and is freed at release. false (default): the cached original
  keeps its LRU position. true: when the duplicate is freed, the original, if cached, moves to
  most recent. vLLM keeps the duplicate as a cached block of its own, freed most recent; moving
  the original gives the same recency to the same ids without holding the extra page.
- `eviction`: which cached page is freed first, a policy of strategies/eviction/ (default lru,
  vLLM's); its keys are page ids, the page hash names their content.
- Admission (what is cached at all; both change what a later request can hit): `cache_outputs`
  false hashes only the pages inside the prompt the request was admitted with (after a
  preemption, its recomputed outputs are part of that prompt); `min_cache_len` > 0 hashes
  nothing of a request whose prompt is shorter. Its unhashed pages are freed at release.

Host tier (`host_tier_tokens` > 0; strategies/host_tier.py): a cached page the eviction policy
frees moves to a bounded host pool (copied device → host) instead of being dropped; the host
pool evicts by its own policy (`host_tier_eviction`, default lru). The host side is a second
hash table, chained hash → host page, with the page's ids to verify a hit. A prefix match runs
over both tables page by page up to the first page neither holds: the waiting request's memo
keeps only its leading GPU hits (exact as above), the rest (from its first GPU miss) is matched
again at each retry. An admission takes GPU pages for its host hits (normal allocation: it may
evict other cached pages, which go to the host; its own host hits are pinned meanwhile), copies
them host → device, and frees their host copies: a page's content is in one tier only (a page
that a request registers while the host holds its hash drops the host copy). The host policy's
keys are page hashes (a load or a supersede is a use, so a page that returns to the host keeps
its history). Off (0): the eviction paths test one attribute per evicted page, nothing else runs.
"""
from __future__ import annotations

from array import array
from itertools import islice
from operator import attrgetter

import numpy as np

from kvbench.strategies._paged_lazy import LazyRegistration
from kvbench.strategies._paged_state import _NEVER, _ROOT_HASH, _Match, _Rare, _Seq, _void
from kvbench.strategies.base import (Admission, HostStates, InvariantError, PageId, RequestId, SlotStates,
                                     Strategy)
from kvbench.strategies.eviction import EvictionPolicy, make_policy
from kvbench.strategies.eviction.lru import LRU, PageLRU
from kvbench.strategies.host_tier import HostPool, host_pages_for

_new_tuple = tuple.__new__
_NO_TAIL: tuple = ()
_REFUSED, _ADMITTED = Admission(False), Admission(True, 0)  # (answers without a hit: one tuple each, made once)


def page_hash(parent: int, ids: bytes) -> int:
    """Chained hash of one full page (`ids`: its token ids as bytes): depends on every token
    before it, not only its own. (Inlined in `_register_full_pages`, `_cached_prefix` and
    grow's page-start path: change all.)"""
    return hash((parent, ids))


_PAGE_HASH = page_hash  # (the module's own: `_cached_prefix` inlines it unless a test patched it)
_VISIBILITY = ("computed", "scheduled")
_BULK_IDS = 8  # registering this many pages or more: their ids as bytes from one numpy call (its
# fixed cost is about 8 bytes slices'), not a slice each


class _Scratch:
    """A strategy's view with no memo: `_cached_prefix` on it matches from scratch (invariants)."""

    def __init__(self, s: PagedStrategy) -> None:
        self.page_size, self._table, self._stored_ids, self._ref = s.page_size, s._table, s._stored_ids, s._ref
        self._owners, self._hash = s._owners, s._hash
        self._rare = s._rare
        self._hit_memo = None


class PagedStrategy(LazyRegistration, Strategy):
    """vLLM-style paging. `prefix_caching` turns automatic prefix caching on;
    `prefix_visibility`, `dedup_touch`, the admission options and the host tier
    (`host_tier_tokens`, `host_tier_eviction`): see the module docstring. Those options, the host
    tier's maps and the hit counters are one attribute, `_rare` (strategies/_paged_state.py), so
    that an instance keeps at most 29 attributes (CPython 3.11's shared keys: the hot paths'
    `self.x` and `self.m()` stay specialized; tests/test_paged_bulk.py holds the count)."""

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 16,
                 prefix_caching: bool = True, name: str = "paged", prefix_visibility: str = "computed",
                 dedup_touch: bool = False, eviction="lru", cache_outputs: bool = True,
                 min_cache_len: int = 0, host_tier_tokens: int = 0, host_tier_eviction: str = "lru") -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name)
        host_pages = host_pages_for(host_tier_tokens, self.page_size, "paged")
        if host_pages and not prefix_caching:
            raise ValueError("paged host_tier_tokens > 0 needs prefix_caching: true (the host tier holds cached pages)")
        # the host tier (None: off): its pages' chained hash ↔ host page, and their ids (in `_rare`)
        self._host = HostPool(host_pages, self.page_size, host_tier_eviction) if host_pages else None
        if prefix_visibility not in _VISIBILITY:
            raise ValueError(f"paged prefix_visibility must be computed or scheduled, got {prefix_visibility!r}")
        if int(min_cache_len) < 0:
            raise ValueError(f"paged min_cache_len must be >= 0, got {min_cache_len}")
        rare = self._rare = _Rare(prefix_caching, prefix_visibility, bool(dedup_touch), bool(cache_outputs),
                                  int(min_cache_len), host_pages * self.page_size,
                                  self._host.eviction if self._host else str(host_tier_eviction))
        self._solo = not prefix_caching  # no page is shared or hashed (until a fork shares some)
        self._scheduled = prefix_caching and prefix_visibility == "scheduled"
        if self._scheduled:  # (an instance attribute: the others keep the contract's default `room`)
            self.room = self._room_scheduled
        self._free = array("l")  # a stack of returned page ids (most recent on top)
        self._fresh = self.num_pages  # the last _fresh page ids were never handed out (free); the
        # per-page lists below cover the pages handed out so far and grow by half when they run out
        self._ref: list[int] = []
        self._fill: list[int] = []  # tokens written in the page
        self._hash: list[int | None] = []  # set while the page is in the hash table
        self._table: dict[int, PageId] = {}  # chained hash → page holding those ids
        # cached pages (ref 0, hashed), in the eviction policy's order (content: the page hash)
        self._lru: EvictionPolicy = make_policy(eviction)
        if type(self._lru) is LRU and not len(self._lru) and not isinstance(eviction, EvictionPolicy):
            self._lru = PageLRU()  # the same order, taken and added a slice at a time
        self._lru.bind(self.num_pages)
        rare.eviction = self._lru.name
        self._plain_lru = type(self._lru) is PageLRU and self._host is None  # evictions: no policy or host frames
        self._page_lru = type(self._lru) is PageLRU  # its size is `.n` (len() would run a Python __len__)
        rare.tracks = self._lru.tracks_requests  # Belady, priority: told each admitted / released request
        self._stored_ids: list[bytes | None] = []  # ids (as bytes) of each hashed page, to verify hits
        self._seqs: dict[RequestId, _Seq] = {}
        self._token = 0  # slots of in-use pages holding tokens
        self._reserved = 0
        self._hit_memo: _Match | None = None  # the waiting request's match (a memo: not state)
        self._init_lazy(prefix_caching and self._plain_lru and not rare.dedup_touch)

    # the options, read-only (kept in `_rare`: see there)
    prefix_caching = caches_prefixes = reads_tokens = property(attrgetter("_rare.prefix_caching"))
    prefix_visibility = property(attrgetter("_rare.prefix_visibility"))
    dedup_touch = property(attrgetter("_rare.dedup_touch"))
    eviction = property(attrgetter("_rare.eviction"))
    cache_outputs = property(attrgetter("_rare.cache_outputs"))
    min_cache_len = property(attrgetter("_rare.min_cache_len"))
    host_tier_tokens = property(attrgetter("_rare.host_tier_tokens"))
    host_tier_eviction = property(attrgetter("_rare.host_tier_eviction"))

    # ---- helpers ----------------------------------------------------------------------------
    def _available(self) -> int:
        return len(self._free) + self._fresh + (self._lru.n if self._page_lru else len(self._lru))

    def _take_page(self) -> PageId:
        if self._free:
            pid = self._free.pop()
        elif self._fresh:  # a page never handed out
            pid = self.num_pages - self._fresh
            self._fresh -= 1
            if pid == len(self._ref):
                self._grow_lists()
        else:
            pid = self._evict_one()
        self._ref[pid] = 1
        self._fill[pid] = 0
        return pid

    def _take_pages(self, k: int, fill_to: int = 0) -> list[PageId]:
        """k pages in the order k `_take_page` calls would give them (returned pages, top of the
        stack first, then fresh ids in order, then the eviction policy's victims in its order), in
        bulk: one slice of the stack, one range, one eviction loop. Each gets ref 1 and fill
        `fill_to` (the caller sets the last one's where it is not full)."""
        free, ref, fill = self._free, self._ref, self._fill
        if k == 1:  # the decode path: one page, no lists built
            if free:
                pid = free.pop()
            elif self._fresh:
                pid = self.num_pages - self._fresh
                self._fresh -= 1
                if pid == len(ref):
                    self._grow_lists()
            elif self._plain_lru and self._hit_memo is None:  # _evict_pages(1), inlined
                lru = self._lru
                if lru.dead:
                    pid = lru.take(1)[0]
                else:  # PageLRU.take(1), inlined
                    pid = lru.q[lru.head]
                    lru.head += 1
                    lru.n -= 1
                self._drop_victim(pid)
            else:
                pid = self._evict_pages(1)[0]
            ref[pid] = 1
            fill[pid] = fill_to
            return [pid]
        n = len(free)
        r = k if k < n else n
        got = []
        if r:
            got = free[n - r:].tolist()
            del free[n - r:]
            got.reverse()  # the order r pops would give
        f = k - r
        if f > self._fresh:
            f = self._fresh
        if f:
            first = self.num_pages - self._fresh
            self._fresh -= f
            while first + f > len(ref):  # the sizes one grow per page reaching the end would give
                self._grow_lists()
            got.extend(range(first, first + f))
        e = k - r - f
        if e and self._plain_lru and self._hit_memo is None:  # _evict_pages(e) and the takes, in one loop
            for pid in got:
                ref[pid] = 1
                fill[pid] = fill_to
            lru, table, hashes, stored = self._lru, self._table, self._hash, self._stored_ids
            victims = lru.take(e)  # the first e keys: the pages e victim() calls give
            if not self._lazy:
                for pid in victims:
                    del table[hashes[pid]]
                    stored[pid] = hashes[pid] = None
                    ref[pid] = 1
                if fill_to != self.page_size:  # (a cached page is full: its fill is ps already)
                    for pid in victims:
                        fill[pid] = fill_to
                got += victims
                return got
            # the victims' registrations, in order; a run of one owner's pages registered lazily in one
            # step: a released owner's such pages (all of them: `ndef`) joined the LRU in one extend,
            # and none of them is marked by its owner any more once one is revived (a hit takes them
            # over or hashes them all), so its victims are one run of ndef or fewer (`_check_lazy`);
            # their `_ref` reads 1 already (`_release_owner`) and their mark stays, a leftover that means
            # none (`_check_lazy`: a mark counts only on an owner's ndef pages after its node); a
            # hashed victim's `_ref` and hash are written here
            i = 0
            while i < e:
                pid = victims[i]
                h = hashes[pid]
                if h.__class__ is _Seq:  # registered lazily: its owner has n pages less
                    n = h.ndef
                    if n > e - i:
                        n = e - i
                    left = h.ndef - n
                    h.ndef = left
                    if not left:
                        self._drop_lazy(h, 0)
                    i += n
                    continue
                self._unhash_lazy(pid, h)
                hashes[pid] = None
                ref[pid] = 1
                i += 1
            if fill_to != self.page_size:  # (a cached page is full: its fill is ps already)
                for pid in victims:
                    fill[pid] = fill_to
            got += victims
            return got
        if e:
            got.extend(self._evict_pages(e))
        for pid in got:
            ref[pid] = 1
            fill[pid] = fill_to
        return got

    def _grow_lists(self) -> None:
        """The per-page lists grow by half (at least 1024 pages, at most to the pool): O(1) amortized
        per page handed out, and never more than 1.5x the pages used plus 1024."""
        n = len(self._ref)
        k = min(max(n // 2, 1024), self.num_pages - n)
        self._ref.extend([0] * k)
        self._fill.extend([0] * k)
        self._hash.extend([None] * k)
        self._stored_ids.extend([None] * k)
        self._parent.extend([None] * k)

    def _unref(self, pid: PageId) -> None:
        self._ref[pid] -= 1
        if self._ref[pid]:
            return
        self._token -= self._fill[pid]
        h = self._hash[pid]
        if h is not None:
            self._lru[pid] = h  # insert (LRU: most recently used at the end)
            memo = self._hit_memo
            if memo is not None and pid in memo.index:
                memo.cached += 1
        else:
            self._free.append(pid)

    def _unref_pages(self, pids, cached: list | None = None) -> None:
        """`_unref` of each page of `pids`, in order, in one loop. `cached` (a PageLRU only): pages
        already unreferenced that turn cached before them (in that order)."""
        ref, fill, hashes, lru, free, memo = self._ref, self._fill, self._hash, self._lru, self._free, self._hit_memo
        index = memo.index if memo is not None else None
        token = 0
        if type(lru) is PageLRU:  # the pages that turn cached join the LRU in one extend
            cached = [] if cached is None else cached
            for pid in pids:
                if ref[pid] != 1:  # still held by another request (a fork, a hit)
                    ref[pid] -= 1
                    continue
                ref[pid] = 0
                token += fill[pid]
                if hashes[pid].__class__ is int:
                    cached.append(pid)
                else:  # not registered (a `_Seq` here is a leftover: `_take_pages`)
                    free.append(pid)
            lru.extend(cached)
            self._token -= token
            if index is not None and memo.cached != len(memo.hits):  # the waiting match's hits among them
                memo.cached += len(index.intersection(cached))  # are evictable now (none where all were already)
            return
        for pid in pids:
            r = ref[pid] - 1
            ref[pid] = r
            if r:
                continue
            token += fill[pid]
            h = hashes[pid]
            if h is not None:
                lru[pid] = h  # insert (LRU: most recently used at the end)
                if index is not None and pid in index:
                    memo.cached += 1
            else:
                free.append(pid)
        self._token -= token

    def _set_reserved(self, seq: _Seq) -> None:
        cap = len(seq.pages) * self.page_size
        last_shared = seq.length % self.page_size and self._ref[seq.pages[-1]] > 1
        new = 0 if last_shared else min(seq.kv_len, cap) - seq.length
        self._reserved += new - seq.reserved
        seq.reserved = new

    def _after_unshare(self, pid: PageId) -> None:
        """A partly filled page shared by a fork may now have one owner left, who will write
        into it again: its tail turns from internal to reserved. O(running), forks only."""
        if self._ref[pid] != 1:
            return
        for seq in self._seqs.values():
            if seq.pages and seq.pages[-1] == pid:
                self._set_reserved(seq)
                return

    def _evict_one(self) -> PageId:
        """Take the eviction policy's victim out of the hash table; the caller owns the page."""
        pid = self._lru.victim()
        h = self._hash[pid]
        memo = self._hit_memo
        if h.__class__ is int:
            self._unhash(pid, h)
        else:  # (registered lazily: the owner's last such page, its position len(hashes) + ndef - 1)
            if memo is not None:
                self._cut_lazy(memo, pid, len(h.hashes) + h.ndef - 1)
            self._drop_lazy(h)
            self._ref[pid] = 0  # (its `_ref` read 1: `_release_owner`)
        if self._host is not None:
            self._to_host_many([(pid, self._hash[pid], self._stored_ids[pid])])
        self._stored_ids[pid] = None
        self._hash[pid] = None
        if memo is not None and pid in memo.index:
            self._cut_hit(memo, pid)
        return pid

    def _drop_victim(self, pid: PageId) -> None:
        """A plain-LRU victim's bookkeeping (no host tier, no waiting match; the caller took `pid`
        off the LRU and owns it): its hash leaves the table and its stored ids are dropped, or,
        registered lazily, its owner has one page less (`_drop_lazy`, its first step inlined).
        Mutates."""
        hashes = self._hash
        h = hashes[pid]
        if h.__class__ is int:
            self._unhash(pid, h)
            self._stored_ids[pid] = None
        else:
            left = h.ndef - 1
            h.ndef = left
            if not left:
                self._drop_lazy(h, 0)
        hashes[pid] = None

    def _evict_pages(self, k: int) -> list[PageId]:
        """`_evict_one` k times, in one loop (the policy's victims, in its order). (`_take_pages`
        inlines it for LRU with no host tier and no waiting match.)"""
        lru, table, hashes, stored, memo = self._lru, self._table, self._hash, self._stored_ids, self._hit_memo
        host = self._host
        out, demoted = [], []
        for _ in range(k):
            pid = lru.victim()
            h = hashes[pid]
            if h.__class__ is int:
                self._unhash(pid, h)
            else:  # (registered lazily: the owner's last such page, its position len(hashes) + ndef - 1)
                if memo is not None:
                    self._cut_lazy(memo, pid, len(h.hashes) + h.ndef - 1)
                self._drop_lazy(h)
                self._ref[pid] = 0  # (its `_ref` read 1: `_release_owner`)
            if host is not None:
                demoted.append((pid, hashes[pid], stored[pid]))
            stored[pid] = None
            hashes[pid] = None
            if memo is not None and pid in memo.index:
                self._cut_hit(memo, pid)
            out.append(pid)
        if demoted:
            self._to_host_many(demoted)
        return out

    def _unhash_lazy(self, pid: PageId, h: int) -> None:
        """`_unhash` with lazy registration on, and the page's stored ids dropped (the caller
        clears its hash). Mutates."""
        del self._table[h]
        self._stored_ids[pid] = None
        kids = self._kids
        if h in kids:
            self._ghosts[h] = self._parent[pid]
        else:  # (`_unkid`, its first step inlined)
            up = self._parent[pid]
            c = kids[up]
            if c > 1:
                kids[up] = c - 1
            else:
                self._unkid(up)

    def _unhash(self, pid: PageId, h: int) -> None:
        """Hashed page `pid` (hash `h`) leaves the table (evicted). Lazy registration: its node
        stays as a ghost where nodes are below it, else leaves its parent's count. Mutates."""
        del self._table[h]
        if self._lazy:
            if h in self._kids:
                self._ghosts[h] = self._parent[pid]
            else:
                self._unkid(self._parent[pid])

    def _cut_lazy(self, memo: _Match, pid: PageId, at: int) -> None:
        """Page `pid`, registered lazily at position `at` of its owner's pages, is evicted: where
        the waiting match hits it (there: its hits past its hashed ones are that owner's pages, at
        their positions), it is cut there (those hits are not in its index: `_index`). Mutates."""
        hits = memo.hits
        if at < len(hits) and hits[at] == pid:
            self._cut(memo, at)

    def _cut_hit(self, memo: _Match, pid: PageId) -> None:
        """Page `pid`, an indexed hit of the waiting match, is evicted: the match is cut there
        (mostly at its last hit: a released request's pages leave tail first). Mutates."""
        hits = memo.hits
        self._cut(memo, len(hits) - 1 if hits[-1] == pid else hits.index(pid))

    def _cut(self, memo: _Match, i: int) -> None:
        """The waiting request's hit i is gone: it hits only its first i pages now."""
        if memo.nidx > i:
            memo.nidx = i
        ref, index, hashes = self._ref, memo.index, self._hash
        for pid in memo.hits[i:]:
            index.discard(pid)
            if ref[pid] == 0:
                memo.cached -= 1
            else:  # (registered lazily by an owner that left: ref 0, its `_ref` reads 1)
                h = hashes[pid]
                if h.__class__ is _Seq and h.gone:
                    memo.cached -= 1
        del memo.hits[i:]

    # ---- host tier ----------------------------------------------------------------------------
    def _to_host_many(self, demoted: list[tuple[PageId, int, bytes]]) -> None:
        """Cached pages (page, hash, ids) leave the GPU, in order: each is copied into a host page,
        room made by the host policy (a full host reuses its victim's page at once); dropped if
        every host page is pinned (an admission loading them)."""
        host = self._host
        rare = self._rare
        policy, table, hashes, stored = host.policy, rare.host_table, rare.host_hash, rare.host_ids
        pop = policy.popitem if type(policy) is LRU else None  # LRU.victim without its Python frame
        gpu, dst = [], []
        for pid, h, ids in demoted:
            if host.free_pages():
                hp = host.take()
            elif len(policy):
                hp = table.pop(pop(False)[0] if pop is not None else policy.victim())
                del hashes[hp], stored[hp]
                host.evicted_pages += 1
            else:
                continue  # every host page is pinned: dropped
            table[h] = hp
            hashes[hp] = h
            stored[hp] = ids
            policy[h] = h  # insert (key and content: the page hash)
            gpu.append(pid)
            dst.append(hp)
        host.d2h_many(gpu, dst)

    def _drop_host(self, hp: int) -> None:
        """Host page `hp` no longer holds its content (evicted, loaded back, or superseded)."""
        rare = self._rare
        del rare.host_table[rare.host_hash.pop(hp)]
        del rare.host_ids[hp]
        self._host.give(hp)

    def _drop_host_copies(self, hashes) -> None:
        """Pages with these hashes are now cached on the GPU: the host drops its copies (one tier)."""
        host_table, policy = self._rare.host_table, self._host.policy
        for h in hashes:
            hp = host_table.get(h)
            if hp is not None:
                policy.remove(h)
                self._drop_host(hp)

    def _tail(self, memo: _Match, num_full: int) -> list[tuple[bool, int]]:
        """The match after the memo's GPU hits, over both tiers page by page up to the first page
        neither holds: (True, host page) or (False, GPU page) each. Mutates only the memo's
        hash list (extended). Works on a `_Scratch` view too."""
        ps, hashes, tokens, hits = self.page_size, memo.hashes, memo.tokens, memo.hits
        table, stored, host_table, host_ids = self._table, self._stored_ids, self._rare.host_table, self._rare.host_ids
        tail: list[tuple[bool, int]] = []
        for i in range(len(hits), num_full):
            ids = tokens[i * ps:(i + 1) * ps].tobytes()
            if i == len(hashes):
                hashes.append(page_hash(hashes[-1] if i else _ROOT_HASH, ids))
            h = hashes[i]
            pid = table.get(h)
            if pid is not None and stored[pid] == ids:
                tail.append((False, pid))
                continue
            hp = host_table.get(h)
            if hp is None or host_ids[hp] != ids:
                break
            tail.append((True, hp))
        return tail

    def _load_tail(self, tail: list[tuple[bool, int]]) -> list[PageId]:
        """Admit the tail of a match: revive its GPU hits, pin its host hits, take GPU pages for
        them (may evict other cached pages to the host), copy host → device, free the host
        copies and register the new pages. Returns the pages in position order. Mutates."""
        host, ref, ps, rare = self._host, self._ref, self.page_size, self._rare
        for on_host, key in tail:
            if on_host:
                host.policy.remove(rare.host_hash[key])  # pinned: never the host's victim while it loads
            else:
                if ref[key] == 0:
                    del self._lru[key]
                    self._token += self._fill[key]
                ref[key] += 1
        new = iter(self._take_pages(sum(1 for on_host, _ in tail if on_host)))
        out = []
        for on_host, key in tail:
            if not on_host:
                out.append(key)
                continue
            pid = next(new)
            host.h2d(key, pid)
            h, ids = rare.host_hash[key], rare.host_ids[key]
            self._drop_host(key)
            self._table[h] = pid
            self._hash[pid] = h
            self._stored_ids[pid] = ids
            self._fill[pid] = ps
            self._token += ps
            out.append(pid)
        return out

    def _cached_prefix(self, rid: RequestId, tokens: np.ndarray, num_full: int) -> _Match:
        """The longest cached prefix of `tokens`' first `num_full` pages: the memo of this
        request's last match, extended from its first miss (probe, then verify the ids). Mutates
        only the memo. The page hashes are computed up to the first miss."""
        memo = self._hit_memo
        if memo is None or memo.rid != rid or memo.tokens is not tokens:
            memo = self._hit_memo = _Match(rid, tokens, num_full)
        elif memo.num_full != num_full:
            self._cut(memo, 0)
            memo.num_full = num_full
        ps, hashes, hits, table, stored, ref, owners = (self.page_size, memo.hashes, memo.hits, self._table,
                                                        self._stored_ids, self._ref, self._owners)
        data, nb = memo.data, ps * tokens.itemsize  # (ids from `data` once the match is a few pages long)
        inline = page_hash is _PAGE_HASH  # (tests patch `page_hash`: then it is called per page)
        if len(hashes) < len(hits):  # (a retry past an owner's node)
            if self._hash[hits[-1]].__class__ is _Seq:  # still within its lazy pages
                return PagedStrategy._lazy_walk(self, memo, self._hash[hits[-1]], len(hits))
            PagedStrategy._match_hashes(memo, len(hits), ps)  # they were hashed since: probe the table again
            data = memo.data
        for i in range(len(hits), num_full):
            ids = None
            if i == len(hashes):
                ids = tokens[i * ps:(i + 1) * ps].tobytes() if data is None else data[i * nb:(i + 1) * nb]
                parent = hashes[-1] if i else _ROOT_HASH
                hashes.append(hash((parent, ids)) if inline else page_hash(parent, ids))
            pid = table.get(hashes[i])
            if pid is not None:
                want = stored[pid]
            else:  # not hashed: page i of the owner of the chain below the last hit, registered lazily
                if not (i and owners):
                    break
                owner = self._hash[hits[-1]]
                if owner.__class__ is not _Seq:
                    owner = owners.get(hashes[i - 1])
                if owner is None:
                    break
                return PagedStrategy._lazy_walk(self, memo, owner, i)
            if ids is None:
                ids = tokens[i * ps:(i + 1) * ps].tobytes() if data is None else data[i * nb:(i + 1) * nb]
            if want != ids:  # a hash is only a hint: verify the ids
                break
            hits.append(pid)
            if ref[pid] == 0:
                memo.cached += 1
            if data is None and len(hits) >= 4:  # a long match: slices of one bytes copy (~10x cheaper
                data = memo.data = tokens.tobytes()  # than a numpy slice's tobytes each)
        return memo

    def _index(self, memo: _Match) -> None:
        """The request is refused: index its hits (a set: a hit's position is looked up in `hits`
        where one is cut, rarely), so that evictions and frees find them; all but those registered
        lazily (its hits past its hashed ones, where its last hit is such a page: one owner's pages
        at their own positions, found by position where evicted or released: `_cut_lazy`,
        `_release_owner`; indexed if hashed meanwhile: `_hash_owned`). Mutates only the memo."""
        hits = memo.hits
        n = memo.nidx  # (the index is the set of hits[:n]: a cut drops a suffix from both)
        if n < len(hits):
            owner = self._hash[hits[-1]]
            k = len(owner.hashes) if owner.__class__ is _Seq else len(hits)
            if n < k:
                memo.index.update(hits[n:k])
                memo.nidx = k

    def _register_full_pages(self, seq: _Seq) -> None:
        """Put the request's newly completed pages into the hash table (they hold computed K/V).
        (`page_hash` inlined: `hash((parent, ids))`.)"""
        ps, hashes = self.page_size, seq.hashes
        first, full = len(hashes), seq.length // ps
        if full > seq.cache_pages:
            full = seq.cache_pages
        table, page_hashes, stored = self._table, self._hash, self._stored_ids  # (hashes.append: 3.11 specializes it)
        if seq.lazy:  # the chain's owner: its pages registered unhashed
            first = seq.hash_at // ps - 1
            for pid in seq.pages[first:full]:
                page_hashes[pid] = seq
            seq.ndef += full - first
            seq.hash_at = (full + 1) * ps if full < seq.cache_pages else _NEVER
            return
        if self._lazy:
            self._register_watched(seq, first, full)
            return
        h = hashes[-1] if first else _ROOT_HASH
        data = seq.data  # ids are final once their K/V exist
        if data is None:
            data = seq.data = seq.tokens.tobytes()
        nb = ps * seq.tokens.itemsize
        if full == first + 1:  # the decode path: one page
            ids = data[first * nb:full * nb]
            h = hash((h, ids))
            hashes.append(h)
            pid = seq.pages[first]
            if h not in table and page_hashes[pid] is None:
                table[h] = pid
                page_hashes[pid] = h
                stored[pid] = ids
        elif full - first >= _BULK_IDS:  # a prefill chunk's pages: their ids cut in one numpy call
            setdefault = table.setdefault  # (one probe: inserts where the hash is new)
            pieces = np.frombuffer(data, _void(nb), full - first, first * nb).tolist()
            for pid, ids in zip(seq.pages[first:full], pieces):
                h = hash((h, ids))
                hashes.append(h)
                if page_hashes[pid] is None and setdefault(h, pid) == pid:  # (table[h] == pid means hashed)
                    page_hashes[pid] = h
                    stored[pid] = ids
        else:  # a few pages
            for pid, at in zip(seq.pages[first:full], range(first * nb, full * nb, nb)):
                ids = data[at:at + nb]
                h = hash((h, ids))
                hashes.append(h)
                if h not in table and page_hashes[pid] is None:
                    table[h] = pid
                    page_hashes[pid] = h
                    stored[pid] = ids
        seq.hash_at = (full + 1) * ps if full < seq.cache_pages else _NEVER
        # (a page whose content another page already caches stays unhashed: freed on release)
        if self._host is not None:
            self._drop_host_copies(hashes[first:full])

    def _revive_all(self, hits: list[PageId], mine: int) -> None:
        """Admit hits that are all cached (a preempted request back), out of the PageLRU in bulk:
        where they are one run of its entries, last hit first (a released request's pages join
        the LRU in one extend, tail first; Mooncake: every return), that run leaves the list (by
        moving the front where it is first, else one `del` of a slice near the tail, looked for
        among the last 8n + 8192 entries); else each leaves a stale entry, as `PageLRU.remove`
        does. Hits from `mine` on are pages registered lazily by an owner that left (taken over:
        their `_ref` reads 1 already). Mutates."""
        lru, dead, ref, n = self._lru, self._lru.dead, self._ref, len(hits)
        for pid in hits[:mine]:
            ref[pid] = 1
        self._token += n * self.page_size  # (cached pages are full)
        lru.n -= n
        q, head, back = lru.q, lru.head, hits[::-1]
        if not dead or dead.keys().isdisjoint(hits):  # (then each has one entry, its live one)
            at = head
            if q[head] != back[0]:  # looked for among the last entries only: O(n) (Mooncake: the run
                try:  # ends 1.2k entries before the tail at the median, 4.2k at the 99th percentile)
                    at = q.index(back[0], max(head, len(q) - 8 * n - 8192))
                except ValueError:
                    at = -1
            if at >= 0 and q[at:at + n] == back:
                if at == head:
                    lru.head = head + n
                else:
                    del q[at:at + n]
                return
        more = [(pid, dead[pid] + 1) for pid in dead.keys() & hits] if dead else None
        dead.update(dict.fromkeys(hits, 1))
        if more:
            dead.update(more)

    def _unref_touching(self, seq: _Seq) -> None:
        """Release `seq`'s pages, tail first, as `release` does; with dedup_touch, a duplicate
        page it frees (full, hashed by the request, not in the table: another page holds its
        ids) moves the cached original to most recent where a freed copy of its own would go.
        The original's ids are verified. O(pages), plus one bytes compare per duplicate."""
        ps, table, lru, stored, nh = self.page_size, self._table, self._lru, self._stored_ids, len(seq.hashes)
        for i in range(len(seq.pages) - 1, -1, -1):
            pid = seq.pages[i]
            self._unref(pid)
            if i >= nh or self._ref[pid] or self._hash[pid] is not None:
                continue  # not full, still held by a fork, or cached itself
            orig = table.get(seq.hashes[i])  # (cached: evictable, in the policy)
            if orig is not None and not self._ref[orig] and stored[orig] == seq.tokens[i * ps:(i + 1) * ps].tobytes():
                lru.touch(orig)

    # ---- contract ---------------------------------------------------------------------------
    def page_table(self, rid: RequestId) -> np.ndarray:
        # (made again only where its pages changed: a decode step takes a page every page_size
        # steps, and the gpu engine asks for every row's table every step)
        seq = self._seqs[rid]
        pages, kept = seq.pages, seq.table
        if kept is not None and kept[0] == len(pages) and kept[1] == pages[-1]:
            return kept[2]
        table = np.asarray(pages, dtype=np.int32)
        if pages:
            table.flags.writeable = False  # (handed out again: see the contract)
            seq.table = (len(pages), pages[-1], table)
        return table

    def cached_prefix_len(self, tokens, num_prompt) -> int:
        if not self._rare.prefix_caching:
            return 0
        ps = self.page_size  # matched from scratch on a memo-less view: the real memo is untouched
        view, num_full = _Scratch(self), (num_prompt - 1) // ps
        memo = PagedStrategy._cached_prefix(view, RequestId(-1), tokens, num_full)
        tail = PagedStrategy._tail(view, memo, num_full) if self._host is not None else _NO_TAIL
        return (len(memo.hits) + len(tail)) * ps

    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        ps = self.page_size
        hits: list[PageId] = []
        revived = 0  # hits now cached: admitting takes them out of the evictable set
        tail = _NO_TAIL  # the match beyond the leading GPU hits, over both tiers (host tier only)
        rare = self._rare
        caching = rare.prefix_caching
        memo = None  # (with prefix caching: the match, made where it may hit, else where refused)
        if caching:
            num_full = (num_prompt - 1) // ps  # leave >= 1 to compute
            old = self._hit_memo
            if (old is not None and old.rid == rid and old.tokens is tokens or self._host is not None
                    or page_hash is not _PAGE_HASH
                    or num_full and hash((_ROOT_HASH, tokens[:ps].tobytes())) in self._table):
                memo = self._cached_prefix(rid, tokens, num_full)
                hits, revived = memo.hits, memo.cached
                if self._host is not None:
                    tail = self._tail(memo, num_full)
            # (else a match made now would miss its first page: no hit, as `_cached_prefix` finds; the
            # Azure traces' every first admission)
        if memo is None:  # no hit (no match made; without prefix caching every admission)
            return self._admit_cold(rid, tokens, kv_len, num_prompt, max_new)
        cached = (len(hits) + len(tail)) * ps
        length = cached + min(max_new, num_prompt - cached)
        need = self.pages_for(length) - len(hits)
        host_tokens = 0
        if tail:
            host_tokens = sum(1 for on_host, _ in tail if on_host) * ps
            need -= len(tail) - host_tokens // ps  # GPU hits in the tail need no page
            revived += sum(1 for on_host, pid in tail if not on_host and self._ref[pid] == 0)
        if need > self._available() - revived:
            if caching:
                self._index(memo if memo is not None else self._cached_prefix(rid, tokens, num_full))
            return _REFUSED
        self._hit_memo = None
        owner = self._hash[hits[-1]] if hits else None
        take_over = False
        if owner.__class__ is _Seq:  # it hit pages registered lazily: it takes them over, or they are hashed
            take_over = self._may_take_over(owner, len(hits))
            if not take_over:
                self._share(owner.hashes[-1])
        if self._page_lru:  # PageLRU.remove of each cached hit, inlined (a stale entry each; all cached: in bulk)
            # (hits taken over: the owner's pages registered lazily, from its node's on, are cached;
            # their `_ref` reads 1: `_release_owner`)
            mine = len(owner.hashes) if take_over else len(hits)
            if len(hits) > 1 and memo.cached == len(hits):
                self._revive_all(hits, mine)
            else:
                lru, dead, ref = self._lru, self._lru.dead, self._ref
                for pid in hits[:mine]:
                    if ref[pid] == 0:
                        dead[pid] = dead.get(pid, 0) + 1
                        lru.n -= 1
                        self._token += self._fill[pid]
                    ref[pid] += 1
                for pid in hits[mine:]:
                    dead[pid] = dead.get(pid, 0) + 1
                    ref[pid] = 1
                lru.n -= len(hits) - mine
                self._token += (len(hits) - mine) * ps  # (cached pages are full)
        else:
            for pid in hits:
                if self._ref[pid] == 0:
                    del self._lru[pid]
                    self._token += self._fill[pid]
                self._ref[pid] += 1
        seq = _Seq(tokens=tokens, kv_len=kv_len, pages=list(hits), length=cached,
                   data=memo.data if memo is not None else None)
        if tail:
            seq.pages += self._load_tail(tail)
        nhit = len(seq.pages)
        seq.hashes = (memo.hashes[:nhit] if take_over or len(memo.hashes) >= nhit else
                      self._match_hashes(memo, nhit, ps)) if nhit else []
        seq.hash_at = (nhit + 1) * ps
        if take_over:
            seq = self._take_over(owner, seq, nhit)
        if not caching:  # hashes nothing: grow's registration test is one compare
            seq.cache_pages, seq.hash_at = 0, _NEVER
        elif rare.admission:  # cache only the prompt, or nothing of a short request
            seq.cache_pages = (0 if num_prompt < rare.min_cache_len
                               else (num_prompt if not rare.cache_outputs else kv_len) // ps)
            if nhit >= seq.cache_pages:
                seq.hash_at = _NEVER
        self._seqs[rid] = seq
        ok = self.grow(rid, length - cached)
        assert ok, "room was checked above"
        if rare.tracks:
            self._lru.request(rid)
        rare.hits_gpu += cached - host_tokens
        if host_tokens:
            rare.hits_host += host_tokens
            return Admission(True, cached, host_tokens)
        return Admission(True, cached)

    def _admit_cold(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        """`admit` of a request that hits nothing (made no match: its first page's hash is not
        in the table, or prefix caching is off), as admit's general path and its `grow` make it:
        the room test (refused: the match made and indexed, as there), then its min(max_new,
        num_prompt) positions in pages_for(them) pages (`_take_pages`), nothing revived, nothing
        registered but with `scheduled` visibility (its full pages, as grow's last step).
        tests/test_paged_grow_paths.py compares the two. Mutates."""
        rare, ps = self._rare, self.page_size
        length = max_new if max_new < num_prompt else num_prompt
        if length > kv_len:
            raise ValueError(f"request {rid} grows past its final length {kv_len}")
        k = -(-length // ps)
        if k > len(self._free) + self._fresh + (self._lru.n if self._page_lru else len(self._lru)):
            if rare.prefix_caching:
                self._index(self._cached_prefix(rid, tokens, (num_prompt - 1) // ps))
            return _REFUSED
        self._hit_memo = None
        pages = self._take_pages(k, ps)
        self._fill[pages[-1]] = length - (k - 1) * ps
        seq = _Seq(tokens=tokens, kv_len=kv_len, pages=pages, length=length, hash_at=ps)
        if not rare.prefix_caching:  # hashes nothing: grow's registration test is one compare
            seq.cache_pages, seq.hash_at = 0, _NEVER
        elif rare.admission:  # cache only the prompt, or nothing of a short request
            seq.cache_pages = (0 if num_prompt < rare.min_cache_len
                               else (num_prompt if not rare.cache_outputs else kv_len) // ps)
            if not seq.cache_pages:
                seq.hash_at = _NEVER
        cap = k * ps  # (_set_reserved: its last page is its own)
        seq.reserved = res = (cap if cap < kv_len else kv_len) - length
        self._reserved += res
        self._token += length
        self._seqs[rid] = seq
        if self._scheduled and length >= seq.hash_at:  # hittable as soon as scheduled (vLLM)
            self._register_full_pages(seq)
        if rare.tracks:
            self._lru.request(rid)
        return _ADMITTED

    def grow(self, rid, num_tokens) -> bool:
        seq = self._seqs[rid]
        res = seq.reserved
        if 0 < num_tokens <= res:
            # the decode path: the tokens fit the request's own last page (no page taken, none
            # copied, room never short). Its reserved share is exact (`_set_reserved`): positive
            # only where its last page is its own (not shared), partly filled, with room below
            # kv_len, so num_tokens <= it says they fit. The general path below gives the same,
            # step by step
            pos = seq.length
            if pos >= seq.hash_at:  # (never without prefix caching)
                self._register_full_pages(seq)
            self._fill[seq.pages[-1]] += num_tokens
            self._token += num_tokens
            seq.length = pos + num_tokens
            # _set_reserved: its last page is its own and partly filled before and after, so
            # min(kv_len, held slots) - length drops by num_tokens
            seq.reserved = res - num_tokens
            self._reserved -= num_tokens
            if self._scheduled and pos + num_tokens >= seq.hash_at:
                self._register_full_pages(seq)
            return True
        pos = seq.length
        new_len = pos + num_tokens
        kv_len = seq.kv_len
        if new_len > kv_len:
            raise ValueError(f"request {rid} grows past its final length {kv_len}")
        ps, pages, ref = self.page_size, seq.pages, self._ref
        rem = pos % ps
        if num_tokens == 1 and not rem and pages:
            # a decode that starts a new page (every held page is full: none copied): the general
            # path below for one page
            if not self._free and not self._fresh and not (self._lru.n if self._page_lru else self._lru):  # none left
                return False
            if pos >= seq.hash_at:  # (never without prefix caching)
                hashes, data = seq.hashes, seq.data
                first = len(hashes)
                if seq.lazy:  # the chain's owner
                    if pos == seq.hash_at:  # the one page it filled, registered unhashed
                        self._hash[pages[-1]] = seq
                        seq.ndef += 1
                        seq.hash_at = pos + ps if pos // ps < seq.cache_pages else _NEVER
                    else:
                        self._register_full_pages(seq)
                elif self._lazy:
                    self._register_full_pages(seq)
                elif pos // ps == first + 1 and first < seq.cache_pages and data is not None and self._host is None:
                    # `_register_full_pages` of the one page it filled, inline (its decode path)
                    nb = ps * seq.tokens.itemsize
                    ids = data[first * nb:(first + 1) * nb]
                    h = hash((hashes[-1] if first else _ROOT_HASH, ids))
                    hashes.append(h)
                    full_pid = pages[first]
                    if h not in self._table and self._hash[full_pid] is None:
                        self._table[h] = full_pid
                        self._hash[full_pid] = h
                        self._stored_ids[full_pid] = ids
                    seq.hash_at = pos + ps if first + 1 < seq.cache_pages else _NEVER
                else:
                    self._register_full_pages(seq)
            pages.append(self._take_pages(1, 1)[0])
            self._token += 1
            seq.length = new_len
            cap = len(pages) * ps  # (_set_reserved: its new last page is its own)
            res = (cap if cap < kv_len else kv_len) - new_len
            self._reserved += res - seq.reserved
            seq.reserved = res
            if self._scheduled and new_len >= seq.hash_at:  # hittable as soon as scheduled (vLLM)
                self._register_full_pages(seq)
            return True
        cow = rem != 0 and ref[pages[-1]] > 1
        k = -(-new_len // ps) - len(pages)  # pages_for(new_len) - held
        need = k + 1 if cow else k
        if need > 0 and need > len(self._free) + self._fresh + (self._lru.n if self._page_lru else len(self._lru)):
            return False  # before registering pages: a grow that answers no changes nothing
        if pos >= seq.hash_at:  # (never without prefix caching)
            self._register_full_pages(seq)
        fill = self._fill
        if cow:  # the last page is shared and partly filled: copy it before writing into it
            old = pages[-1]
            new = self._take_pages(1, fill[old])[0]
            self._token += fill[new]
            self._copies.append((old, new))
            pages[-1] = new
            self._unref(old)
            self._after_unshare(old)
        if rem and new_len > pos:  # the last page has room: fill it first
            more = ps - rem
            fill[pages[-1]] += more if more < num_tokens else num_tokens
        if k > 0:  # whole pages, then the last one as far as new_len reaches
            got = self._take_pages(k, ps)
            fill[got[-1]] = new_len - (len(pages) + k - 1) * ps
            pages.extend(got)
        self._token += num_tokens
        seq.length = new_len
        # _set_reserved(seq), inlined
        if new_len % ps and ref[pages[-1]] > 1:
            res = 0
        else:
            cap = len(pages) * ps
            res = (cap if cap < kv_len else kv_len) - new_len
        self._reserved += res - seq.reserved
        seq.reserved = res
        if self._scheduled and new_len >= seq.hash_at:  # hittable as soon as scheduled (vLLM)
            self._register_full_pages(seq)
        return True

    def quiet_pages(self, rids: list, comp: list[int], held: list[int], at: dict[int, list[int]], j: int,
                    stop: int, free_only: bool, d: int, deferred: int, cols: list[list[int]],
                    stretches: list[tuple], head: RequestId | None = None) -> tuple | None:
        """The page-taking steps of a quiet run (kvbench/quiet.py, `QuietRun.run`) from step j,
        a page-taking one, up to `stop`, in one call: each exactly as the run's per-step grows
        make it (a taker's deferred decodes, then its decode, takers in running order), without
        a call per grow or a `slot_states` per step. Request i (`rids[i]`, the run's indices)
        writes position comp[i] + t in step t and holds held[i] positions in the strategy; `at`
        maps a step to the requests (indices, in running order) that take a page in it (a
        request at a page start takes one every page_size steps: it moves to step t +
        page_size; one that is not, a request's first quiet grow, grows as `grow` does and moves
        to its next page start). `d` requests decode each step, `deferred` of their decodes are
        not grown yet. A page-taking step's states (the strategy's, with the deferred decodes
        counted) head the stretch of the steps after it (`stretches`, as the run makes them;
        `cols`, the run's rows, only says how many come before). Stops before a step whose
        takers free + cached pages (free only: `free_only`) cannot serve, leaving its entry in
        `at`. Returns (steps run, token, reserved, internal, cached, free, deferred) after the
        last; None (nothing changed) where this strategy's grows have more to do than these (a
        host tier, `scheduled` visibility, a fork with prefix caching) or step j's takers cannot
        be served. Mutates the strategy, `held` and `at`.

        `head` (prefix caching, requests waiting; kvbench.quiet.head_need 2): (id, num_prompt,
        budget) of the waiting request the scheduler tries first, with the tokens admission
        would give it, refused in the step before step j (the run's
        steps before j took no page, or took them here under this guard). A step's takes may
        then take free pages or evict, where its refusal provably lasts through them (else
        it stops before the step: the scheduler plans it). Why (admit's decision): the head is
        refused while need > available - revived, with H = its hits (the kept match, `_Match`:
        exact, retried at the last refusal), revived = its hits that are cached, need =
        min(ceil(budget / ps), pages_for(prompt) - H) (budget: the step's tokens left after the
        d decodes, fixed while they run). A quiet step's grows change the pool only where a
        request takes a page: each take lowers available by one (a free page taken, or a cached
        one evicted: nt takes, nt less), and besides that the match changes in two ways only:
        (1) a victim is one of its hits (cached): the match is cut there, revived falls by the
        cached hits cut and need may rise; the margin may grow, so the head may fit; (2) a taker
        registers the page the match missed first (page H, by hash or lazily as an owner's):
        a retry extends the match from H (it probes nothing before), H and revived may grow.
        Registration of page H happens in the grow where a request with hash_at <= (H + 1) * ps
        writes position (H + 1) * ps or later (a take, in a quiet run); the victims are the
        LRU's first live entries. A step with neither leaves H, revived and need as they were
        and available lower: refused again, and its retry finds what the last one found (the
        memo is as stepping leaves it: it is retried only where it is refused, `_index` adds
        nothing). So a step is run here only when (a) its evictions (takers beyond the free
        pages) take none of the head's cached hits (`_safe_victims`), or they do and admit's
        decision with the match cut at the first of them is still a refusal (`_cut_refused`:
        its retry then misses there, the page evicted, as stepping's does), and (b) no taker
        may register the page the match misses first after the step (page H, or the cut's).
        A cut at the match's last hit lowers available and revived by one each and raises need
        by at most one: the head stays out (overloaded Mooncake: all 1.7k cuts); a cut below
        other cached hits may let it in (hits out of the LRU's order: a prefix computed twice
        in one step, tests/test_paged_refused_head.py). Nothing else runs in a quiet step (no
        admission, release or preemption: a call stops at the run's next finish, after which
        `QuietRun.retire` asks `still_refused`, and before takes that free + cached pages cannot
        serve). The checks: `_HeadGuard.take`."""
        if self._host is not None or self._scheduled or not (self._solo or self._lazy):
            return None
        ps, seqs, num_pages = self.page_size, self._seqs, self.num_pages
        free, ref, fill, marks, lru, page_lru = self._free, self._ref, self._fill, self._hash, self._lru, self._page_lru
        plain = self._plain_lru
        uncapped = not self._rare.admission  # (every request may hash all its pages: no cache_pages test)
        capacity = num_pages * ps
        k0 = len(cols[0])  # (the run's rows before: a page-taking step's states head the stretch of the
        # steps after it, as `QuietRun.run` makes them; this call appends no row)
        t, took = j, False  # took: step t - 1 took pages (its states head the next stretch)
        token = reserved = internal = cached = nfree = 0
        tok, rsv = self._token, self._reserved  # (the counters, written back where `grow` runs and at the end)
        # (a refused head's guard, kvbench.quiet.head_need 2: `_HeadGuard`; evictions inlined where no
        # waiting match may be cut, or where the guard knows the victims spare it)
        guard = _HeadGuard(self, head) if head is not None and not free_only else None
        evict = plain and (self._hit_memo is None or guard is not None)
        navail, nlru = len(free) + self._fresh, lru.n if page_lru else len(lru)  # (free and fresh pages, cached
        # ones: as after the last page-taking step, read again after each)
        while True:
            takers = at.get(t)
            if takers is None:  # no take up to the next page-taking step: one stretch
                n = t + 1
                end = t + ps if t + ps < stop else stop
                while n < end and n not in at:
                    n += 1
                m = n - t
                if took:  # (the page-taking step and the m after it)
                    stretches.append((k0, m + 1, token, reserved, d, internal, 0, cached, nfree))
                    took = False
                else:
                    stretches.append((k0, m, token + d, reserved - d, d, internal, 0, cached, nfree))
                deferred += d * m
                token += d * m
                reserved -= d * m
                t = n
                if t >= stop:
                    break
                continue
            nt = len(takers)
            avail = navail
            if avail + nlru < nt or (free_only and avail < nt):
                break  # (left to the run: it stops there)
            if guard is not None:  # the head stays refused after the step (see above), or it is left to the scheduler
                cut = guard.take(takers, t, nt, avail, rids, comp)
                if cut is None:
                    break
                if cut:
                    evict = False  # (its victims cut the match: `_evict_pages`)
            del at[t]
            odd = None  # takers not at a page start (their first quiet grow)
            for i in takers:
                s = seqs[rids[i]]
                pages = s.pages
                was, pos = held[i], comp[i] + t
                held[i] = pos + 1
                deferred -= pos - was
                if len(pages) * ps != pos:  # not at a page start: `grow` (as the run makes it), then its next one
                    self._token, self._reserved = tok, rsv
                    if pos > was and not self.grow(rids[i], pos - was) or not self.grow(rids[i], 1):
                        raise RuntimeError(f"quiet_pages: request {rids[i]}: a grow failed although free + "
                                           "cached pages could serve it")
                    tok, rsv = self._token, self._reserved
                    if odd is None:
                        odd = [i]
                    else:
                        odd.append(i)
                    continue
                last, hash_at = pages[-1], s.hash_at
                if pos > was:  # its deferred decodes: `grow`'s decode path (its last page is its own)
                    if was >= hash_at:
                        self._register_full_pages(s)
                        hash_at = s.hash_at
                    fill[last] = ps
                    tok += pos - was
                if pos >= hash_at:  # `grow`'s page-start path: the page it filled is registered
                    if s.lazy and pos == hash_at:  # (the chain's owner: unhashed)
                        marks[last] = s
                        s.ndef += 1
                        s.hash_at = pos + ps if uncapped or pos // ps < s.cache_pages else _NEVER
                    else:
                        s.length = pos
                        self._register_full_pages(s)
                if free:  # `_take_pages(1, 1)`: the stack's top, a fresh id, or the policy's victim
                    pid = free.pop()
                elif self._fresh:
                    pid = num_pages - self._fresh
                    self._fresh -= 1
                    if pid == len(ref):
                        self._grow_lists()
                elif evict and not lru.dead:  # `_take_pages(1, 1)`'s eviction, inlined
                    pid = lru.q[lru.head]
                    lru.head += 1
                    lru.n -= 1
                    h = marks[pid]
                    if h.__class__ is _Seq:  # (`_drop_victim` of a page registered lazily, inlined; its
                        left = h.ndef - 1  # mark stays, a leftover that means none: `_take_pages`)
                        h.ndef = left
                        if not left:
                            self._drop_lazy(h, 0)
                    else:
                        self._drop_victim(pid)
                else:
                    pid = self._take_pages(1, 1)[0]
                ref[pid] = 1
                fill[pid] = 1
                pages.append(pid)
                s.length = pos + 1
                res = ps - 1 if pos + ps < s.kv_len else s.kv_len - pos - 1  # (_set_reserved)
                rsv += res - s.reserved
                s.reserved = res
                tok += 1
            if odd is not None:  # (their next page starts, within page_size steps)
                for i in odd:
                    takers.remove(i)  # (the step's list, out of `at`: it moves on with the others)
                    n = t + 1 + (-held[i] % ps)
                    lst = at.get(n)
                    if lst is None:
                        at[n] = [i]
                    else:
                        lst.append(i)
                        lst.sort()
            if takers:
                lst = at.get(t + ps)
                if lst is None:
                    at[t + ps] = takers
                else:
                    lst += takers
                    lst.sort()
            deferred += d - nt
            if not evict and guard is not None:  # (the step cut the waiting match, as the guard said)
                guard.look()
                evict = plain
            if took:  # (a page-taking step right after another: a stretch of one)
                stretches.append((k0, 1, token, reserved, 0, internal, 0, cached, nfree))
            token, reserved = tok + deferred, rsv - deferred
            nlru = lru.n if page_lru else len(lru)
            navail = len(free) + self._fresh
            cached, nfree = nlru * ps, navail * ps
            internal = capacity - cached - nfree - token - reserved  # (external fragmentation: none in a paged pool)
            took = True
            t += 1
            if t >= stop:
                break
        if took:
            stretches.append((k0, 1, token, reserved, 0, internal, 0, cached, nfree))
        self._token, self._reserved = tok, rsv
        if t == j:  # (step j's takers could not be served: nothing changed)
            return None
        return t - j, token, reserved, internal, cached, nfree, deferred

    def still_refused(self, rid: RequestId, tokens, num_prompt: int, max_new: int) -> bool:
        """Whether `admit(rid, tokens, _, num_prompt, max_new)` would refuse now: its decision
        (no host tier: `guards_refusal`), the match retried and, where refused, indexed, as
        admit does; nothing else changes. Mutates only the waiting match. Without prefix caching
        (no host tier: `refusal_outlasts_free_takes`): admit's decision, no match. Pure then."""
        ps = self.page_size
        if not self._rare.prefix_caching:  # (admit: no hits, length min(max_new, num_prompt))
            return -(-(max_new if max_new < num_prompt else num_prompt) // ps) > self._available()
        memo = self._cached_prefix(rid, tokens, (num_prompt - 1) // ps)
        cached = len(memo.hits) * ps
        rest = num_prompt - cached
        need = -(-(cached + (max_new if max_new < rest else rest)) // ps) - len(memo.hits)
        if need > self._available() - memo.cached:
            self._index(memo)
            return True
        return False

    def _safe_victims(self, memo: _Match, cap: int) -> tuple[int, bool]:
        """How many of the next evictions (plain LRU: its first live entries, in order) take
        none of the waiting match's cached hits: (n, True) where that is exact (the entry after
        them is a hit, or every evictable page is spared: then n is huge), else (cap, False)
        (the first cap spare them; more were not looked at). O(entries walked). Pure."""
        hits, index = memo.hits, memo.index  # (the hits: `index`, and those past it, one owner's: `_index`)
        lazy = memo.nidx < len(hits) and self._hash[hits[-1]].gone  # (those past it are cached: its owner left)
        lru = self._lru
        q, x, dead = lru.q, lru.head, lru.dead
        if not dead:  # (no stale entry: the victims are q[head:], looked at by one slice)
            window = q[x:x + cap]
            n = len(window)
            if not index.isdisjoint(window):
                n = min(map(window.index, index.intersection(window)))
            if lazy:  # (an owner that left has its pages registered lazily in one run of the LRU, tail
                try:  # first: the first of the match's hits among them is its last hit)
                    at = window.index(hits[-1])
                    if at < n:
                        n = at
                except ValueError:
                    pass
            if n < len(window):
                return n, True
            return (cap, False) if n == cap else (1 << 62, True)
        rest = set(hits[memo.nidx:]) if lazy else ()
        n = 0
        for key in islice(lru.live(), cap):
            if key in index or key in rest:
                return n, True
            n += 1
        return (cap, False) if n == cap else (1 << 62, True)

    def _cut_refused(self, memo: _Match, e: int, nt: int, prompt: int, budget: int) -> int | None:
        """A quiet step takes nt pages, the last e by eviction (plain LRU: its first e live
        entries), and some of those are the waiting match's hits: where the request is still
        refused after the step (admit's decision, with the match cut at the first hit evicted:
        `_cut`), the number of hits left, else None. `prompt`: its num_prompt; `budget`: the
        step's tokens left for it. O(e + hits). Pure."""
        hits, marks, lru = memo.hits, self._hash, self._lru
        index, nidx = memo.index, memo.nidx  # (the hits: `index`, and those past it, one owner's: `_index`)
        owner = marks[hits[-1]] if nidx < len(hits) else None
        cut = len(hits)
        # (the owner's pages among the victims: its pages registered lazily, one run of the LRU, tail
        # first, so the k-th is mostly its page top - k; a hit where the match reaches it, at that
        # position: the match's hits from nidx on are the owner's pages at their own positions, those
        # before it are indexed; a guess that is not its page there is looked up, as before)
        if owner is not None:
            opages, k = owner.pages, len(owner.hashes) + owner.ndef - 1
        for key in islice(lru.live(), e):  # the e victims
            if key in index:
                i = len(hits) - 1 if hits[-1] == key else hits.index(key)  # (mostly its last: `_cut_hit`)
            elif owner is not None and marks[key] is owner:  # (one of the owner's pages: a hit if the match has it)
                if nidx <= k < len(opages) and opages[k] == key and (k >= len(hits) or hits[k] == key):
                    i, k = k, k - 1
                    if i >= len(hits):
                        continue
                else:
                    try:
                        i = hits.index(key, nidx)
                    except ValueError:
                        continue
            else:
                continue
            if i < cut:
                cut = i
        if cut == len(hits):
            return None  # (none is a hit: the caller looked wrong)
        return self._refused_cut(memo, cut, nt, prompt, budget)

    def _refused_cut(self, memo: _Match, cut: int, nt: int, prompt: int, budget: int) -> int | None:
        """`_cut_refused`'s decision once the first hit evicted is known: `cut` where admit would
        still refuse the waiting match cut there (after a step that takes nt pages), else None.
        O(hits). Pure."""
        hits, ps, ref, marks = memo.hits, self.page_size, self._ref, self._hash
        gone = 0  # its cached hits cut (`_cut`: ref 0, or registered lazily by an owner that left)
        for pid in hits[cut:]:
            if ref[pid] == 0:
                gone += 1
            else:
                h = marks[pid]
                if h.__class__ is _Seq and h.gone:
                    gone += 1
        need = -(-budget // ps)  # admit's need with `cut` hits: pages_for(cut * ps + min(budget, prompt - cut * ps)) - cut
        rest = -(-prompt // ps) - cut
        if rest < need:
            need = rest
        available = len(self._free) + self._fresh + self._lru.n - nt
        return cut if need > available - (memo.cached - gone) else None

    def release(self, rid) -> None:
        seq = self._seqs.pop(rid)
        seq.gone = True
        rare = self._rare
        if rare.tracks:
            self._lru.releasing(rid)
        if rare.prefix_caching and seq.length >= seq.hash_at:
            self._register_full_pages(seq)
        self._reserved -= seq.reserved
        if self._solo:  # every page is the request's own, never hashed: all free, in _unref_pages' order
            # (their fills sum to its length: each of its positions written once into its own pages,
            # none shared or copied; their `_ref` is not written: a free page's is not read, `_true_refs`;
            # none is shared: no `_after_unshare`)
            self._token -= seq.length
            self._free.fromlist(seq.pages[::-1])
            return
        if seq.lazy:  # (no page of it is shared: no `_after_unshare`; its own pages keep `_ref` 1)
            self._release_owner(seq)
            return
        elif rare.dedup_touch:
            self._unref_touching(seq)
        else:
            self._unref_pages(reversed(seq.pages))  # the tail first: it is the least likely to be reused
        if seq.length % self.page_size:
            self._after_unshare(seq.pages[-1])

    def _room_scheduled(self, rid, length: int) -> int:
        """`room` with `scheduled` visibility: a grow that completes a page registers it (it
        becomes hittable in that very step), so a request's room ends before the decode that
        writes its page's last slot as well as at a page start: a quiet run makes that decode's
        grow in its own step, in running order, as stepping does, and the order in which
        requests register equal pages (which of them the table keeps, and so which is cached
        or freed when they leave) stays stepping's. Pure. O(1)."""
        rem = length % self.page_size
        if not rem or self._seqs[rid].hash_at is _NEVER:
            return -length % self.page_size
        return -(length + 1) % self.page_size

    @property
    def refusal_outlasts_free_takes(self) -> bool:
        """Without prefix caching (a decode registers no page that could lengthen a waiting
        request's match) and a host tier, a refused request needs more pages than are free, and a
        free page taken only lowers that. Pure."""
        return not self._rare.prefix_caching and self._host is None

    @property
    def guards_refusal(self) -> bool:
        """Whether `quiet_pages` may run page-taking steps behind a refused waiting request
        with prefix caching (its `head`: it checks before each step that the refusal lasts):
        lazy registration (plain LRU, no host tier, no dedup_touch, no fork) and `computed`
        visibility. Pure."""
        return self._lazy and not self._scheduled

    @property
    def grows_merge(self) -> bool:
        """Whether grow(a) then grow(b) leaves the pool as grow(a + b) does: without prefix
        caching (no page registered at a grow) and before any fork (no shared page to copy). Pure."""
        return self._solo

    def fork(self, parent, child, child_tokens, child_kv_len) -> bool:
        src = self._seqs[parent]
        self._solo = False  # pages are shared from now on: releases go page by page
        if self._lazy:  # shared pages: every page hashed from now on (an owner's pages are its own)
            self._end_lazy()
        for pid in src.pages:
            self._ref[pid] += 1
        self._seqs[child] = _Seq(tokens=child_tokens, kv_len=child_kv_len, pages=list(src.pages),
                                 length=src.length, hashes=list(src.hashes), hash_at=src.hash_at,
                                 cache_pages=src.cache_pages)
        self._set_reserved(src)
        self._set_reserved(self._seqs[child])
        return True

    def evict(self, num_slots) -> int:
        freed = 0
        while freed < num_slots and self._lru:
            self._free.append(self._evict_one())  # the policy's victim first (LRU: least recent)
            freed += self.page_size
        return freed

    def slot_states(self, waiting_kv_len: int | None) -> SlotStates:
        ps, token, reserved = self.page_size, self._token, self._reserved
        cached = (self._lru.n if self._page_lru else len(self._lru)) * ps
        free = (len(self._free) + self._fresh) * ps
        # SlotStates(token, reserved, internal, external, cached, free) without its Python __new__
        return _new_tuple(SlotStates, (token, reserved, self.num_pages * ps - cached - free - token - reserved, 0,
                                       cached, free))

    def check_invariants(self) -> None:
        n, ps = self.num_pages - self._fresh, self.page_size  # pages >= n are fresh: free, never handed out
        size = len(self._ref)
        if not (len(self._fill) == len(self._hash) == len(self._stored_ids) == size and n <= size <= self.num_pages):
            raise InvariantError(f"per-page lists of {size} items for {n} pages handed out")
        if any(self._ref[n:]) or any(self._fill[n:]) or any(h is not None for h in self._hash[n:]):
            raise InvariantError("a page never handed out has a reference, a fill or a hash")
        owners = [0] * n
        for seq in self._seqs.values():
            if len(seq.pages) != self.pages_for(seq.length):
                raise InvariantError(f"request holds {len(seq.pages)} pages for {seq.length} tokens")
            if len(set(seq.pages)) != len(seq.pages):
                raise InvariantError("a request holds one page twice")
            for pid in seq.pages:
                owners[pid] += 1
        free, lru = set(self._free), set(self._lru)
        if len(lru) != len(self._lru):
            raise InvariantError("the eviction policy holds a page twice")
        try:
            self._lru.check()
        except AssertionError as e:
            raise InvariantError(f"eviction policy {self.eviction}: {e}") from None
        if len(free) != len(self._free) or free & lru or any(p >= n for p in free | lru):
            raise InvariantError("a page is twice in the free list, both free and cached, or fresh")
        refs, marks = self._true_refs(), self._marks()
        for pid in range(n):
            if owners[pid] != refs[pid]:
                raise InvariantError(f"page {pid}: ref {refs[pid]} but {owners[pid]} owners")
            state = (pid in free) + (pid in lru) + (owners[pid] > 0)
            if state != 1:
                raise InvariantError(f"page {pid} is in {state} states")
            if (pid in lru) and (self._hash[pid] is None or self._fill[pid] != ps):
                raise InvariantError(f"cached page {pid} has no hash or is not full")  # (`_take_pages` relies on it)
            if pid in free and marks[pid] is not None:
                raise InvariantError(f"free page {pid} still hashed")
            h = self._hash[pid]
            if (h is None or h.__class__ is _Seq) != (self._stored_ids[pid] is None):
                raise InvariantError(f"page {pid}: hash and stored ids disagree")
        for h, pid in self._table.items():
            if self._hash[pid] != h:
                raise InvariantError(f"hash table points at page {pid} which holds another hash")
        memo = self._hit_memo
        if memo is not None:  # the kept match, brought up to date as a retry would, equals a match from scratch
            self._index(self._cached_prefix(memo.rid, memo.tokens, memo.num_full))
            owner = marks[memo.hits[-1]] if memo.hits else None
            lazy_from = len(owner.hashes) if owner.__class__ is _Seq else len(memo.hits)
            fresh = self._cached_prefix.__func__(_Scratch(self), memo.rid, memo.tokens, memo.num_full)
            cached = sum(1 for p in memo.hits if refs[p] == 0)
            if (fresh.hits, fresh.cached) != (memo.hits, memo.cached) or memo.index != set(
                    memo.hits[:lazy_from]) or memo.nidx != lazy_from:
                raise InvariantError(f"kept match of request {memo.rid}: {len(memo.hits)} hits, {memo.cached} "
                                     f"cached; from scratch {len(fresh.hits)} hits, {cached} cached")
        token = sum(self._fill[p] for p in range(n) if owners[p])
        reserved = 0
        for seq in self._seqs.values():
            for i, pid in enumerate(seq.pages):
                expect = min(ps, seq.length - i * ps)
                if self._fill[pid] != expect:
                    raise InvariantError(f"page {pid} fill {self._fill[pid]}, request wrote {expect}")
            done = len(seq.hashes) if not seq.lazy else (
                seq.cache_pages if seq.hash_at == _NEVER else seq.hash_at // ps - 1)  # pages registered
            expect_at = (done + 1) * ps if done < seq.cache_pages else _NEVER
            if seq.hash_at != expect_at or done > seq.length // ps:
                raise InvariantError(f"request: {done} pages registered, hash_at {seq.hash_at}")
            last_shared = seq.length % ps and self._ref[seq.pages[-1]] > 1
            expect = 0 if last_shared else min(seq.kv_len, len(seq.pages) * ps) - seq.length
            if seq.reserved != expect:  # (grow's decode path relies on each request's share being exact)
                raise InvariantError(f"request reserves {seq.reserved} slots, recount {expect}")
            reserved += expect
        if (token, reserved) != (self._token, self._reserved):
            raise InvariantError(f"counters (token {self._token}, reserved {self._reserved}) != "
                                 f"recount ({token}, {reserved})")
        states = self.slot_states(None)
        if states.total != self.capacity or min(states) < 0:
            raise InvariantError(f"slot states {states} do not sum to capacity {self.capacity}")
        self._check_lazy(n)
        self._check_host()

    def _check_host(self) -> None:
        """Host tier: its maps agree, every host page is free or holds one hash, the policy holds
        exactly the host pages with content (none pinned between calls), and no hash is cached in
        both tiers (a page has one owner tier)."""
        host, hosted, host_table = self._host, self._rare.host_hash, self._rare.host_table
        if host is None:
            if host_table or hosted or self._rare.host_ids:
                raise InvariantError("host tier off but its tables hold pages")
            return
        if {hp: h for h, hp in host_table.items()} != hosted or hosted.keys() != self._rare.host_ids.keys():
            raise InvariantError("host tier: hash table, page hashes and stored ids disagree")
        try:
            host.check(set(hosted))
        except AssertionError as e:
            raise InvariantError(f"host tier: {e}") from None
        if set(host.policy) != set(host_table) or len(host.policy) != len(hosted):
            raise InvariantError(f"host policy holds {len(host.policy)} pages, the host tier {len(hosted)}")
        both = self._table.keys() & host_table.keys()
        if both:
            raise InvariantError(f"{len(both)} page hashes cached in both the GPU pool and the host tier")
        states = self.host_states()
        if states.total != self.host_tier_tokens or states.cached != len(hosted) * self.page_size:
            raise InvariantError(f"host states {states} != {len(hosted)} pages of {self.host_tier_tokens} slots")

    def host_states(self) -> HostStates:
        if self._host is None:
            return HostStates(0, 0)
        ps = self.page_size
        return HostStates(cached=len(self._rare.host_hash) * ps, free=self._host.free_pages() * ps)

    def take_host_moves(self) -> tuple[int, int]:
        return (0, 0) if self._host is None else self._host.take_moves()

    def take_host_copies(self) -> list[tuple[str, int, int]]:
        """The host tier's page copies since the last call (see HostPool.take_copies). Mutates."""
        return [] if self._host is None else self._host.take_copies()

    @property
    def label(self) -> str:
        if not self.prefix_caching:
            return f"{self.name}-{self.page_size}-nocache"
        return (f"{self.name}-{self.page_size}" + ("-sched" if self._scheduled else "")
                + ("-touch" if self.dedup_touch else "") + ("" if self.eviction == "lru" else f"-{self.eviction}")
                + ("" if self.cache_outputs else "-noout") + (f"-min{self.min_cache_len}" if self.min_cache_len else "")
                + (f"-host{self.host_tier_tokens}" if self._host else "")
                + (f"-{self.host_tier_eviction}" if self._host and self.host_tier_eviction != "lru" else ""))

    def summary(self) -> dict:
        host = self._host
        return {**super().summary(), "prefix_caching": self.prefix_caching,
                "cache_outputs": self.cache_outputs, "min_cache_len": self.min_cache_len,
                "prefix_visibility": self.prefix_visibility, "dedup_touch": self.dedup_touch,
                "eviction": self.eviction, "host_tier_tokens": self.host_tier_tokens,
                "host_tier_eviction": self.host_tier_eviction,
                "prefix_hit_tokens_gpu": self._rare.hits_gpu, "prefix_hit_tokens_host": self._rare.hits_host,
                "host_d2h_tokens": host.d2h_tokens if host else 0, "host_h2d_tokens": host.h2d_tokens if host else 0,
                "host_evicted_tokens": host.evicted_pages * self.page_size if host else 0}


class _HeadGuard:
    """`PagedStrategy.quiet_pages`' guard of a refused head (its docstring says why each check is
    exact): the head's kept match, the end of the page it misses first (`reg`; -1: the match is
    not the head's, so no step that takes a page runs) and how many of the next evictions are
    known to spare its cached hits (`safe`; `sure`: exactly, else at least)."""

    __slots__ = ("st", "memo", "prompt", "budget", "reg", "safe", "sure")

    def __init__(self, st: PagedStrategy, head: tuple[RequestId, int, int]) -> None:
        rid, self.prompt, self.budget = head
        self.st, self.memo = st, st._hit_memo
        if self.memo is None or self.memo.rid != rid:
            self.reg, self.safe, self.sure = -1, 0, True
        else:
            self.look()

    def look(self) -> None:
        """The match's first miss and the victims that spare its cached hits, looked up (again:
        after a step that cut it)."""
        memo, ps = self.memo, self.st.page_size
        self.reg = (len(memo.hits) + 1) * ps if len(memo.hits) < memo.num_full else _NEVER
        self.safe, self.sure = (1 << 62, True) if not memo.cached else (0, False)

    def take(self, takers: list[int], t: int, nt: int, avail: int, rids: list, comp: list[int]) -> bool | None:
        """Whether step t, whose nt takers (indices; request i writes position comp[i] + t) take
        `avail` free pages first and evict the rest, keeps the head refused: None if it may not
        (the step is left to the scheduler), True if it does and its evictions cut the match
        (they must go through `_evict_pages`; `look` after the step), False if it does and they
        spare it. Mutates only the guard."""
        st, ps, reg = self.st, self.st.page_size, self.reg
        if reg < 0:
            return None
        e = nt - avail
        miss = reg  # (the end of the page the match misses first after the step: page H's, or a cut's)
        if e > self.safe:
            if not self.sure:
                self.safe, self.sure = st._safe_victims(self.memo, max(e, 4 * self.safe, 256))
            if e > self.safe:  # (a) its evictions cut the match: the head's margin after the step, exactly
                cut = st._cut_refused(self.memo, e, nt, self.prompt, self.budget)
                if cut is None:
                    return None
                miss = (cut + 1) * ps
        seqs = st._seqs
        for i in takers:  # (b) no taker may register the page the match misses first (nor is one not at a
            s = seqs[rids[i]]  # page start: `grow`)
            pos = comp[i] + t
            if s.hash_at <= miss <= pos or len(s.pages) * ps != pos:
                return None
        if miss != reg:
            return True
        if e > 0:
            self.safe -= e
        return False
