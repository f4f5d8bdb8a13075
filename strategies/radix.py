"""RadixAttention (SGLang): a radix tree over token ids maps every cached prefix to its pages.

    root ── [sys prompt A: 0..99] ──┬── [question 1: 100..130] (locked by request 7)
                                    └── [question 2: 100..118] (unlocked leaf: evictable, LRU)

A running request locks the path from the root to the deepest node of its prefix (lock counts,
so shared ancestors stay locked while any user runs); tokens it computed beyond the tree are in
private pages. Its computed prompt is inserted into the tree after each prefill chunk, its output
at release; a part another request inserted first is deduplicated (its private pages freed, the
tree's pages used). Only unlocked leaves are evicted, least recently used first. Nodes hold whole
pages; page_size 1 is SGLang's default.

Costs: a match walks one node per edge and compares ids with numpy (O(prefix length)); an
insert walks on from the request's deepest node, over the new positions only (O(new ids), so a
prompt costs O(its length) whatever the chunk size; a request's page table is not kept: the
engines that read one get it from its path's nodes, O(depth + length)); lock/unlock walk to the
root (O(depth)) once per admission, fork and release, and an insert locks only the nodes it adds
to the request's path; eviction pops a heap of (last access, node) with lazy deletion, O(log n)
per evicted leaf; a private page comes from a stack of returned pages, then the next fresh id
(0, 1, 2, …: nothing is sized by the pool up front), O(1) (a decode's page is taken inline by
`grow`, with no further call). Page ids move in bulk: the free stack, each node's pages and each
request's private pages are int32 arrays (int64 past 2^31 pages), so an eviction, an insert or a
prefill chunk moves its pages by buffer copies, not one Python int each (an insert that stores
all of a request's private pages takes its array as the node's; a key is a view of the request's
ids where it is at least half of them). `decode_steps` makes
whole quiet decode steps at page_size 1 (each decode takes a page) in bulk: a run of steps hands
every request its column of pages by strided array slices, the same pages, in the same order, as
the per-token grows.

A request that waits for memory is matched once: when it is refused, its matched path (nodes
and where each ends, read from the matched node's parents in O(depth)) is kept in a memo and
kept exact incrementally. An eviction of its last node cuts it; a split of
one of its nodes puts the new upper node into it; a retry only looks for a child after its last
node (insertions extend it), and counts the evictable part of the path by bisection (locks are
monotone along a path: a locked node's ancestors are locked). So a retry is O(log depth) plus the
new part, not O(prefix). A retry before anything that could change its answer (the tree's
generation `_gen`, bumped by every insert, lock, unlock, split and eviction; the free pages,
which only shrink in between; its own token budget) is refused in O(1).

`prefix_visibility` (when computed prompt ids become hittable): `computed` (default; SGLang
inserts a prefill chunk into the tree after the chunk has run) or `scheduled` (as vLLM v1: in
the `admit`/`grow` that schedules the chunk, so a request admitted later in the same step hits
it). A duplicate that a request recomputed is freed at insert and the tree's original is locked
by the request and gets its access time at unlock: the "touch" that paged's `dedup_touch` adds.

`eviction`: which unlocked leaf is freed first, a policy of strategies/eviction/ (default lru:
by last access, SGLang's). Admission (both change what a later request can hit):
`cache_outputs` false inserts only the prompt the request was admitted with; `min_cache_len` > 0
inserts nothing of a request whose prompt is shorter (its pages stay private and are freed at
release). A fork still shares its parent's computed positions through the tree. `prefix_caching`
false (SGLang's `--disable-radix-cache`): no admission matches the tree and no request inserts
into it, so the pool is radix's token-level allocator alone (the baseline of a hit's saving at
radix's own page size).

Host tier (`host_tier_tokens` > 0, `host_tier_eviction`; strategies/host_tier.py), SGLang
HiCache's layout: an evicted leaf stays in the tree, its pages copied device → host (`pages` is
None, its host pages in `_host_pages`). Device nodes form a subtree at the root: a host node's
descendants are all on the host, and host nodes are never locked. The GPU policy holds the
unlocked device nodes without device children (without any child when the tier is off); the
host policy holds the host nodes without children, and the host drops whole nodes, leaves
first (a node too large for the whole host pool is dropped at once, with its host subtree). A
match walks device and host nodes alike: its host part is the path's suffix of host nodes, so
`cached_prefix_len` and the memo count host hits with no change. An admission loads its host
part (GPU pages by normal allocation, which may move other leaves to the host; its path is held
out of both policies meanwhile), copies host → device and frees the host pages at once (no
clean copy: a page's content is in one tier); an insert that meets a host node adopts the
request's own pages for it and frees the host copy. Off: one test per split, per evict call and
per unlocked inner node.
"""
from __future__ import annotations

import bisect
import itertools
from array import array
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from kvbench.strategies.base import (Admission, HostStates, InvariantError, PageId, RequestId, SlotStates,
                                     Strategy)
from kvbench.strategies.eviction import EvictionPolicy, make_policy
from kvbench.strategies.eviction.lru import TimedLRU
from kvbench.strategies.host_tier import HostPool, host_pages_for

_EMPTY = np.zeros(0, dtype=np.int32)


def _page_type(num_pages: int) -> tuple[str, np.dtype]:
    """The array typecode of a pool's lists of page ids, and numpy's dtype for their items: int32
    where every id fits (half the bytes of int64 to copy per page), else int64. Bulk moves to and
    from the free stack and numpy are buffer copies, not one Python int per page."""
    code = "i" if array("i").itemsize == 4 and num_pages <= 2 ** 31 else "q"
    return code, np.dtype(f"i{array(code).itemsize}")
_HOST_IDS = np.dtype(f"i{array('l').itemsize}")  # the host pool's free stack is an array("l")


def _host_ids(pages: np.ndarray) -> array:
    """Host page ids as the host pool's array("l") (its `give_many` extends its stack by a buffer
    copy; iterating it gives Python ints, as a list would)."""
    out = array("l")
    out.frombytes(pages.astype(_HOST_IDS).tobytes())
    return out


_REFUSED, _ADMITTED = Admission(False), Admission(True)  # (immutable answers, made once)
_new_states = tuple.__new__  # SlotStates from one tuple of its fields in order, without its keyword __new__


def _key(ids: np.ndarray, a: int, b: int) -> np.ndarray:
    """ids[a:b] as a tree node's key: a view where it is at least half of the array that it views
    (token arrays are never written after admission), else a copy (a short key does not keep a long
    request's ids alive: what keys hold stays under twice their own size)."""
    key, base = ids[a:b], ids.base
    if base is None:
        return key if 2 * (b - a) >= len(ids) else key.copy()
    return key if type(base) is np.ndarray and 2 * key.nbytes >= base.nbytes else key.copy()


def _unlocked(node: _Node) -> bool:
    return node.lock == 0


class _Node:
    __slots__ = ("key", "pages", "children", "parent", "lock", "access")

    def __init__(self, key: np.ndarray, pages: array | None, parent: _Node | None, access: int) -> None:
        self.key = key  # [n] token ids, n a multiple of page_size
        self.pages = pages  # [n // page_size] page ids, an int32/int64 array (None: on the host tier)
        self.children: dict[object, _Node] = {}
        self.parent = parent  # None for the root and for nodes removed from the tree
        self.lock = 0  # running requests whose prefix path passes through this node
        self.access = access  # logical time of the last match, insert or unlock


@dataclass(slots=True)
class _Seq:
    tokens: np.ndarray
    kv_len: int
    num_prompt: int
    node: _Node  # deepest tree node of its prefix (locked)
    tree_len: int  # leading positions stored in the tree
    private: array  # pages for positions >= tree_len
    length: int = 0
    reserved: int = 0
    cache_len: int = 1 << 62  # leading positions it may insert into the tree (admission options)
    path: tuple | None = None  # (node, its path's pages, an array): `page_table`'s part from the tree


@dataclass(slots=True)
class _Match:
    """The matched path of one waiting request, kept exact between its retries (module docstring)."""

    rid: RequestId
    tokens: np.ndarray
    limit: int  # ids it may match: tokens[:limit]
    nodes: list[_Node] = field(default_factory=list)  # the path below the root, in order
    ends: list[int] = field(default_factory=list)  # ends[i]: ids matched through nodes[i]
    partial: bool = False  # the last node matches only in part: nothing below it can match
    members: set[int] = field(default_factory=set)  # id() of the nodes
    # the refusal it was kept for: the tree's generation, the pages obtainable then, and its
    # num_prompt and max_new (while none of the tree, the locks or a larger room has changed, a
    # retry with the same or more new tokens is refused again)
    gen: int = -1
    room: int = 0
    num_prompt: int = 0
    max_new: int = 0


_VISIBILITY = ("computed", "scheduled")


class _Options(NamedTuple):
    """A radix pool's options, as the config gave them (eviction: the policy's name)."""

    prefix_visibility: str
    eviction: str
    cache_outputs: bool
    min_cache_len: int
    host_tier_tokens: int
    host_tier_eviction: str
    prefix_caching: bool


class RadixStrategy(Strategy):
    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 1,
                 name: str = "radix", prefix_visibility: str = "computed", eviction="lru",
                 cache_outputs: bool = True, min_cache_len: int = 0, host_tier_tokens: int = 0,
                 host_tier_eviction: str = "lru", prefix_caching: bool = True) -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name)
        self._tc, self._dt = _page_type(self.num_pages)  # page id arrays: typecode, numpy dtype
        host_pages = host_pages_for(host_tier_tokens, self.page_size, "radix")
        self._host = None  # off; else the host pool (its lru: by last access, as the GPU's)
        if host_pages and not prefix_caching:
            raise ValueError("radix host_tier_tokens > 0 needs prefix_caching: true (the host tier holds cached nodes)")
        if host_pages:
            self._host = HostPool(host_pages, self.page_size, host_tier_eviction,
                                  TimedLRU() if host_tier_eviction == "lru" else None)
        self._host_pages: dict[_Node, np.ndarray] = {}  # host-resident node → its host page ids
        self._loading: set[_Node] = set()  # host nodes an admission is loading (held out of the host policy)
        self._hits_gpu = self._hits_host = 0  # prompt tokens served from each tier, every admission
        if prefix_visibility not in _VISIBILITY:
            raise ValueError(f"radix prefix_visibility must be computed or scheduled, got {prefix_visibility!r}")
        self._scheduled = prefix_visibility == "scheduled"
        if int(min_cache_len) < 0:
            raise ValueError(f"radix min_cache_len must be >= 0, got {min_cache_len}")
        self._admission = not cache_outputs or int(min_cache_len) > 0 or not prefix_caching
        self._clock = itertools.count(1)
        self.root = _Node(_EMPTY, array(self._tc), None, 0)
        self._free = array(self._tc)  # a stack of returned page ids (most recent on top)
        self._fresh = self.num_pages  # the last _fresh page ids were never handed out (free)
        self._match_memo: _Match | None = None  # the waiting request's match (a memo: not state)
        # bumped by every change of the tree, its locks or its evictable part (insert, lock, unlock,
        # evict); between two bumps the free pages only shrink (a memo, not state)
        self._gen = 0
        # the unlocked leaves (the only evictable nodes, whatever the policy), in the policy's order;
        # lru: by last access (a heap: a parent that turns into a leaf keeps its old access time)
        policy = make_policy(eviction)
        self._leaves: EvictionPolicy = TimedLRU() if policy.name == "lru" else policy
        if self._leaves.offline:
            raise ValueError(f"radix eviction {self._leaves.name!r} is not supported (its keys are page hashes: paged only)")
        self._leaves.bind(self.num_pages)
        self._opts = _Options(prefix_visibility, self._leaves.name, bool(cache_outputs), int(min_cache_len),
                              host_pages * self.page_size,
                              self._host.eviction if self._host else str(host_tier_eviction), bool(prefix_caching))
        self._tracks = self._leaves.tracks_requests  # priority: told each admitted / released request
        self._seqs: dict[RequestId, _Seq] = {}
        self._protected = 0  # tokens in locked tree nodes
        self._evictable = 0  # tokens in unlocked tree nodes
        self._private_token = 0  # positions of requests outside the tree (their pages: `_private_page_count`)
        self._reserved = 0

    # options, read-only (kept in one object: CPython 3.11 keeps an instance's attributes in the
    # class's shared keys, where `self.x` is an indexed load, only up to 29 of them; a 30th turns
    # every attribute access on the hot paths into a dict lookup, ~100 instructions more each)
    prefix_visibility = property(attrgetter("_opts.prefix_visibility"))
    eviction = property(attrgetter("_opts.eviction"))
    cache_outputs = property(attrgetter("_opts.cache_outputs"))
    min_cache_len = property(attrgetter("_opts.min_cache_len"))
    host_tier_tokens = property(attrgetter("_opts.host_tier_tokens"))
    host_tier_eviction = property(attrgetter("_opts.host_tier_eviction"))
    prefix_caching = caches_prefixes = property(attrgetter("_opts.prefix_caching"))
    # a decode's grow inserts nothing (radix inserts at prefill and release), and a free page
    # taken evicts nothing: a refused request's match and path stay (without a host tier)
    refusal_outlasts_free_takes = property(lambda self: not self._opts.host_tier_tokens)

    # ---- tree -------------------------------------------------------------------------------
    def _child_key(self, ids: np.ndarray) -> object:
        return ids.item(0) if self.page_size == 1 else ids[: self.page_size].tobytes()

    def _common(self, a: np.ndarray, b: np.ndarray) -> int:
        """Length of the common prefix of a and b, rounded down to whole pages. Pure. (Up to 4k
        ids, equal prefixes, the usual hit, are told by one byte compare; else numpy's argmax of
        the differences stops at the first: no index array as flatnonzero makes.)"""
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        if n <= 4096 and a.tobytes() == b.tobytes():
            common = n
        else:
            neq = a != b
            common = int(neq.argmax())
            if not neq[common]:
                common = n
        return common - common % self.page_size

    def _match(self, ids: np.ndarray, node: _Node | None = None, pos: int = 0) -> tuple[_Node, int, int, int]:
        """Walk the longest cached prefix of `ids` without changing the tree. Pure. The walk
        starts at `node` (default the root), whose path holds ids[:pos].

        Returns (node, tokens matched inside node, tokens matched in all, evictable tokens on
        the matched path below the start)."""
        node = self.root if node is None else node
        evictable, inside = 0, 0
        while pos < len(ids):
            child = node.children.get(self._child_key(ids[pos:]))
            if child is None:
                break
            m = self._common(child.key, ids[pos:])
            if m == 0:
                break
            node, inside, pos = child, m, pos + m
            if child.lock == 0:
                evictable += m
            if m < len(child.key):
                break
        return node, inside, pos, evictable

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node` after `at` tokens; returns the new upper part (the object `node` stays the
        lower part: a path that ends at it still ends there). Accounting is unchanged."""
        ps = self.page_size
        self._gen += 1
        if node.pages is None:  # a host node: its host pages split the same way
            hp = self._host_pages[node]
            upper = _Node(node.key[:at], None, node.parent, node.access)
            self._host_pages[upper], self._host_pages[node] = hp[: at // ps], hp[at // ps:]
        else:
            upper = _Node(node.key[:at], node.pages[: at // ps], node.parent, node.access)
        upper.lock = node.lock
        upper.children[self._child_key(node.key[at:])] = node
        node.parent.children[self._child_key(node.key)] = upper
        node.key, node.parent = node.key[at:], upper
        if node.pages is not None:
            node.pages = node.pages[at // ps:]
        memo = self._match_memo
        if memo is not None and id(node) in memo.members:
            self._memo_split(memo, node, upper, at)
        return upper

    # ---- the waiting request's match --------------------------------------------------------
    def _memo_split(self, memo: _Match, lower: _Node, upper: _Node, at: int) -> None:
        """`lower` (on the kept path) was cut after `at` ids into `upper` + `lower`."""
        i = memo.nodes.index(lower)
        start = memo.ends[i - 1] if i else 0
        memo.members.add(id(upper))
        if i == len(memo.nodes) - 1 and memo.partial and memo.ends[i] - start <= at:
            memo.members.discard(id(lower))  # the match ends inside (or at the end of) upper
            memo.nodes[i] = upper
            memo.partial = memo.ends[i] - start < at
            return
        memo.nodes.insert(i, upper)
        memo.ends.insert(i, start + at)

    def _memo_cut(self, memo: _Match, node: _Node) -> None:
        """`node`, a leaf on the kept path (so its last node), was evicted."""
        i = len(memo.nodes) - 1 if memo.nodes[-1] is node else memo.nodes.index(node)  # (a leaf: the last)
        for gone in memo.nodes[i:]:
            memo.members.discard(id(gone))
        del memo.nodes[i:], memo.ends[i:]
        memo.partial = False

    def _kept(self, rid: RequestId, tokens: np.ndarray, limit: int, node: _Node, inside: int) -> _Match:
        """The memo of a match that ends `inside` ids into `node`. O(depth), once per refused request."""
        memo = _Match(rid, tokens, limit)
        while node is not self.root:
            memo.nodes.append(node)
            node = node.parent
        memo.nodes.reverse()
        end = 0
        for nd in memo.nodes:
            end += len(nd.key)
            memo.ends.append(end)
        if memo.nodes and inside < len(memo.nodes[-1].key):
            memo.partial = True
            memo.ends[-1] -= len(memo.nodes[-1].key) - inside
        memo.members = set(map(id, memo.nodes))
        return memo

    def _match_kept(self, memo: _Match) -> tuple[_Node, int, int, int]:
        """`_match(tokens[:limit])` through the memo of this request's last match, extended
        below its last node. Mutates only the memo."""
        nodes, ends, tokens, limit = memo.nodes, memo.ends, memo.tokens, memo.limit
        if not memo.partial:
            ids, pos = tokens[:limit], ends[-1] if ends else 0
            node = nodes[-1] if nodes else self.root
            while pos < limit:
                child = node.children.get(self._child_key(ids[pos:]))
                if child is None:
                    break
                m = self._common(child.key, ids[pos:])
                if m == 0:
                    break
                node, pos = child, pos + m
                nodes.append(child)
                ends.append(pos)
                memo.members.add(id(child))
                if m < len(child.key):
                    memo.partial = True
                    break
        if not nodes:
            return self.root, 0, 0, 0
        locked = bisect.bisect_left(nodes, True, key=_unlocked)  # locks are monotone along a path
        pos = ends[-1]
        inside = pos - (ends[-2] if len(ends) > 1 else 0)
        return nodes[-1], inside, pos, pos - (ends[locked - 1] if locked else 0)

    def _settle(self, node: _Node, inside: int) -> _Node:
        """Split `node` so that a match ending `inside` it ends exactly at a node."""
        return self._split(node, inside) if node is not self.root and inside < len(node.key) else node

    def _path_pages(self, node: _Node, above: _Node | None = None) -> array:
        """The page ids of the path from `above` (the root by default; an ancestor of `node`, its
        own pages left out) down to `node`, a new array. Pure."""
        above = self.root if above is None else above
        parts = []
        while node is not above:
            parts.append(node.pages)
            node = node.parent
        out = array(self._tc)
        for p in reversed(parts):
            out += p
        return out

    def _lock(self, node: _Node) -> None:
        now = next(self._clock)
        self._gen += 1
        root, taken = self.root, 0
        while node is not root:
            if node.lock == 0:
                taken += len(node.key)
                self._leaves.remove(node)  # (a no-op unless it was an unlocked leaf)
            node.lock += 1
            node.access = now
            node = node.parent
        if taken:
            self._evictable -= taken
            self._protected += taken

    def _unlock(self, node: _Node) -> None:
        now = next(self._clock)
        self._gen += 1
        root, host, freed = self.root, self._host, 0
        while node is not root:
            lock = node.lock = node.lock - 1
            node.access = now
            if lock == 0:
                freed += len(node.key)
                if not node.children or (host is not None and self._no_device_child(node)):
                    self._leaves.insert(node, now)  # `_push`: an unlocked leaf
            node = node.parent
        if freed:
            self._protected -= freed
            self._evictable += freed

    @staticmethod
    def _no_device_child(node: _Node) -> bool:
        """All of `node`'s children are on the host (host tier: it is then a device leaf). Pure."""
        return all(ch.pages is None for ch in node.children.values())

    def _push(self, node: _Node) -> None:
        """`node` became an unlocked leaf: evictable."""
        self._leaves.insert(node, node.access)

    def _insert(self, seq: _Seq, n: int) -> None:
        """Store the request's first `n` positions (computed, whole pages) in the tree, adopting its
        private pages where the tree lacks them and freeing them where the tree has them.

        The walk starts at the request's deepest node (its path holds ids[:tree_len]) and covers
        only the new positions; the nodes it adds to the request's path are locked. (The
        request's older path stays locked by it: a locked node's access time is rewritten when
        it is unlocked, so the walk from the root that this replaces changed no decision.)"""
        ps, private, ids, node, pos = self.page_size, seq.private, seq.tokens, seq.node, seq.tree_len
        key = ids.item(pos) if ps == 1 else ids[pos:pos + ps].tobytes()  # _child_key(ids[pos:n])
        children = node.children
        if key not in children and (n - pos) // ps == len(private):
            # (the usual insert: a new leaf below its node, holding all of its private pages: the
            # array itself; `_insert_walk`'s first step, which would be its last)
            leaf = _Node(_key(ids, pos, n), private, node, next(self._clock))
            self._gen += 1
            leaf.lock = 1
            children[key] = leaf
            seq.private = array(self._tc)
            moved = len(private)
            self._protected += n - pos
            self._private_token -= moved * ps
            seq.node, seq.tree_len = leaf, n
            return
        self._insert_walk(seq, n)

    def _insert_walk(self, seq: _Seq, n: int) -> None:
        """`_insert` the long way: node by node from the request's deepest node (splitting,
        deduplicating, adopting). Mutates."""
        ps, private, ids, node, pos = self.page_size, seq.private, seq.tokens, seq.node, seq.tree_len
        own_from = pos // ps
        now = next(self._clock)
        self._gen += 1
        added: list[_Node] = []
        moved = n // ps - own_from
        while pos < n:
            key = ids.item(pos) if ps == 1 else ids[pos:pos + ps].tobytes()  # _child_key(ids[pos:n])
            child = node.children.get(key)
            m = 0 if child is None else self._common(child.key, ids[pos:n])
            if m == 0:  # new leaf with the rest: adopt our pages (locked by us; never in the policy)
                if pos == seq.tree_len and moved == len(private):  # all of them: the array itself
                    pages, seq.private = private, array(self._tc)
                    moved = -1  # (nothing left to delete from the old array)
                else:
                    pages = private[pos // ps - own_from: moved]
                leaf = _Node(_key(ids, pos, n), pages, node, now)
                leaf.lock = 1
                node.children[key] = leaf
                self._protected += n - pos
                node, pos = leaf, n
                break
            if m < len(child.key):
                child = self._split(child, m)
            child.access = now
            if child.pages is None:  # on the host: our pages hold the same ids, the host copy goes
                self._adopt(child, private[pos // ps - own_from: (pos + m) // ps - own_from])
            else:
                self._free.extend(private[pos // ps - own_from: (pos + m) // ps - own_from])  # the tree had these
            added.append(child)
            node, pos = child, pos + m
        if moved < 0:
            moved = len(pages)
        else:
            del private[:moved]
        self._private_token -= moved * ps
        for nd in added:  # lock the new part of the path (the older part is ours already)
            if nd.lock == 0:
                self._evictable -= len(nd.key)
                self._protected += len(nd.key)
                self._leaves.remove(nd)
            nd.lock += 1
            nd.access = now
        seq.node, seq.tree_len = node, n

    # ---- memory -----------------------------------------------------------------------------
    def _take_pages(self, k: int, into: array | None = None) -> array:
        """k pages: returned ones first (most recent first), then fresh ids in order; appended to
        `into` (default: a new array), which is returned."""
        free = self._free
        pages = array(self._tc) if into is None else into
        if k == 1 and (free or self._fresh):  # the decode path
            if free:
                pages.append(free.pop())
            else:
                self._fresh -= 1
                pages.append(self.num_pages - self._fresh - 1)
            return pages
        have = len(free) + self._fresh
        if have < k:
            self.evict((k - have) * self.page_size)
        n = len(free)
        r = min(k, n)
        if r < 128:  # the order r pops would give: a reversed slice (it copies item by item)
            if r:
                pages += free[n - 1:n - r - 1:-1] if n > r else free[::-1]
        else:  # (reversed by numpy: fewer instructions per page, a fixed cost per call)
            pages.frombytes(np.frombuffer(free, dtype=self._dt)[n - 1:n - r - 1 if n > r else None:-1].tobytes())
        del free[n - r:]
        if r < k:
            first = self.num_pages - self._fresh
            pages.frombytes(np.arange(first, first + k - r, dtype=self._dt).tobytes())
            self._fresh -= k - r
        return pages

    def _extend(self, seq: _Seq, new_len: int, need: int | None = None) -> None:
        """Give `seq` room for `new_len` positions (`need`: the pages that takes, if known)."""
        if need is None:
            need = self.pages_for(new_len) - seq.tree_len // self.page_size - len(seq.private)
        if need == 1 and (self._free or self._fresh):  # the decode path: `_take_pages(1)` inlined
            free = self._free
            if free:
                pid = free.pop()
            else:
                self._fresh -= 1
                pid = self.num_pages - self._fresh - 1
            seq.private.append(pid)
        elif need > 0:
            self._take_pages(need, seq.private)
        self._private_token += new_len - seq.length
        seq.length = new_len
        cap = (seq.tree_len // self.page_size + len(seq.private)) * self.page_size
        new_res = min(seq.kv_len, cap) - new_len
        self._reserved += new_res - seq.reserved
        seq.reserved = new_res

    def _private_page_count(self) -> int:
        """Pages held by requests outside the tree. Pure, O(1): every page is free (returned or
        fresh), a device node's (protected + evictable ids, whole pages) or a request's, so no
        counter is kept (a decode's grow updates one counter less)."""
        return self.num_pages - self._fresh - len(self._free) - (self._protected + self._evictable) // self.page_size

    def _room(self) -> int:
        """Pages obtainable now: free (returned and fresh) plus evictable."""
        return len(self._free) + self._fresh + self._evictable // self.page_size

    def _insert_gain(self, seq: _Seq, n: int) -> int:
        """How much `_room()` grows if `_insert(seq, n)` runs now. Pure. Each of our pages whose
        ids the tree already holds is freed (+1), and an unlocked tree page we then lock leaves
        the evictable set (-1)."""
        _, _, matched, evictable = self._match(seq.tokens[:n], seq.node, seq.tree_len)  # the new part only
        return (matched - seq.tree_len - evictable) // self.page_size

    # ---- host tier ----------------------------------------------------------------------------
    def _host_len(self, node: _Node, inside: int) -> int:
        """Ids of a match ending `inside` ids into `node` that are on the host (the path's suffix
        of host nodes). Pure. O(host nodes on the path)."""
        if node is self.root or node.pages is not None:
            return 0
        n, node = inside, node.parent
        while node is not self.root and node.pages is None:
            n += len(node.key)
            node = node.parent
        return n

    def _adopt(self, node: _Node, pages: list[PageId]) -> None:
        """Host node `node` (its parent on the device) takes these device pages, which hold its
        ids already (a request computed them): its host copy is freed. It is an unlocked device
        node now (the caller locks it)."""
        host = self._host
        host.policy.remove(node)
        host.give_many(_host_ids(self._host_pages.pop(node)))
        node.pages = pages
        self._evictable += len(node.key)

    def _load_path(self, node: _Node) -> None:
        """Bring the host nodes at the end of the path to `node` back to the device: GPU pages by
        normal allocation (other leaves may move to the host meanwhile; the path is held out of
        both policies), a host → device copy per page, host pages freed. They end as unlocked
        device nodes (the caller locks the path)."""
        host, ps, chain = self._host, self.page_size, []
        self._gen += 1
        while node is not self.root and node.pages is None:
            chain.append(node)
            node = node.parent
        chain.reverse()
        end = node  # the device end of the path: neither evicted nor pushed while we allocate
        if end is not self.root:
            self._leaves.remove(end)
            end.lock += 1  # (a hold, not a request's lock: no accounting, undone below)
        self._loading = set(chain)
        for nd in chain:
            host.policy.remove(nd)
        pages = self._take_pages(sum(len(nd.key) for nd in chain) // ps)  # (they go to the tree)
        self._loading = set()
        if end is not self.root:
            end.lock -= 1
        at = 0
        for nd in chain:
            hp = self._host_pages.pop(nd).tolist()
            got = pages[at:at + len(hp)]
            at += len(hp)
            host.h2d_many(hp, got)
            host.give_many(hp)
            nd.pages = array(self._tc)
            nd.pages.extend(got)
            self._evictable += len(nd.key)

    def _host_room(self, k: int) -> bool:
        """Make `k` host pages free by dropping host leaves in the host policy's order. False
        when it cannot: the host pool is smaller than k pages (nothing dropped), or what is left
        is held by a loading admission. Mutates."""
        host = self._host
        if k > host.num_pages:
            return False
        while host.free_pages() < k:
            if not len(host.policy):
                return False
            host.evicted_pages += self._remove_subtree(host.policy.victim())
        return True

    def _detach(self, node: _Node) -> None:
        """Take `node` (and its subtree) out of its parent's children; a waiting request's match
        through it is cut there."""
        del node.parent.children[self._child_key(node.key)]
        node.parent = None
        memo = self._match_memo
        if memo is not None and id(node) in memo.members:
            self._memo_cut(memo, node)

    def _remove_subtree(self, node: _Node) -> int:
        """Take `node` and its (host) descendants out of the tree, freeing their host pages
        (`node`'s device pages, if any, are the caller's). Its parent may become a host leaf.
        Returns the host pages freed."""
        parent = node.parent
        self._detach(node)
        host, stack, freed = self._host, [node], 0
        while stack:
            nd = stack.pop()
            stack.extend(nd.children.values())
            hp = self._host_pages.pop(nd, None)
            if hp is not None:
                host.policy.remove(nd)
                host.give_many(_host_ids(hp))
                freed += len(hp)
        if (parent is not self.root and parent.pages is None and not parent.children
                and parent not in self._loading):
            host.policy.insert(parent, parent.access)
        return freed

    def _evict_to_host(self, num_slots: int) -> int:
        """`evict` with a host tier: each victim leaf's pages are copied to the host (room made
        by the host policy) and the node stays in the tree; a node larger than the whole host
        pool is dropped. Its parent may turn into a device leaf. Returns the slots freed."""
        freed, leaves, host = 0, self._leaves, self._host
        self._gen += 1
        while freed < num_slots and leaves:
            node = leaves.victim()
            parent, pages = node.parent, node.pages
            self._free.extend(pages)
            self._evictable -= len(node.key)
            freed += len(node.key)
            if self._host_room(len(pages)):
                hps = host.take_many(len(pages))
                host.d2h_many(pages, hps)
                node.pages = None
                self._host_pages[node] = np.asarray(hps, dtype=np.int32)
                if not node.children:
                    host.policy.insert(node, node.access)
            else:  # dropped, and the host subtree below it
                host.evicted_pages += self._remove_subtree(node)
            if (parent is not self.root and parent.lock == 0 and parent.pages is not None
                    and self._no_device_child(parent)):
                self._push(parent)
        return freed

    def host_states(self) -> HostStates:
        if self._host is None:
            return HostStates(0, 0)
        ps = self.page_size
        return HostStates(cached=(self._host.num_pages - self._host.free_pages()) * ps,
                          free=self._host.free_pages() * ps)

    def take_host_moves(self) -> tuple[int, int]:
        return (0, 0) if self._host is None else self._host.take_moves()

    def take_host_copies(self) -> list[tuple[str, int, int]]:
        """The host tier's page copies since the last call (see HostPool.take_copies). Mutates."""
        return [] if self._host is None else self._host.take_copies()

    # ---- contract ---------------------------------------------------------------------------
    def page_table(self, rid: RequestId) -> np.ndarray:
        # (the path's pages are kept with the request's deepest node, which only moves down the
        # tree (`_insert`): then only the nodes below the old one are read. A locked path's pages
        # do not change, and a split keeps the lower part as the same object)
        seq = self._seqs[rid]
        node, kept = seq.node, seq.path
        if kept is None:
            kept = seq.path = (node, self._path_pages(node))
        elif kept[0] is not node:
            kept = seq.path = (node, kept[1] + self._path_pages(node, kept[0]))
        table = np.frombuffer(kept[1] + seq.private, dtype=self._dt)  # (a view of a new array: its own)
        return table if self._tc == "i" else table.astype(np.int32)

    def cached_prefix_len(self, tokens, num_prompt) -> int:
        return self._match(tokens[:(num_prompt - 1) // self.page_size * self.page_size])[2]  # a walk: pure

    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        ps, root = self.page_size, self.root
        # leave at least one position to compute (without prefix caching: match nothing)
        limit = (num_prompt - 1) // ps * ps if self._opts.prefix_caching else 0
        memo = self._match_memo
        if memo is not None and memo.rid == rid and memo.tokens is tokens and memo.limit == limit:
            if (memo.gen == self._gen and memo.num_prompt == num_prompt and max_new >= memo.max_new
                    and len(self._free) + self._fresh <= memo.room):
                return _REFUSED  # nothing it could hit or evict has changed and no page was freed
            node, inside, cached, path_evictable = self._match_kept(memo)
        else:
            memo = None
            if limit and root.children.get(tokens.item(0) if ps == 1 else tokens[:ps].tobytes()) is not None:
                node, inside, cached, path_evictable = self._match(tokens[:limit])
            else:  # no cached prefix starts with its first page: a miss (`_match`, without the walk)
                node, inside, cached, path_evictable = root, 0, 0, 0
        host_tokens = 0
        if self._host is not None:  # the match's host part needs GPU pages and is not evictable
            host_tokens = self._host_len(node, inside)
            path_evictable -= host_tokens
        length = cached + min(max_new, num_prompt - cached)
        need = -(-length // ps) - (cached - host_tokens) // ps
        free = len(self._free) + self._fresh
        if need > free + self._evictable // ps - path_evictable // ps:  # _room(), less the path it would lock
            if memo is None:  # refused: keep the match for the retry
                memo = self._match_memo = self._kept(rid, tokens, limit, node, inside)
            memo.gen, memo.room, memo.num_prompt, memo.max_new = self._gen, free, num_prompt, max_new
            return _REFUSED
        self._match_memo = None
        if node is root:
            next(self._clock)  # (`_lock` of the root: nothing to lock)
            self._gen += 1
        else:
            if inside < len(node.key):
                node = self._split(node, inside)
            if host_tokens:
                self._load_path(node)
            self._lock(node)
        private = array(self._tc)
        seq = _Seq(tokens, kv_len, num_prompt, node, cached, private, cached)
        if self._admission:  # insert only the prompt, or nothing of a short request
            seq.cache_len = (0 if num_prompt < self.min_cache_len or not self._opts.prefix_caching
                             else kv_len if self.cache_outputs else num_prompt)
        self._seqs[rid] = seq
        if host_tokens:
            self._extend(seq, length)
        else:  # (`_extend` with `need`, inlined: it holds no page yet)
            if need > 0:
                self._take_pages(need, private)
            self._private_token += length - cached
            seq.length = length
            res = min(kv_len, (cached // ps + len(private)) * ps) - length
            self._reserved += res
            seq.reserved = res
        if self._scheduled:
            self._insert_scheduled(seq)
        if self._tracks:
            self._leaves.request(rid)
        self._hits_gpu += cached - host_tokens
        if host_tokens:
            self._hits_host += host_tokens
            return Admission(True, cached, host_tokens)
        return Admission(True, cached) if cached else _ADMITTED

    def _insert_scheduled(self, seq: _Seq) -> None:
        """prefix_visibility=scheduled: the prompt's full pages are hittable once scheduled."""
        done = min(seq.length, seq.num_prompt, seq.cache_len) // self.page_size * self.page_size
        if done > seq.tree_len:
            self._insert(seq, done)

    def grow(self, rid, num_tokens) -> bool:
        seq, ps = self._seqs[rid], self.page_size
        length = seq.length
        if num_tokens == 1 and seq.num_prompt < length < seq.kv_len:  # a decode: nothing to insert
            free = self._free
            if ps == 1 and free:  # (page_size 1: every decode takes a page; the stack's top)
                seq.private.append(free.pop())
                seq.length = length + 1
                self._private_token += 1
                return True
            if length % ps:  # inside its last page: a reserved slot becomes a token
                seq.length = length + 1
                seq.reserved -= 1
                self._reserved -= 1
                self._private_token += 1
                return True
            if free:  # one page, from the free stack or fresh (else the general path evicts)
                pid = free.pop()
            elif self._fresh:
                self._fresh -= 1
                pid = self.num_pages - self._fresh - 1
            else:
                pid = -1
            if pid >= 0:
                seq.private.append(pid)
                seq.length = length + 1
                self._private_token += 1
                if ps != 1:
                    res = min(seq.kv_len, length + ps) - length - 1
                    self._reserved += res - seq.reserved
                    seq.reserved = res
                return True
        new_len = length + num_tokens
        if new_len > seq.kv_len:
            raise ValueError(f"request {rid} grows past its final length {seq.kv_len}")
        done = length // ps * ps if length <= seq.num_prompt and not self._scheduled else 0  # prefill: cache the computed chunk
        if self._admission:
            done = min(seq.cache_len, done) // ps * ps
        need = -(-new_len // ps) - seq.tree_len // ps - len(seq.private)
        if need > 0:
            room = len(self._free) + self._fresh + self._evictable // ps  # _room()
            if need > room and (done <= seq.tree_len or need > room + self._insert_gain(seq, done)):
                return False  # checked before inserting: a grow that answers no changes nothing
        if done > seq.tree_len:
            self._insert(seq, done)
            self._extend(seq, new_len)
        else:  # nothing inserted: `need` still holds
            self._extend(seq, new_len, need)
        if self._scheduled and seq.length - num_tokens < seq.num_prompt:
            self._insert_scheduled(seq)
        return True

    def decode_steps(self, rids: list[RequestId], k: int, cols: list[list[int]]) -> int:
        """Up to `k` decode steps of the running requests `rids` (page_size 1: each decode takes a
        page): step by step, `grow(rid, 1)` of each in this order, exactly. A step runs only
        where the free and cached slots could give each a page (the quiet-run rule of
        kvbench/quiet.py); with a host tier the steps end after one that moved pages to the
        host (the caller asks `take_host_moves`). The slot states after each step run are
        appended to `cols` (6 lists: token, reserved, internal, external, cached, free, as
        QuietRun.run keeps them; where `cols` is an `events.StateColumns`, m > 1 bulk steps that
        evict nothing go as one free-slope stretch of the first m - 1 into `cols.stretches` and a
        row of the last: no row per step); returns how many steps ran. Mutates as those grows do.

        Bulk: when every request is decoding (no host tier), a run of m steps takes its
        m * len(rids) pages at once in the order the one-page takes give them (the stack's top
        reversed, fresh ids in order, and where both are empty `evict(1)` and the stack's top
        again: `_pop_run`) and hands each request its column; the cached and free columns step
        at each eviction. A request just past its prefill (its first decode inserts its last
        chunk) joins the bulk steps where that insert only adds a leaf below its node: the insert
        is made first (`_settle_first_decodes`; no host tier). With a host tier, only runs that
        need no eviction go in bulk; in a step that must evict (or where a request is not
        decoding yet), the others pop their pages inline and only the one that evicts (or
        inserts) takes the per-token path (`grow`).
        O(m * requests) in C loops plus O(requests + evictions) in Python per run, against
        O(m * requests) Python calls."""
        if self.page_size != 1:
            raise ValueError(f"decode_steps needs page_size 1 (each decode takes a page), not {self.page_size}")
        sq = self._seqs
        seqs = list(map(sq.__getitem__, rids))
        d, done, free, host = len(seqs), 0, self._free, self._host
        if not d:
            for col, v in zip(cols, self.slot_states(None)):
                col += [v] * k
            return k
        kv_left, fresh = 1 << 62, None  # steps before one passes its final length; whether one is not decoding
        for s in seqs:  # (one loop: two comprehensions cost twice as much at a dozen requests)
            length = s.length
            if s.kv_len - length < kv_left:
                kv_left = s.kv_len - length
            if length <= s.num_prompt:
                fresh = True
        if fresh:  # requests not decoding yet (their next grow may insert: per token)
            fresh = [i for i, s in enumerate(seqs) if s.length <= s.num_prompt]
        decoding = fresh is None
        c_token, c_reserved, c_internal, c_external, c_cached, c_free = cols
        slopes = getattr(cols, "stretches", None)  # (events.StateColumns: steps as free-slope stretches)
        while done < k:
            avail = len(free) + self._fresh
            cached0 = self._evictable
            if avail + cached0 < d:
                break  # free + cached cannot give each a page: the step is not run
            if not decoding and kv_left > 0 and host is None:  # their inserts now, where the order holds
                fresh = self._settle_first_decodes(seqs, fresh)
                decoding = fresh is None
            if decoding and kv_left > 0 and host is None:
                # m whole steps, evicting a leaf wherever a page is wanted and none is free: free +
                # cached falls by d a step (an eviction moves slots from cached to free)
                m = min(k - done, (avail + cached0) // d, kv_left)
                n = m * d
                stack = len(free)
                evicted = None
                if n <= stack and n < 2048:  # from the stack's top, as n pops give it (no `pages` array made)
                    if m == 1:  # each its page (`_hand_out`, inlined)
                        pop = free.pop
                        for s in seqs:
                            s.private.append(pop())
                            s.length += 1
                    else:  # request i's pages, step by step: a strided slice of the stack, from its i-th page down
                        top, stop = stack - 1, stack - n - 1 if stack > n else None
                        for s in seqs:
                            s.private += free[top:stop:-d]
                            s.length += m
                            top -= 1
                        del free[stack - n:]
                else:
                    if n <= stack:  # the stack's top, in the order n pops give it (`_pop_run`, inlined)
                        pages = free[stack - 1: stack - n - 1: -1] if stack > n else free[::-1]
                        del free[stack - n:]
                    else:
                        evicted = [] if n > avail else None
                        pages = self._pop_run(n, evicted)
                    if m == 1:  # each its page (`_hand_out`, inlined)
                        for s, pid in zip(seqs, pages):
                            s.private.append(pid)
                            s.length += 1
                    elif n < 2048:  # request i's pages, step by step: a strided slice
                        i = 0
                        for s in seqs:
                            s.private += pages[i::d]
                            s.length += m
                            i += 1
                    else:
                        self._deal(seqs, pages, m)
                private_token = self._private_token = self._private_token + n
                kv_left -= m
                done += m
                token, reserved = self._protected + private_token, self._reserved  # (slot_states, page_size 1)
                internal = self.num_pages - len(free) - self._fresh - token - self._evictable - reserved
                if m == 1:
                    c_token.append(token)
                    c_reserved.append(reserved)
                    c_internal.append(internal)
                    c_external.append(0)
                    if not evicted:
                        c_cached.append(cached0)
                        c_free.append(avail - d)
                        continue
                elif not evicted and slopes is not None:  # (the common case) the first m - 1 as one stretch
                    slopes.append((len(c_token), 1 - m, token - (m - 1) * d, reserved, d, internal, 0, cached0,
                                   avail - d))
                    c_token.append(token)
                    c_reserved.append(reserved)
                    c_internal.append(internal)
                    c_external.append(0)
                    c_cached.append(cached0)
                    c_free.append(avail - m * d)
                    continue
                else:
                    c_token.extend(range(token - (m - 1) * d, token + 1, d))  # each step: d more tokens
                    c_reserved += [reserved] * m
                    c_internal += [internal] * m
                    c_external += [0] * m
                    if not evicted:  # (the common case)
                        c_cached += [cached0] * m
                        c_free.extend(range(avail - d, avail - (m + 1) * d, -d))
                        continue
                t, gone = 1, 0  # steps t.. have `gone` slots evicted so far
                for at, got in evicted:  # an eviction at take `at` counts from step at // d + 1 on
                    step = at // d + 1
                    if step > t:
                        c_cached += [cached0 - gone] * (step - t)
                        c_free.extend(range(avail + gone - t * d, avail + gone - step * d, -d))
                        t = step
                    gone += got
                c_cached += [cached0 - gone] * (m + 1 - t)
                c_free.extend(range(avail + gone - t * d, avail + gone - (m + 1) * d, -d))
                continue
            m = min(k - done, avail // d, kv_left) if decoding else 0
            if m:  # m whole steps from the stack and fresh ids: no eviction
                self._hand_out(seqs, m)
                kv_left -= m
                token, reserved, internal, external, cached, left = self.slot_states(None)
                c_token.extend(range(token - (m - 1) * d, token + 1, d))  # each step: d more tokens, d fewer free
                c_free.extend(range(left + (m - 1) * d, left - 1, -d))
                c_reserved += [reserved] * m
                c_internal += [internal] * m
                c_external += [external] * m
                c_cached += [cached] * m
                done += m
                continue
            moved = host.d2h_tokens if host is not None else 0
            every = decoding and kv_left > 0  # (else some grow may insert, or pass its final length)
            ahead = iter(fresh or ())  # (kv_left > 0: the requests not decoding are the only per-token ones)
            nxt = next(ahead, d)
            i = 0  # one step: runs of decoding requests pop their pages inline (while the stack and fresh
            while i < d:  # ids last); one that must evict, or is not decoding, takes the per-token path
                j, end = i, min(d, i + len(free) + self._fresh)
                if every:
                    j = end
                elif kv_left > 0:
                    while nxt < i:
                        nxt = next(ahead, d)
                    j = min(end, nxt)
                else:
                    while j < end and seqs[j].num_prompt < seqs[j].length < seqs[j].kv_len:
                        j += 1
                if j > i:
                    self._hand_out(seqs[i:j], 1)
                    i = j
                elif self.grow(rids[i], 1):
                    i += 1
                else:
                    raise RuntimeError(f"radix decode_steps: request {rids[i]} found no page although free + "
                                       f"cached slots could give each of {d} requests one")
            kv_left -= 1  # (each grew by one)
            if fresh is not None:
                fresh = [i for i in fresh if seqs[i].length <= seqs[i].num_prompt] or None
                decoding = fresh is None
            for col, v in zip(cols, self.slot_states(None)):
                col.append(v)
            done += 1
            if host is not None and host.d2h_tokens != moved:
                break
        return done

    def _settle_first_decodes(self, seqs: list[_Seq], fresh: list[int]) -> list[int] | None:
        """Make now the insert that the first decode `grow` of each request in `fresh` (indices
        into `seqs`, in running order; each holds its whole prompt) would make (its last prefill
        chunk, into the tree), in that order, while the insert only adds a leaf below the
        request's own node (no child there starts with its first new id: nothing split, no page
        of ours freed as a duplicate). Such an insert commutes with the other requests' page
        takes of the step and with its evictions (the leaf is locked, no other node changes), and
        the grow that follows takes one page as a decode does, so the request joins the bulk
        steps. Returns the requests left to the per-token path (the first that fails the test and
        every one after it; None when none is left). Mutates the tree as those grows would."""
        ps, scheduled, admission = self.page_size, self._scheduled, self._admission
        for at, i in enumerate(fresh):
            seq = seqs[i]
            length = seq.length
            if length != seq.num_prompt:
                return fresh[at:]
            done = 0 if scheduled else length // ps * ps  # (as `grow`)
            if admission:
                done = min(seq.cache_len, done) // ps * ps
            if done > seq.tree_len:
                ids, start = seq.tokens, seq.tree_len
                if (ids.item(start) if ps == 1 else ids[start:start + ps].tobytes()) in seq.node.children:  # (_child_key)
                    return fresh[at:]
                self._insert(seq, done)
        return None

    def _hand_out(self, seqs: list[_Seq], m: int, evicted: list[tuple[int, int]] | None = None) -> None:
        """m decode steps of `seqs` (each decoding, page_size 1): step by step, each in order takes a
        page as `grow(rid, 1)` would (`_pop_run`; the free stack and fresh ids hold them unless
        `evicted` collects the evictions). Mutates.

        Request i's pages are every len(seqs)-th of the run's pages from i: a strided array slice
        (C loops: numpy's fixed cost per call was most of a run this small), or a row of numpy's
        transpose in a large run."""
        d, free = len(seqs), self._free
        n = m * d
        if m == 1 and d <= 8 and len(free) + self._fresh >= d:  # a few pops: inline
            for s in seqs:
                if free:
                    s.private.append(free.pop())
                else:
                    self._fresh -= 1
                    s.private.append(self.num_pages - self._fresh - 1)
                s.length += 1
        else:
            pages = self._pop_run(n, evicted)
            if m == 1:
                for s, pid in zip(seqs, pages):
                    s.private.append(pid)
                    s.length += 1
            elif n < 2048:
                for i, s in enumerate(seqs):  # request i's pages, step by step
                    s.private += pages[i::d]
                    s.length += m
            else:
                self._deal(seqs, pages, m)
        self._private_token += n

    def _deal(self, seqs: list[_Seq], pages: array, m: int) -> None:
        """m steps' pages (`pages`: step by step, request by request) dealt out: request i gets
        every len(seqs)-th from i, and m more positions. Mutates the requests. (A strided slice
        copies item by item: numpy's transpose is cheaper from ~2k pages.)"""
        cols, w = np.frombuffer(pages, dtype=self._dt).reshape(m, len(seqs)).T.tobytes(), self._dt.itemsize * m
        for i, s in enumerate(seqs):
            s.private.frombytes(cols[i * w: i * w + w])
            s.length += m

    def _pop_run(self, n: int, evicted: list[tuple[int, int]] | None) -> array:
        """The next n pages in the order n one-page takes give them: the free stack's top (most
        recent first), then fresh ids in order, then (no host tier) as each one-page take does
        when both are empty: `evict(1)` (one leaf, its pages pushed on the stack) and the stack's
        top again. Each eviction is appended to `evicted` as (pages taken before it, slots it
        freed). Mutates the stack, fresh ids and tree; the caller gives the pages out."""
        free = self._free
        stack = len(free)
        r = min(n, stack)
        if r:
            pages = free[stack - 1: stack - r - 1: -1] if stack > r else free[::-1]
            del free[stack - r:]
        else:
            pages = array(self._tc)
        f = min(n - r, self._fresh)
        if f:
            first = self.num_pages - self._fresh
            pages.extend(range(first, first + f))
            self._fresh -= f
        while len(pages) < n:  # nothing free: a one-page take evicts (one leaf, page_size 1)
            at = len(pages)
            got = self.evict(1)
            if not got:
                raise RuntimeError(f"radix: {n - at} more pages wanted, nothing left to evict")
            evicted.append((at, got))
            stack = len(free)
            r = min(n - at, stack)
            pages += free[stack - 1: stack - r - 1: -1] if stack > r else free[::-1]
            del free[stack - r:]
        return pages

    def release(self, rid) -> None:
        seq, ps = self._seqs[rid], self.page_size
        if self._tracks:
            self._leaves.releasing(rid)
        done = min(seq.length, seq.cache_len) // ps * ps
        pos = seq.tree_len
        if done > pos:
            ids, node, private = seq.tokens, seq.node, seq.private
            key = ids.item(pos) if ps == 1 else ids[pos:pos + ps].tobytes()  # _child_key(ids[pos:done])
            if key not in node.children and (done - pos) // ps == len(private):
                # the usual release: `_insert` adds a leaf with all of its pages (locked by it) and
                # `_unlock` unlocks it at once (the leaf's ids go straight to evictable), in one walk
                del self._seqs[rid]
                next(self._clock)  # (`_insert`'s tick)
                now = next(self._clock)
                self._gen += 2
                leaf = _Node(_key(ids, pos, done), private, node, now)
                node.children[key] = leaf
                self._leaves.insert(leaf, now)  # `_push`: an unlocked leaf
                self._private_token -= seq.length - pos
                self._reserved -= seq.reserved
                root, freed = self.root, 0
                while node is not root:  # `_unlock` of its older path (none of it turns into a leaf)
                    lock = node.lock = node.lock - 1
                    node.access = now
                    if lock == 0:
                        freed += len(node.key)
                    node = node.parent
                self._protected -= freed
                self._evictable += freed + done - pos
                return
            self._insert(seq, done)
        del self._seqs[rid]
        tail = seq.private  # at most one partly filled page remains
        self._free.extend(tail)
        self._private_token -= seq.length - seq.tree_len
        self._reserved -= seq.reserved
        self._unlock(seq.node)

    def fork(self, parent, child, child_tokens, child_kv_len) -> bool:
        src, ps = self._seqs[parent], self.page_size
        done = src.length // ps * ps
        tail = src.length - done
        if tail and self._room() < 1:
            return False
        if done > src.tree_len:
            self._insert(src, done)
        self._lock(src.node)
        seq = _Seq(tokens=child_tokens, kv_len=child_kv_len, num_prompt=src.num_prompt,
                   node=src.node, tree_len=done, private=array(self._tc), length=done)
        self._seqs[child] = seq
        if tail:  # copy-on-write of the partly filled last page, at once
            self._extend(seq, src.length)
            self._copies.append((src.private[0], seq.private[0]))
        return True

    def evict(self, num_slots) -> int:
        if self._host is not None:
            return self._evict_to_host(num_slots)
        freed, leaves, free, root, ps = 0, self._leaves, self._free, self.root, self.page_size
        self._gen += 1
        left = len(leaves)  # (kept here: a victim leaves the policy, a parent pushed joins it)
        inline = self._match_memo is None  # (no waiting match to cut: `_detach`, inlined)
        while freed < num_slots and left:
            node = leaves.victim()  # an unlocked leaf (check_invariants: the policy holds exactly those)
            left -= 1
            parent, key = node.parent, node.key
            if inline:
                del parent.children[key.item(0) if ps == 1 else key[:ps].tobytes()]
                node.parent = None
            else:
                self._detach(node)
            free += node.pages
            freed += len(key)
            if parent is not root and not parent.children and parent.lock == 0:
                leaves.insert(parent, parent.access)  # `_push`: an unlocked leaf now
                left += 1
        self._evictable -= freed  # (every victim's ids were evictable)
        return freed

    def slot_states(self, waiting_kv_len: int | None) -> SlotStates:
        ps, protected, evictable = self.page_size, self._protected, self._evictable
        private_token, reserved, free = self._private_token, self._reserved, len(self._free) + self._fresh
        # (private pages * ps: the slots neither free nor in the tree; `_private_page_count`)
        return _new_states(SlotStates, (protected + private_token, reserved,
                                        (self.num_pages - free) * ps - protected - evictable - private_token - reserved,
                                        0, evictable, free * ps))

    def check_invariants(self) -> None:
        ps, owner = self.page_size, {}
        locks: dict[int, int] = {}
        for rid, seq in self._seqs.items():
            node = seq.node
            while node is not self.root:
                locks[id(node)] = locks.get(id(node), 0) + 1
                node = node.parent
            for pid in seq.private:
                if pid in owner:
                    raise InvariantError(f"page {pid} owned by {owner[pid]} and request {rid}")
                owner[pid] = f"request {rid}"
            if len(self._path_pages(seq.node)) * ps != seq.tree_len or not np.array_equal(
                    self._path_ids(seq.node), seq.tokens[: seq.tree_len]):
                raise InvariantError(f"request {rid}: tree path does not hold its first ids")
            if seq.tree_len // ps + len(seq.private) != self.pages_for(seq.length):
                raise InvariantError(f"request {rid}: {len(seq.private)} private pages for {seq.length} tokens")
        protected = evictable = 0
        leaves: set[int] = set()
        host_owned: set[int] = set()  # host pages held by host nodes
        host_nodes, host_leaves = 0, set()
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            pages = node.pages if node.pages is not None else self._host_pages.get(node)
            if pages is None:
                raise InvariantError(f"node of {len(node.key)} ids has pages on neither tier")
            if len(node.key) == 0 or len(node.key) % ps or len(pages) * ps != len(node.key):
                raise InvariantError(f"node of {len(node.key)} ids holds {len(pages)} pages")
            if node.lock != locks.get(id(node), 0):
                raise InvariantError(f"node lock {node.lock}, {locks.get(id(node), 0)} requests pass")
            if node.pages is None:  # on the host: unlocked, its children on the host, each page once
                host_nodes += 1
                if node.lock or not self._no_device_child(node):
                    raise InvariantError("a host node is locked, or has a child on the device")
                for hp in pages.tolist():
                    if hp in host_owned:
                        raise InvariantError(f"host page {hp} held by two nodes")
                    host_owned.add(hp)
                if not node.children:
                    host_leaves.add(id(node))
            else:
                for pid in node.pages.tolist():
                    if pid in owner:
                        raise InvariantError(f"page {pid} owned by {owner[pid]} and a tree node")
                    owner[pid] = "tree"
                if node.lock:
                    protected += len(node.key)
                else:
                    evictable += len(node.key)
                    if not node.children or self._no_device_child(node):
                        leaves.add(id(node))
            for key, ch in node.children.items():
                if ch.parent is not node or key != self._child_key(ch.key):
                    raise InvariantError("tree links are inconsistent")
            stack.extend(node.children.values())
        if set(map(id, self._leaves)) != leaves or len(self._leaves) != len(leaves):
            raise InvariantError(f"eviction policy holds {len(self._leaves)} keys, the tree has {len(leaves)} unlocked leaves")
        self._check_host(host_nodes, host_owned, host_leaves)
        try:
            self._leaves.check()
        except AssertionError as e:
            raise InvariantError(f"eviction policy {self.eviction}: {e}") from None
        for pid in self._free:
            if pid in owner:
                raise InvariantError(f"free page {pid} is owned by {owner[pid]}")
            owner[pid] = "free"
        used = self.num_pages - self._fresh  # pages >= used are fresh
        if len(owner) != used or any(pid >= used for pid in owner):
            raise InvariantError(f"{used - len(owner)} pages lost, or a fresh page in use")
        memo = self._match_memo
        if memo is not None:  # the kept match equals a match from scratch
            kept = self._match_kept(memo)
            fresh = self._match(memo.tokens[:memo.limit])
            if kept[1:] != fresh[1:] or kept[0] is not fresh[0] or memo.members != set(map(id, memo.nodes)):
                raise InvariantError(f"kept match of request {memo.rid} {kept[1:]} != from scratch {fresh[1:]}")
        private_token = sum(s.length - s.tree_len for s in self._seqs.values())
        private_pages = sum(len(s.private) for s in self._seqs.values())
        reserved = sum(min(s.kv_len, self.pages_for(s.length) * ps) - s.length for s in self._seqs.values())
        recount = (protected, evictable, private_pages, private_token, reserved)
        counters = (self._protected, self._evictable, self._private_page_count(), self._private_token, self._reserved)
        if recount != counters:
            raise InvariantError(f"counters {counters} != recount {recount}")
        states = self.slot_states(None)
        if states.total != self.capacity or min(states) < 0:
            raise InvariantError(f"slot states {states} do not sum to capacity {self.capacity}")

    def _check_host(self, host_nodes: int, host_owned: set[int], host_leaves: set[int]) -> None:
        """The host tier against the tree walk: `_host_pages` holds exactly the host nodes seen,
        the pool's pages are those plus its free ones (each page in one tier: a host node has no
        device pages), the host policy holds exactly the host leaves, nothing is mid-load."""
        host = self._host
        if host is None:
            if host_nodes or self._host_pages:
                raise InvariantError("host tier off but the tree holds host nodes")
            return
        if len(self._host_pages) != host_nodes or self._loading:
            raise InvariantError(f"{len(self._host_pages)} host nodes recorded, {host_nodes} in the tree")
        try:
            host.check(host_owned)
        except AssertionError as e:
            raise InvariantError(f"host tier: {e}") from None
        if set(map(id, host.policy)) != host_leaves or len(host.policy) != len(host_leaves):
            raise InvariantError(f"host policy holds {len(host.policy)} keys, the tree has "
                                 f"{len(host_leaves)} host leaves")
        states = self.host_states()
        if states.total != self.host_tier_tokens or states.cached != len(host_owned) * self.page_size:
            raise InvariantError(f"host states {states} != {len(host_owned)} pages of {self.host_tier_tokens} slots")

    def _path_ids(self, node: _Node) -> np.ndarray:
        parts = []
        while node is not self.root:
            parts.append(node.key)
            node = node.parent
        return np.concatenate(parts[::-1]) if parts else _EMPTY

    @property
    def label(self) -> str:
        return (f"{self.name}-{self.page_size}" + ("" if self.prefix_caching else "-nocache")
                + ("-sched" if self._scheduled else "")
                + ("" if self.eviction == "lru" else f"-{self.eviction}")
                + ("" if self.cache_outputs else "-noout") + (f"-min{self.min_cache_len}" if self.min_cache_len else "")
                + (f"-host{self.host_tier_tokens}" if self._host else "")
                + (f"-{self.host_tier_eviction}" if self._host and self.host_tier_eviction != "lru" else ""))

    def summary(self) -> dict:
        host = self._host
        return {**super().summary(), "prefix_visibility": self.prefix_visibility, "eviction": self.eviction,
                "prefix_caching": self.prefix_caching, "cache_outputs": self.cache_outputs,
                "min_cache_len": self.min_cache_len,
                "host_tier_tokens": self.host_tier_tokens, "host_tier_eviction": self.host_tier_eviction,
                "prefix_hit_tokens_gpu": self._hits_gpu, "prefix_hit_tokens_host": self._hits_host,
                "host_d2h_tokens": host.d2h_tokens if host else 0, "host_h2d_tokens": host.h2d_tokens if host else 0,
                "host_evicted_tokens": host.evicted_pages * self.page_size if host else 0}
