"""RadixAttention (SGLang): a radix tree over token ids maps every cached prefix to its pages.

    root ── [sys prompt A: 0..99] ──┬── [question 1: 100..130] (locked by request 7)
                                    └── [question 2: 100..118] (unlocked leaf: evictable, LRU)

A running request locks the path from the root to the deepest node of its prefix (lock counts,
so shared ancestors stay locked while any user runs); tokens it computed beyond the tree are in
private pages. Its computed prompt is inserted into the tree after each prefill chunk, its output
at release; a part another request inserted first is deduplicated (its private pages freed, the
tree's pages used). Only unlocked leaves are evicted, least recently used first. Nodes hold whole
pages; page_size 1 is SGLang's default.

Costs: match and insert walk one node per edge and compare ids with numpy (O(prefix length));
lock/unlock walk to the root (O(depth)); eviction pops a heap of (last access, node) with lazy
deletion, O(log n) per evicted leaf; a private page comes from a free-page stack in O(1).
"""
from __future__ import annotations

import heapq
import itertools
from array import array
from dataclasses import dataclass, field

import numpy as np

from kvbench.strategies.base import Admission, InvariantError, PageId, RequestId, SlotStates, Strategy

_EMPTY = np.zeros(0, dtype=np.int32)


class _Node:
    __slots__ = ("key", "pages", "children", "parent", "lock", "access")

    def __init__(self, key: np.ndarray, pages: np.ndarray, parent: _Node | None, access: int) -> None:
        self.key = key  # [n] token ids, n a multiple of page_size
        self.pages = pages  # [n // page_size] int32 page ids
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
    path_pages: np.ndarray  # [tree_len // page_size] pages of the tree path
    tree_len: int  # leading positions stored in the tree
    private: list[PageId] = field(default_factory=list)  # pages for positions >= tree_len
    length: int = 0
    reserved: int = 0


class RadixStrategy(Strategy):
    caches_prefixes = True

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 1,
                 name: str = "radix") -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name)
        self._clock = itertools.count(1)
        self.root = _Node(_EMPTY, _EMPTY, None, 0)
        self._free = array("l", range(self.num_pages - 1, -1, -1))  # a stack of free page ids
        self._heap: list[tuple[int, int, _Node]] = []  # (access, tiebreak, leaf); stale entries skipped
        self._tiebreak = itertools.count()
        self._seqs: dict[RequestId, _Seq] = {}
        self._protected = 0  # tokens in locked tree nodes
        self._evictable = 0  # tokens in unlocked tree nodes
        self._private_pages = 0
        self._private_token = 0
        self._reserved = 0

    # ---- tree -------------------------------------------------------------------------------
    def _child_key(self, ids: np.ndarray) -> object:
        return int(ids[0]) if self.page_size == 1 else ids[: self.page_size].tobytes()

    def _common(self, a: np.ndarray, b: np.ndarray) -> int:
        """Length of the common prefix of a and b, rounded down to whole pages."""
        n = min(len(a), len(b))
        diff = np.flatnonzero(a[:n] != b[:n])
        common = int(diff[0]) if len(diff) else n
        return common - common % self.page_size

    def _match(self, ids: np.ndarray) -> tuple[_Node, int, int, int]:
        """Walk the longest cached prefix of `ids` without changing the tree. Pure.

        Returns (node, tokens matched inside node, tokens matched in all, evictable tokens on
        the matched path)."""
        node, pos, evictable, inside = self.root, 0, 0, 0
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
        """Cut `node` after `at` tokens; returns the new upper part. Accounting is unchanged."""
        ps = self.page_size
        upper = _Node(node.key[:at], node.pages[: at // ps], node.parent, node.access)
        upper.lock = node.lock
        upper.children[self._child_key(node.key[at:])] = node
        node.parent.children[self._child_key(node.key)] = upper
        node.key, node.pages, node.parent = node.key[at:], node.pages[at // ps:], upper
        return upper

    def _settle(self, node: _Node, inside: int) -> _Node:
        """Split `node` so that a match ending `inside` it ends exactly at a node."""
        return self._split(node, inside) if node is not self.root and inside < len(node.key) else node

    def _path_pages(self, node: _Node) -> np.ndarray:
        parts = []
        while node is not self.root:
            parts.append(node.pages)
            node = node.parent
        return np.concatenate(parts[::-1]) if parts else _EMPTY

    def _lock(self, node: _Node) -> None:
        now = next(self._clock)
        while node is not self.root:
            if node.lock == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock += 1
            node.access = now
            node = node.parent

    def _unlock(self, node: _Node) -> None:
        now = next(self._clock)
        while node is not self.root:
            node.lock -= 1
            node.access = now
            if node.lock == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
                if not node.children:
                    self._push(node)
            node = node.parent

    def _push(self, node: _Node) -> None:
        heapq.heappush(self._heap, (node.access, next(self._tiebreak), node))

    def _insert(self, seq: _Seq, n: int) -> None:
        """Store the request's first `n` positions (computed, whole pages) in the tree, adopting its
        private pages where the tree lacks them and freeing them where the tree has them."""
        ps = self.page_size
        table = np.concatenate([seq.path_pages, np.asarray(seq.private, dtype=np.int32)])
        ids, node, pos = seq.tokens[:n], self.root, 0
        now = next(self._clock)
        while pos < n:
            child = node.children.get(self._child_key(ids[pos:]))
            m = 0 if child is None else self._common(child.key, ids[pos:])
            if m == 0:  # new leaf with the rest: adopt our pages
                leaf = _Node(ids[pos:].copy(), table[pos // ps: n // ps].copy(), node, now)
                node.children[self._child_key(leaf.key)] = leaf
                self._evictable += n - pos
                node, pos = leaf, n
                break
            if m < len(child.key):
                child = self._split(child, m)
            child.access = now
            node, pos = child, pos + m
        own_from = seq.tree_len // ps  # our private pages start here in `table`
        path = self._path_pages(node)
        ours = table[own_from: n // ps]
        self._free.extend(ours[path[own_from:] != ours].tolist())  # the tree had these already
        moved = n // ps - own_from
        self._private_pages -= moved
        self._private_token -= moved * ps
        self._lock(node)
        self._unlock(seq.node)
        seq.node, seq.path_pages, seq.tree_len = node, path, n
        seq.private = seq.private[moved:]

    # ---- memory -----------------------------------------------------------------------------
    def _take_pages(self, k: int) -> list[PageId]:
        if len(self._free) < k:
            self.evict((k - len(self._free)) * self.page_size)
        if k == 1:  # the decode path
            self._private_pages += 1
            return [self._free.pop()]
        pages = self._free[len(self._free) - k:]
        del self._free[len(self._free) - k:]
        pages.reverse()  # the order k pops would give
        self._private_pages += k
        return pages.tolist()

    def _extend(self, seq: _Seq, new_len: int) -> None:
        need = self.pages_for(new_len) - seq.tree_len // self.page_size - len(seq.private)
        if need > 0:
            seq.private.extend(self._take_pages(need))
        self._private_token += new_len - seq.length
        seq.length = new_len
        cap = (seq.tree_len // self.page_size + len(seq.private)) * self.page_size
        new_res = min(seq.kv_len, cap) - new_len
        self._reserved += new_res - seq.reserved
        seq.reserved = new_res

    def _room(self) -> int:
        """Pages obtainable now: free plus evictable."""
        return len(self._free) + self._evictable // self.page_size

    def _insert_gain(self, seq: _Seq, n: int) -> int:
        """How much `_room()` grows if `_insert(seq, n)` runs now. Pure. Each of our pages whose
        ids the tree already holds is freed (+1), and an unlocked tree page we then lock leaves
        the evictable set (-1)."""
        _, _, matched, evictable = self._match(seq.tokens[:n])  # our locked path counts 0
        return (matched - seq.tree_len - evictable) // self.page_size

    # ---- contract ---------------------------------------------------------------------------
    def page_table(self, rid: RequestId) -> np.ndarray:
        seq = self._seqs[rid]
        return np.concatenate([seq.path_pages, np.asarray(seq.private, dtype=np.int32)])

    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        ps = self.page_size
        limit = (num_prompt - 1) // ps * ps  # leave at least one position to compute
        node, inside, cached, path_evictable = self._match(tokens[:limit])
        length = cached + min(max_new, num_prompt - cached)
        need = self.pages_for(length) - cached // ps
        if need > self._room() - path_evictable // ps:
            return Admission(False)
        node = self._settle(node, inside)
        self._lock(node)
        seq = _Seq(tokens=tokens, kv_len=kv_len, num_prompt=num_prompt, node=node,
                   path_pages=self._path_pages(node), tree_len=cached, length=cached)
        self._seqs[rid] = seq
        self._extend(seq, length)
        return Admission(True, cached)

    def grow(self, rid, num_tokens) -> bool:
        seq, ps = self._seqs[rid], self.page_size
        if seq.length + num_tokens > seq.kv_len:
            raise ValueError(f"request {rid} grows past its final length {seq.kv_len}")
        done = seq.length // ps * ps if seq.length <= seq.num_prompt else 0  # prefill: cache the computed chunk
        need = self.pages_for(seq.length + num_tokens) - seq.tree_len // ps - len(seq.private)
        if need > self._room() and (done <= seq.tree_len or need > self._room() + self._insert_gain(seq, done)):
            return False  # checked before inserting: a grow that answers no changes nothing
        if done > seq.tree_len:
            self._insert(seq, done)
        self._extend(seq, seq.length + num_tokens)
        return True

    def release(self, rid) -> None:
        seq, ps = self._seqs[rid], self.page_size
        done = seq.length // ps * ps
        if done > seq.tree_len:
            self._insert(seq, done)
        del self._seqs[rid]
        tail = seq.private  # at most one partly filled page remains
        self._free.extend(tail)
        self._private_pages -= len(tail)
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
                   node=src.node, path_pages=src.path_pages, tree_len=done, length=done)
        self._seqs[child] = seq
        if tail:  # copy-on-write of the partly filled last page, at once
            self._extend(seq, src.length)
            self._copies.append((src.private[0], seq.private[0]))
        return True

    def evict(self, num_slots) -> int:
        freed = 0
        while freed < num_slots and self._heap:
            access, _, node = heapq.heappop(self._heap)
            if node.parent is None or node.lock or node.children or access != node.access:
                continue  # stale entry
            parent = node.parent
            del parent.children[self._child_key(node.key)]
            node.parent = None
            self._free.extend(node.pages.tolist())
            self._evictable -= len(node.key)
            freed += len(node.key)
            if parent is not self.root and not parent.children and parent.lock == 0:
                self._push(parent)
        return freed

    def slot_states(self, waiting_kv_len: int | None) -> SlotStates:
        ps = self.page_size
        held = self._private_pages * ps
        return SlotStates(token=self._protected + self._private_token, reserved=self._reserved,
                          internal=held - self._private_token - self._reserved, external=0,
                          cached=self._evictable, free=len(self._free) * ps)

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
            if not np.array_equal(self._path_pages(seq.node), seq.path_pages):
                raise InvariantError(f"request {rid}: stale path pages")
            if len(seq.path_pages) * ps != seq.tree_len or not np.array_equal(
                    self._path_ids(seq.node), seq.tokens[: seq.tree_len]):
                raise InvariantError(f"request {rid}: tree path does not hold its first ids")
            if seq.tree_len // ps + len(seq.private) != self.pages_for(seq.length):
                raise InvariantError(f"request {rid}: {len(seq.private)} private pages for {seq.length} tokens")
        protected = evictable = 0
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if len(node.key) == 0 or len(node.key) % ps or len(node.pages) * ps != len(node.key):
                raise InvariantError(f"node of {len(node.key)} ids holds {len(node.pages)} pages")
            if node.lock != locks.get(id(node), 0):
                raise InvariantError(f"node lock {node.lock}, {locks.get(id(node), 0)} requests pass")
            for pid in node.pages.tolist():
                if pid in owner:
                    raise InvariantError(f"page {pid} owned by {owner[pid]} and a tree node")
                owner[pid] = "tree"
            if node.lock:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            for key, ch in node.children.items():
                if ch.parent is not node or key != self._child_key(ch.key):
                    raise InvariantError("tree links are inconsistent")
            stack.extend(node.children.values())
        for pid in self._free:
            if pid in owner:
                raise InvariantError(f"free page {pid} is owned by {owner[pid]}")
            owner[pid] = "free"
        if len(owner) != self.num_pages:
            raise InvariantError(f"{self.num_pages - len(owner)} pages lost")
        private_token = sum(s.length - s.tree_len for s in self._seqs.values())
        private_pages = sum(len(s.private) for s in self._seqs.values())
        reserved = sum(min(s.kv_len, self.pages_for(s.length) * ps) - s.length for s in self._seqs.values())
        recount = (protected, evictable, private_pages, private_token, reserved)
        counters = (self._protected, self._evictable, self._private_pages, self._private_token, self._reserved)
        if recount != counters:
            raise InvariantError(f"counters {counters} != recount {recount}")
        states = self.slot_states(None)
        if states.total != self.capacity or min(states) < 0:
            raise InvariantError(f"slot states {states} do not sum to capacity {self.capacity}")

    def _path_ids(self, node: _Node) -> np.ndarray:
        parts = []
        while node is not self.root:
            parts.append(node.key)
            node = node.parent
        return np.concatenate(parts[::-1]) if parts else _EMPTY

    @property
    def label(self) -> str:
        return f"{self.name}-{self.page_size}"
