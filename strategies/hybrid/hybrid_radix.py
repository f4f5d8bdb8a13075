"""Pool design 4: a radix tree over hybrid layer groups (SGLang's SWARadixCache and
MambaRadixCache; sgl-project/sglang python/sglang/srt/mem_cache/, read as a yardstick, our code).

    full lane    root ── [0..1488) ──┬── [1488..2096) A          every node holds full K/V
    window lane        [tombstone]   │   [held]                  a node may drop its window K/V
    state lane               (snap)  └── [1488..1600) B (snap)   a node may keep a state snapshot

Pools: the pool's bytes are split once into lanes, as SGLang sizes its pools: a full lane (the
K/V of every full-attention group, page ids shared by them), one lane per sliding / chunked
group holding `swa_full_tokens_ratio` x the full lane's tokens (SGLang's --swa-full-tokens-ratio,
0.8), and one state pool per state group taking `state_memory_ratio` x the full lane's bytes
(SGLang's --mamba-full-memory-ratio, 0.9) in slots of one request's state. A tree node holds
`page_size`-token pages in every lane; a window lane's pages may be freed while the full pages
stay (the node is a *tombstone* in that lane).

Hit rule (SGLang's, the shared hits.longest_hit): a prefix of `point` tokens counts only if every
group holds what it needs there: full layers all earlier tokens (the tree path), sliding layers
the last window - 1 tokens before it (not tombstoned), chunked layers the current chunk's, and
each state group a snapshot taken exactly at `point` (kept at a node's end). Snapshots (this
design keeps them): at a request's release (its state at its last inserted page), and at the
*branching point* of an admission: when the full K/V matched further than any snapshot (a new
request diverges inside a shared prefix), the request's prefill checkpoints its state there
(SGLang's mamba_branching_seqlen), so the next request with that prefix hits it. This is what
avoids vLLM #45238's zero-hit failure (tests/test_hybrid_radix.py).

Locks and eviction (SGLang's): a running request locks its path in the full lane, and in each
window lane only the nodes that hold positions it still reads (hits.first_needed); as decoding
passes them they are unlocked and become evictable there. Its own window pages that leave the
window are freed at once (SGLang's swa_evicted_seqlen); when its positions are inserted later,
that part is a tombstone. Eviction is LRU per lane: the full lane evicts unlocked leaves (all
lanes of the node go, and its snapshots); a window lane evicts its least recent unlocked node,
tombstoning an inner (or still full-locked) node and deleting an unlocked leaf, parents older
than children; a state lane evicts its least recent snapshot. A leaf tombstoned in a lane is
deleted once nothing locks it (SGLang keeps no tombstone leaves).

Simplifications: whole pages of `page_size` tokens (default 16; SGLang defaults to 1); a node
tombstoned in a lane is recovered by an insert only when the inserting request still holds all
of that node's window pages; a `grow` counts neither the pages its insert deduplicates nor the
window pages it frees (it may refuse a step the memory would just allow: the scheduler preempts);
a window lock covers the whole node that straddles the window's start (its head is token, not
out_of_window); no fork. Costs: a match walks one node per edge (O(prefix pages)); lock and
unlock walk the path (O(depth)); a split fixes the window anchors of running requests
(O(running)); eviction pops lazy heaps (O(log n)).
"""
from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass, field

import numpy as np

from kvbench.sizes import PoolGeometry
from kvbench.strategies.base import Admission, InvariantError, RequestId
from kvbench.strategies.eviction.lru import TimedLRU
from kvbench.strategies.hybrid import hits
from kvbench.strategies.hybrid.base import NULL_PAGE, POOL, GroupSlotStates, HybridStrategy, TableSpec

_EMPTY = np.zeros(0, dtype=np.int32)


class _Node:
    __slots__ = ("key", "pages", "children", "parent", "lock", "access", "end", "snaps")

    def __init__(self, key: np.ndarray, pages: list, parent: _Node | None, access: int, end: int, lanes: int) -> None:
        self.key = key  # [n] token ids, n a multiple of page_size
        self.pages = pages  # per lane: [n // page_size] int32 page ids, or None (a tombstone; never lane 0)
        self.children: dict[bytes, _Node] = {}
        self.parent = parent  # None for the root and for nodes removed from the tree
        self.lock = [0] * lanes  # per lane: running requests that read this node's K/V in that lane
        self.access = access  # logical time of the last match, insert or unlock
        self.end = end  # position after its last token (its path's length)
        self.snaps: dict[int, int] = {}  # state group -> slot holding the state after its last token


@dataclass(slots=True)
class _Seq:
    tokens: np.ndarray
    kv_len: int
    num_prompt: int
    node: _Node  # deepest tree node of its prefix (full lane locked up to the root)
    tree_len: int  # leading positions in the tree
    private: list[list[int]]  # per lane: pages of positions >= tree_len (NULL_PAGE: freed, out of window)
    wnode: list[_Node | None]  # per lane: shallowest node it locks there (nodes from it to `node` all are)
    pfirst: list[int]  # per lane: index of its first private page not freed
    length: int = 0
    computed: int = 0  # positions computed when its windows were last trimmed
    reserved: int = 0
    state: dict[int, int] = field(default_factory=dict)  # state group -> its running state's slot
    branch: int = 0  # a point to checkpoint its state at (no snapshot there yet), 0: none


class HybridRadix(HybridStrategy):
    """Radix tree over hybrid layer groups with per-lane pools (module docstring)."""

    caches_prefixes = True
    hit_rule = ("every group holds what it needs at the hit point (full: the tree path; sliding: the last window-1 "
                "tokens, not tombstoned; chunked: the current chunk; state: a snapshot at the point, kept at "
                "releases and at branching points)")

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 16,
                 geometry: PoolGeometry | None = None, swa_full_tokens_ratio: float = 0.8,
                 state_memory_ratio: float = 0.9, snapshots: bool = True, name: str = "hybrid_radix") -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name, geometry)
        self.swa_full_tokens_ratio, self.state_memory_ratio = float(swa_full_tokens_ratio), float(state_memory_ratio)
        if not 0 < self.swa_full_tokens_ratio <= 64 or not 0 < self.state_memory_ratio <= 64:
            raise ValueError(f"{name}: swa_full_tokens_ratio={swa_full_tokens_ratio} and state_memory_ratio="
                             f"{state_memory_ratio} must be in (0, 64]")
        self.snapshots = bool(snapshots)
        groups = self.groups
        self._full = [g for g, x in enumerate(groups) if x.kind == "full"]
        if not self._full:
            raise ValueError(f"{name}: needs a full-attention group (a tree node lives as long as its full K/V)")
        self._lane_group = [-1] + [g for g, x in enumerate(groups) if x.kind in ("sliding", "chunked")]
        self._lanes = len(self._lane_group)
        self._sgroups = [g for g, x in enumerate(groups) if x.kind == "state"]
        self._lane_of = {g: 0 for g in self._full} | {g: l for l, g in enumerate(self._lane_group) if l}
        ps = self.page_size
        bpt = [sum(groups[g].bytes_per_token for g in self._full)] + [groups[g].bytes_per_token
                                                                      for g in self._lane_group[1:]]
        per_full_token = bpt[0] + self.swa_full_tokens_ratio * sum(bpt[1:]) + (
            self.state_memory_ratio * bpt[0] if self._sgroups else 0)
        full_tokens = int(self.pool_bytes / per_full_token)
        self._npages = [full_tokens // ps] + [int(self.swa_full_tokens_ratio * full_tokens) // ps] * (self._lanes - 1)
        self._bpt = bpt
        state_bytes = self.state_memory_ratio * full_tokens * bpt[0] if self._sgroups else 0
        total_bpr = sum(groups[g].bytes_per_request for g in self._sgroups) or 1
        self._nslots = {g: int(state_bytes * groups[g].bytes_per_request / total_bpr) // groups[g].bytes_per_request
                        for g in self._sgroups}
        if min(self._npages) < 1 or min(self._nslots.values(), default=1) < 1:
            raise ValueError(f"{name}: the pool ({self.pool_bytes} bytes) split into lanes of {self._npages} pages "
                             f"and state slots {list(self._nslots.values())}: each needs at least one")
        used = sum(n * ps * b for n, b in zip(self._npages, bpt)) + sum(
            n * groups[g].bytes_per_request for g, n in self._nslots.items())
        self._leftover = self.pool_bytes - used
        self._attn = sorted(self._lane_of)  # attention groups, in the model's order (one table each)
        self._tables = tuple(TableSpec(g, groups[g].num_layers, ps, self._lane_of[g], self._npages[self._lane_of[g]],
                                       ps * bpt[self._lane_of[g]]) for g in self._attn)
        self._clock = itertools.count(1)
        self.root = _Node(_EMPTY, [_EMPTY] * self._lanes, None, 0, 0, self._lanes)
        self._free = [array("l") for _ in range(self._lanes)]  # per lane: returned pages (a stack)
        self._fresh = list(self._npages)  # per lane: the last _fresh page ids were never handed out
        self._sfree = {g: list(range(n - 1, -1, -1)) for g, n in self._nslots.items()}  # free state slots
        self._leaves = TimedLRU()  # unlocked leaves (full lane)
        self._wlru = [None] + [TimedLRU() for _ in range(self._lanes - 1)]  # per window lane: unlocked held nodes
        self._slru = {g: TimedLRU() for g in self._sgroups}  # per state group: nodes with a snapshot
        self._seqs: dict[RequestId, _Seq] = {}
        self._prot = [0] * self._lanes  # tokens in nodes locked in that lane (held there)
        self._evictable = [0] * self._lanes  # tokens in unlocked nodes held in that lane
        self._ppages = [0] * self._lanes  # private pages held
        self._ptok = [0] * self._lanes  # filled positions of private pages held
        self._reserved = 0

    # ---- contract: layout -------------------------------------------------------------------
    @property
    def tables(self) -> tuple[TableSpec, ...]:
        return self._tables

    def table(self, rid, t) -> np.ndarray:
        seq, lane = self._seqs[rid], self._tables[t].space
        parts, node = [], seq.node
        while node is not self.root:
            parts.append(node.pages[lane] if node.pages[lane] is not None else np.full(len(node.key) // self.page_size,
                                                                                        NULL_PAGE, np.int32))
            node = node.parent
        out = np.concatenate(parts[::-1] + [np.asarray(seq.private[lane], dtype=np.int32)])
        if lane:  # positions its window no longer reads: not its pages (NULL), even where the tree holds them
            out[:hits.first_needed(self.groups[self._lane_group[lane]], seq.computed) // self.page_size] = NULL_PAGE
        return out

    def never_fits(self, kv_len: int) -> str | None:
        if kv_len + 1 > self.max_model_len:
            return f"max_model_len: prompt + output = {kv_len + 1} tokens exceeds max_model_len {self.max_model_len}"
        n = self.pages_for(kv_len)
        for lane, pages in enumerate(self._npages):
            if n > pages:
                return (f"pool: needs {kv_len} KV slots ({n} pages of lane {lane}, windows counted whole), "
                        f"the lane holds {pages}")
        return None

    # ---- tree ---------------------------------------------------------------------------------
    def _child_key(self, ids: np.ndarray) -> bytes:
        return ids[:self.page_size].tobytes()

    def _common(self, a: np.ndarray, b: np.ndarray) -> int:
        n = min(len(a), len(b))
        diff = np.flatnonzero(a[:n] != b[:n])
        common = int(diff[0]) if len(diff) else n
        return common - common % self.page_size

    def _match(self, ids: np.ndarray) -> list[tuple[_Node, int]]:
        """The longest cached prefix of `ids` in the full lane: [(node, tokens matched in it)]. Pure."""
        out, node, pos = [], self.root, 0
        while pos < len(ids):
            child = node.children.get(self._child_key(ids[pos:]))
            if child is None:
                break
            m = self._common(child.key, ids[pos:])
            if m == 0:
                break
            out.append((child, m))
            node, pos = child, pos + m
            if m < len(child.key):
                break
        return out

    def _longest_hit(self, tokens: np.ndarray, num_prompt: int) -> tuple[int, int, list[tuple[_Node, int]]]:
        """(hit point, full-lane match length, the match). Pure."""
        limit = (num_prompt - 1) // self.page_size * self.page_size
        path = self._match(tokens[:limit])
        full = sum(m for _, m in path)
        if not full:
            return 0, 0, path
        ps = self.page_size
        present = [np.ones(full // ps, dtype=bool)] + [np.concatenate(
            [np.full(m // ps, node.pages[lane] is not None) for node, m in path]) for lane in range(1, self._lanes)]
        ends = {node.end: node for node, m in path if m == len(node.key)}
        tabs = [(self.groups[g], ps) for g in self._attn]
        lanes = [self._lane_of[g] for g in self._attn]

        def snap(point: int) -> bool:
            node = ends.get(point)
            return node is not None and all(g in node.snaps for g in self._sgroups)

        point = hits.longest_hit(tabs + [(self.groups[g], 0) for g in self._sgroups],
                                 lambda t, j: j < len(present[lanes[t]]) and bool(present[lanes[t]][j]), limit, ps,
                                 snap if self._sgroups and self.snapshots else None)
        return point, full, path

    def cached_prefix_len(self, tokens, num_prompt) -> int:
        return self._longest_hit(tokens, num_prompt)[0]

    def _now(self) -> int:
        return next(self._clock)

    def _wkey(self, node: _Node) -> tuple:
        return (node.access, node.end)  # parents (smaller end) before children at equal access

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node` after `at` tokens; returns the new upper part (the object `node` stays the
        lower part). Locks are copied (every request through the lower part passes the upper);
        running requests whose window lock starts at `node` start at the upper part if they read it."""
        ps = self.page_size
        pages = [None if p is None else p[:at // ps] for p in node.pages]
        upper = _Node(node.key[:at], pages, node.parent, node.access, node.end - len(node.key) + at, self._lanes)
        upper.lock = list(node.lock)
        node.parent.children[self._child_key(node.key)] = upper
        node.key = node.key[at:]
        node.pages = [None if p is None else p[at // ps:] for p in node.pages]
        node.parent = upper
        upper.children[self._child_key(node.key)] = node
        for lane in range(1, self._lanes):
            if node.pages[lane] is not None and node.lock[lane] == 0:
                self._wlru[lane].insert(upper, self._wkey(upper))  # (lazy heap: the entry's key is the node)
        for seq in self._seqs.values():  # its window lock started at `node`: at the upper part, if it reads it
            for lane in range(1, self._lanes):
                if seq.wnode[lane] is not node:
                    continue
                if upper.end > self._fn(lane, seq.computed):
                    seq.wnode[lane] = upper
                    continue
                upper.lock[lane] -= 1
                if not upper.lock[lane]:
                    self._prot[lane] -= at
                    self._evictable[lane] += at
                    self._wlru[lane].insert(upper, self._wkey(upper))
        return upper

    def _lock(self, node: _Node, lane: int) -> None:
        if node.lock[lane] == 0:
            n = len(node.key)
            self._evictable[lane] -= n
            self._prot[lane] += n
            if lane == 0:
                self._leaves.remove(node)
            else:
                self._wlru[lane].remove(node)
        node.lock[lane] += 1

    def _unlock(self, node: _Node, lane: int, now: int) -> None:
        node.lock[lane] -= 1
        node.access = now
        if node.lock[lane]:
            return
        n = len(node.key)
        self._evictable[lane] += n
        self._prot[lane] -= n
        if lane:
            self._wlru[lane].insert(node, self._wkey(node))
        elif not node.children:
            self._leaf_unlocked(node)

    def _leaf_unlocked(self, node: _Node) -> None:
        """An unlocked leaf: evictable, or deleted at once when a lane tombstoned it (SGLang)."""
        if any(p is None for p in node.pages):
            self._delete(node)
        else:
            self._leaves.insert(node, node.access)

    def _delete(self, node: _Node) -> None:
        """Remove an unlocked leaf and everything it holds; its parent may become a leaf."""
        while True:
            parent = node.parent
            del parent.children[self._child_key(node.key)]
            node.parent = None
            n = len(node.key)
            self._leaves.remove(node)
            for lane, pages in enumerate(node.pages):
                if pages is not None:
                    self._free[lane].extend(pages.tolist())
                    self._evictable[lane] -= n
                    if lane:
                        self._wlru[lane].remove(node)
            for g, slot in node.snaps.items():
                self._slru[g].remove(node)
                self._sfree[g].append(slot)
            node.snaps = {}
            if parent is self.root or parent.children or parent.lock[0]:
                return
            if all(p is not None for p in parent.pages):
                self._leaves.insert(parent, parent.access)
                return
            node = parent  # a tombstone leaf nothing locks: deleted too

    def _evict_lane(self, lane: int, pages: int) -> None:
        """Free pages of one lane until `pages` are free (or nothing is evictable there)."""
        free = self._free[lane]
        while len(free) + self._fresh[lane] < pages:
            if lane == 0:
                if not self._leaves:
                    return
                self._delete(self._leaves.victim())
                continue
            lru = self._wlru[lane]
            if not lru:
                return
            node = lru.victim()
            if not node.children and node.lock[0] == 0:
                self._delete(node)
            else:
                self._tombstone_victim(node, lane)

    def _tombstone_victim(self, node: _Node, lane: int) -> None:
        """Free a node's pages in one window lane (it keeps its full K/V); the lane's LRU has
        already given it up. A leaf tombstoned so is deleted when its full lane unlocks."""
        self._free[lane].extend(node.pages[lane].tolist())
        node.pages[lane] = None
        self._evictable[lane] -= len(node.key)

    def _take(self, lane: int, k: int) -> list[int]:
        """k pages of a lane (room checked): returned ones first, then fresh ids."""
        free = self._free[lane]
        if len(free) + self._fresh[lane] < k:
            self._evict_lane(lane, k)
        out = []
        for _ in range(k):
            if free:
                out.append(free.pop())
            else:
                out.append(self._npages[lane] - self._fresh[lane])
                self._fresh[lane] -= 1
        return out

    def _room(self, lane: int) -> int:
        return len(self._free[lane]) + self._fresh[lane] + self._evictable[lane] // self.page_size

    def _take_slot(self, g: int, keep: _Node | None = None) -> int | None:
        """A free state slot of group g, evicting the least recent snapshot (not `keep`'s) if
        none is free; None if none can be had."""
        free = self._sfree[g]
        if not free:
            lru = self._slru[g]
            kept = None
            if keep is not None and keep in lru:
                kept = keep
                lru.remove(keep)
            if lru:
                node = lru.victim()
                free.append(node.snaps.pop(g))
            if kept is not None:
                lru.insert(kept, kept.access)
        return free.pop() if free else None

    # ---- inserting a request's computed positions ----------------------------------------------
    def _fn(self, lane: int, point: int) -> int:
        return hits.first_needed(self.groups[self._lane_group[lane]], point) if lane else 0

    def _attach(self, node: _Node, slots: dict[int, int] | None, now: int) -> None:
        """Keep a snapshot of the request's state after `node`'s last token, per state group
        (`slots`: the request's own slots, handed over at release; else a new slot, if one can
        be had: a snapshot is best effort). A slot handed over but not needed is freed."""
        for g in self._sgroups:
            mine = None if slots is None else slots[g]
            if g in node.snaps:
                if mine is not None:
                    self._sfree[g].append(mine)
                continue
            slot = mine if mine is not None else self._take_slot(g)
            if slot is None:
                continue
            node.snaps[g] = slot
            self._slru[g].insert(node, now)

    def _lock_new(self, seq: _Seq, node: _Node, fn: list[int]) -> None:
        """`node` joins the end of seq's path: locked in the full lane, and in each window lane
        that holds it where the request still reads it."""
        self._lock(node, 0)
        for lane in range(1, self._lanes):
            if node.pages[lane] is not None and node.end > fn[lane]:
                self._lock(node, lane)
                if seq.wnode[lane] is None:
                    seq.wnode[lane] = node

    def _insert(self, seq: _Seq, done: int, now: int) -> None:
        """Put positions [tree_len, done) of seq into the tree (computed, whole pages): a part
        the tree holds already is deduplicated (our pages freed; a tombstone we can refill is
        refilled), the rest becomes new nodes, cut where a window lane's pages start (the
        part before is a tombstone there: we freed it) and at the branching point."""
        ps, tokens = self.page_size, seq.tokens
        self._advance(seq, now)  # (its locked window is a suffix of the path: the new nodes extend it)
        fn = [self._fn(lane, seq.length) for lane in range(self._lanes)]
        node, pos, moved = seq.node, seq.tree_len, 0
        while pos < done:
            child = node.children.get(self._child_key(tokens[pos:]))
            if child is None:
                break
            m = self._common(child.key, tokens[pos:done])
            if m == 0:
                break
            if seq.branch and pos < seq.branch < pos + m:
                m = seq.branch - pos
            if m < len(child.key):
                child = self._split(child, m)
            k = m // ps
            for lane in range(self._lanes):
                mine = seq.private[lane][moved:moved + k]
                held = [p for p in mine if p != NULL_PAGE]
                self._ppages[lane] -= len(held)
                self._ptok[lane] -= len(held) * ps
                if lane and child.pages[lane] is None and len(held) == k:  # refill a tombstone
                    child.pages[lane] = np.asarray(held, dtype=np.int32)
                    self._evictable[lane] += m
                    self._wlru[lane].insert(child, self._wkey(child))
                else:
                    self._free[lane].extend(held)
            child.access = now
            self._lock_new(seq, child, fn)
            node, pos, moved = child, pos + m, moved + k
            if seq.branch == pos:
                self._attach(node, None, now)
                seq.branch = 0
        if pos < done:
            cuts = {done}
            for lane in range(1, self._lanes):
                start = seq.private[lane][moved:].count(NULL_PAGE)  # (freed pages are a prefix)
                if 0 < start * ps < done - pos:
                    cuts.add(pos + start * ps)
            if pos < seq.branch < done:
                cuts.add(seq.branch)
            for end in sorted(cuts):
                k = (end - pos) // ps
                pages = []
                for lane in range(self._lanes):
                    mine = seq.private[lane][moved:moved + k]
                    if mine[0] == NULL_PAGE:
                        pages.append(None)
                        continue
                    pages.append(np.asarray(mine, dtype=np.int32))
                    self._ppages[lane] -= k
                    self._ptok[lane] -= end - pos
                    self._evictable[lane] += end - pos
                new = _Node(tokens[pos:end].copy(), pages, node, now, end, self._lanes)
                node.children[self._child_key(new.key)] = new
                for lane in range(1, self._lanes):
                    if pages[lane] is not None:
                        self._wlru[lane].insert(new, self._wkey(new))
                self._lock_new(seq, new, fn)
                node, pos, moved = new, end, moved + k
                if seq.branch == pos:
                    self._attach(node, None, now)
                    seq.branch = 0
        for lane in range(self._lanes):
            del seq.private[lane][:moved]
            seq.pfirst[lane] = max(0, seq.pfirst[lane] - moved)
        seq.node, seq.tree_len = node, done

    def _advance(self, seq: _Seq, now: int) -> None:
        """Unlock, in each window lane, the path nodes wholly before the window of its computed
        positions (`length`): evictable there from now on."""
        for lane in range(1, self._lanes):
            fn = self._fn(lane, seq.length)
            w = seq.wnode[lane]
            while w is not None and w.end <= fn:
                nxt = None
                if w is not seq.node:
                    nxt = seq.node
                    while nxt.parent is not w:
                        nxt = nxt.parent
                self._unlock(w, lane, now)
                w = nxt
            seq.wnode[lane] = w

    def _trim(self, seq: _Seq, now: int) -> None:
        """Windows move on (its computed positions: `length`): tree nodes it no longer reads are
        unlocked in that lane (evictable there), its own pages it no longer reads are freed."""
        ps = self.page_size
        self._advance(seq, now)
        for lane in range(1, self._lanes):
            fn = self._fn(lane, seq.length)
            priv = seq.private[lane]
            stop = min(max(0, (fn - seq.tree_len) // ps), len(priv))
            for i in range(seq.pfirst[lane], stop):
                self._free[lane].append(priv[i])
                priv[i] = NULL_PAGE
                self._ppages[lane] -= 1
                self._ptok[lane] -= ps
            seq.pfirst[lane] = max(seq.pfirst[lane], stop)
        seq.computed = seq.length

    def _extend(self, seq: _Seq, new_len: int) -> None:
        """Pages in every lane for positions [length, new_len) (room checked)."""
        k = self.pages_for(new_len) - seq.tree_len // self.page_size - len(seq.private[0])
        for lane in range(self._lanes):
            if k > 0:
                seq.private[lane].extend(self._take(lane, k))
                self._ppages[lane] += k
            self._ptok[lane] += new_len - seq.length
        res = min(seq.kv_len, (seq.tree_len // self.page_size + len(seq.private[0])) * self.page_size) - new_len
        self._reserved += res - seq.reserved
        seq.reserved, seq.length = res, new_len

    # ---- contract: verbs ----------------------------------------------------------------------
    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        point, full, path = self._longest_hit(tokens, num_prompt)
        ps = self.page_size
        length = point + min(max_new, num_prompt - point)
        need = self.pages_for(length) - point // ps
        taken, pos = [], 0  # the path it will hold: (node, tokens of it)
        for node, m in path:
            if pos >= point:
                break
            taken.append((node, min(m, point - pos)))
            pos += taken[-1][1]
        for lane in range(self._lanes):  # room: free and evictable pages, less what this path locks
            fn = self._fn(lane, point)
            locks = sum(m for node, m in taken if node.lock[lane] == 0 and node.pages[lane] is not None
                        and node.end - len(node.key) + m > fn)
            if need > self._room(lane) - locks // ps:
                return Admission(False)
        hit_node = taken[-1][0] if point and self._sgroups else None
        for g in self._sgroups:
            spare = len(self._sfree[g]) + len(self._slru[g]) - (hit_node is not None and hit_node in self._slru[g])
            if spare < 1:
                return Admission(False)
        now = self._now()
        node = self.root
        if taken:
            node, m = taken[-1]
            if m < len(node.key):
                node = self._split(node, m)
        seq = _Seq(tokens, kv_len, num_prompt, node, point, [[] for _ in range(self._lanes)],
                   [None] * self._lanes, [0] * self._lanes, length=point, computed=point)
        path_nodes = []
        while node is not self.root:
            path_nodes.append(node)
            node = node.parent
        fn = [self._fn(lane, point) for lane in range(self._lanes)]
        for node in reversed(path_nodes):  # root first: the first window-locked node is the shallowest
            node.access = now
            self._lock_new(seq, node, fn)
        for g in self._sgroups:  # its own state: a copy of the snapshot it hits (kept: most recent now)
            if hit_node is not None and g in hit_node.snaps:
                self._slru[g].insert(hit_node, now)
            seq.state[g] = self._take_slot(g, keep=hit_node)
        if self._sgroups and self.snapshots and full > point:
            seq.branch = full  # no snapshot where the full K/V diverges: checkpoint there
        self._seqs[rid] = seq
        self._extend(seq, length)
        return Admission(True, point)

    def grow(self, rid, num_tokens) -> bool:
        seq, ps = self._seqs[rid], self.page_size
        new_len = seq.length + num_tokens
        if new_len > seq.kv_len:
            raise ValueError(f"request {rid} grows past its final length {seq.kv_len}")
        need = self.pages_for(new_len) - seq.tree_len // ps - len(seq.private[0])
        if need > 0 and any(need > self._room(lane) for lane in range(self._lanes)):
            return False  # (pages its insert or window would free at this grow are not counted)
        now = self._now()
        if seq.length <= seq.num_prompt:  # prefill: its computed prompt pages become hittable
            done = seq.length // ps * ps
            if done > seq.tree_len:
                self._insert(seq, done, now)
        self._trim(seq, now)
        self._extend(seq, new_len)
        return True

    def release(self, rid) -> None:
        seq, ps = self._seqs.pop(rid), self.page_size
        now = self._now()
        done = seq.length // ps * ps
        if done > seq.tree_len:
            self._insert(seq, done, now)
        if seq.state:
            if self.snapshots and seq.node is not self.root:
                self._attach(seq.node, seq.state, now)
            else:
                for g, slot in seq.state.items():
                    self._sfree[g].append(slot)
        for lane in range(self._lanes):
            held = [p for p in seq.private[lane] if p != NULL_PAGE]
            self._free[lane].extend(held)
            self._ppages[lane] -= len(held)
        for lane in range(self._lanes):
            self._ptok[lane] -= seq.length - seq.tree_len - (seq.pfirst[lane] * ps if lane else 0)
        self._reserved -= seq.reserved
        for lane in range(1, self._lanes):  # window locks: from its shallowest locked node down
            w = seq.wnode[lane]
            node = seq.node
            while w is not None:
                self._unlock(node, lane, now)
                if node is w:
                    break
                node = node.parent
        node = seq.node
        while node is not self.root:
            parent = node.parent
            self._unlock(node, 0, now)
            node = parent

    def evict(self, num_slots) -> int:
        start = self._free_bytes()
        goal = num_slots * self.unit_bytes
        while self._free_bytes() - start < goal:
            if self._leaves:
                self._delete(self._leaves.victim())
                continue
            lane = next((l for l in range(1, self._lanes) if self._wlru[l]), None)
            if lane is not None:
                node = self._wlru[lane].victim()
                if not node.children and node.lock[0] == 0:
                    self._delete(node)
                else:
                    self._tombstone_victim(node, lane)
                continue
            g = next((g for g in self._sgroups if self._slru[g]), None)
            if g is None:
                break
            self._sfree[g].append(self._slru[g].victim().snaps.pop(g))
        return -(-(self._free_bytes() - start) // self.unit_bytes)

    def _free_bytes(self) -> int:
        ps = self.page_size
        return sum((len(self._free[l]) + self._fresh[l]) * ps * self._bpt[l] for l in range(self._lanes)) + sum(
            len(self._sfree[g]) * self.groups[g].bytes_per_request for g in self._sgroups)

    # ---- accounting ---------------------------------------------------------------------------
    def _out_of_window(self) -> list[int]:
        """Per lane: positions of its own pages a request no longer reads but has not freed yet
        (the head of its first private page before first_needed(computed))."""
        out, ps = [0] * self._lanes, self.page_size
        for lane in range(1, self._lanes):
            for seq in self._seqs.values():
                i = seq.pfirst[lane]
                if i < len(seq.private[lane]):
                    start = seq.tree_len + i * ps
                    out[lane] += max(0, min(self._fn(lane, seq.computed), seq.length) - start)
        return out

    def group_slot_states(self, waiting_kv_len: int | None) -> dict[str, GroupSlotStates]:
        ps, oow = self.page_size, self._out_of_window()
        lanes = []
        for lane in range(self._lanes):
            token = self._prot[lane] + self._ptok[lane] - oow[lane]
            internal = self._ppages[lane] * ps - self._ptok[lane] - self._reserved
            lanes.append(GroupSlotStates(token=token, reserved=self._reserved, internal=internal,
                                         cached=self._evictable[lane], out_of_window=oow[lane],
                                         free=(len(self._free[lane]) + self._fresh[lane]) * ps))
        short = set()
        if waiting_kv_len is not None:  # free pages of the other lanes are stranded while one lacks room
            short = {lane for lane in range(self._lanes) if self.pages_for(waiting_kv_len) > self._room(lane)}
            short |= {-1 - i for i, g in enumerate(self._sgroups) if not self._sfree[g] and not self._slru[g]}
        out: dict[str, GroupSlotStates] = {}
        for g, group in enumerate(self.groups):
            if group.kind == "state":
                b, n = group.bytes_per_request, len(self._seqs)
                free = len(self._sfree[g]) * b
                ext = free if short and -1 - self._sgroups.index(g) not in short else 0
                out[group.label] = GroupSlotStates(token=n * b, cached=len(self._slru[g]) * b, free=free - ext,
                                                   external=ext)
                continue
            lane = self._lane_of[g]
            st = GroupSlotStates(*(x * group.bytes_per_token for x in lanes[lane]))
            if short and lane not in short:
                st = st._replace(external=st.free, free=0)
            out[group.label] = st
        out[POOL] = GroupSlotStates(internal=self._leftover)
        return out

    def check_invariants(self) -> None:
        ps, lanes = self.page_size, self._lanes
        locks: dict[int, list[int]] = {}
        owner = [dict() for _ in range(lanes)]
        slots = {g: {} for g in self._sgroups}
        for rid, seq in self._seqs.items():
            node, depth = seq.node, []
            while node is not self.root:
                depth.append(node)
                node = node.parent
            if node is not self.root or (seq.node is not self.root and seq.node.end != seq.tree_len):
                raise InvariantError(f"request {rid}: its node is not in the tree at {seq.tree_len}")
            ids = np.concatenate([n.key for n in reversed(depth)]) if depth else _EMPTY
            if not np.array_equal(ids, seq.tokens[:seq.tree_len]):
                raise InvariantError(f"request {rid}: tree path does not hold its first ids")
            for n in depth:
                locks.setdefault(id(n), [0] * lanes)[0] += 1
            for lane in range(1, lanes):
                w, fn = seq.wnode[lane], self._fn(lane, seq.computed)
                chain = []
                for n in depth:  # deepest first
                    chain.append(n)
                    if n is w:
                        break
                else:
                    if w is not None:
                        raise InvariantError(f"request {rid}: window anchor of lane {lane} not on its path")
                    chain = []
                for n in chain:
                    if n.pages[lane] is None or n.end <= fn:
                        raise InvariantError(f"request {rid}: locks node ending {n.end} in lane {lane} "
                                             f"(window from {fn})")
                    locks.setdefault(id(n), [0] * lanes)[lane] += 1
                rest = depth[len(chain):]
                if rest and rest[0].end > fn and rest[0].pages[lane] is not None:
                    raise InvariantError(f"request {rid}: node ending {rest[0].end} read in lane {lane} but unlocked")
            total = seq.tree_len // ps + len(seq.private[0])
            if total != self.pages_for(seq.length) or seq.reserved != min(seq.kv_len, total * ps) - seq.length:
                raise InvariantError(f"request {rid}: {total} pages for {seq.length} positions")
            for lane in range(lanes):
                priv = seq.private[lane]
                first = seq.pfirst[lane]
                if len(priv) != len(seq.private[0]) or any(p != NULL_PAGE for p in priv[:first]) or \
                        NULL_PAGE in priv[first:] or (lane == 0 and first):
                    raise InvariantError(f"request {rid} lane {lane}: private pages {priv} (first {first})")
                for p in priv[first:]:
                    if p in owner[lane]:
                        raise InvariantError(f"lane {lane} page {p} owned twice")
                    owner[lane][p] = rid
            for g, slot in seq.state.items():
                if slot in slots[g]:
                    raise InvariantError(f"state slot {slot} of group {g} owned twice")
                slots[g][slot] = rid
        prot, evictable = [0] * lanes, [0] * lanes
        leaves, wl, sl = set(), [set() for _ in range(lanes)], {g: set() for g in self._sgroups}
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            n = len(node.key)
            if n == 0 or n % ps or node.end != node.parent.end + n or node.pages[0] is None:
                raise InvariantError(f"node of {n} ids ending {node.end}: malformed")
            want = locks.get(id(node), [0] * lanes)
            if node.lock != want:
                raise InvariantError(f"node ending {node.end}: locks {node.lock}, requests say {want}")
            for lane in range(lanes):
                pages = node.pages[lane]
                if pages is None:
                    continue
                if len(pages) * ps != n:
                    raise InvariantError(f"node ending {node.end}: {len(pages)} pages in lane {lane} for {n} ids")
                for p in pages.tolist():
                    if p in owner[lane]:
                        raise InvariantError(f"lane {lane} page {p} owned by {owner[lane][p]} and a node")
                    owner[lane][p] = "tree"
                if node.lock[lane]:
                    prot[lane] += n
                else:
                    evictable[lane] += n
                    if lane:
                        wl[lane].add(id(node))
            if not node.children and not node.lock[0]:
                if any(p is None for p in node.pages):
                    raise InvariantError(f"unlocked tombstone leaf ending {node.end}")
                leaves.add(id(node))
            for g, slot in node.snaps.items():
                if slot in slots[g]:
                    raise InvariantError(f"state slot {slot} of group {g} owned twice")
                slots[g][slot] = "snapshot"
                sl[g].add(id(node))
            for key, ch in node.children.items():
                if ch.parent is not node or key != self._child_key(ch.key):
                    raise InvariantError("tree links are inconsistent")
            stack.extend(node.children.values())
        if set(map(id, self._leaves)) != leaves or any(set(map(id, self._wlru[l])) != wl[l] for l in range(1, lanes)) \
                or any(set(map(id, self._slru[g])) != sl[g] for g in self._sgroups):
            raise InvariantError("an LRU does not hold exactly its lane's evictable nodes")
        for lane in range(lanes):
            for p in self._free[lane]:
                if p in owner[lane]:
                    raise InvariantError(f"free page {p} of lane {lane} is owned by {owner[lane][p]}")
                owner[lane][p] = "free"
            used = self._npages[lane] - self._fresh[lane]
            if len(owner[lane]) != used or any(p >= used for p in owner[lane]):
                raise InvariantError(f"lane {lane}: {used - len(owner[lane])} pages lost, or a fresh page in use")
        for g in self._sgroups:
            for slot in self._sfree[g]:
                if slot in slots[g]:
                    raise InvariantError(f"free state slot {slot} of group {g} is in use")
                slots[g][slot] = "free"
            if sorted(slots[g]) != list(range(self._nslots[g])):
                raise InvariantError(f"state group {g}: slots {sorted(slots[g])} of {self._nslots[g]}")
        ptok = [sum(s.length - s.tree_len - (s.pfirst[l] * ps if l else 0) for s in self._seqs.values())
                for l in range(lanes)]
        ppages = [sum(len(s.private[l]) - s.pfirst[l] for s in self._seqs.values()) for l in range(lanes)]
        res = sum(s.reserved for s in self._seqs.values())
        counters = (self._prot, self._evictable, self._ptok, self._ppages, self._reserved)
        if (prot, evictable, ptok, ppages, res) != counters:
            raise InvariantError(f"counters ({self._prot}, {self._evictable}, {self._ptok}, {self._ppages}, "
                                 f"{self._reserved}) != recount ({prot}, {evictable}, {ptok}, {ppages}, {res})")
        self._check_state_sums()

    @property
    def label(self) -> str:
        return (f"{self.name}-{self.page_size}" + ("" if self.snapshots else "-nosnap")
                + ("" if self.swa_full_tokens_ratio == 0.8 else f"-swa{self.swa_full_tokens_ratio:g}"))

    def summary(self) -> dict:
        return {**super().summary(), "swa_full_tokens_ratio": self.swa_full_tokens_ratio,
                "state_memory_ratio": self.state_memory_ratio, "snapshots": self.snapshots,
                "lane_pages": list(self._npages),
                "state_slots": {self.groups[g].label: n for g, n in self._nslots.items()}}
