"""PagedAttention (vLLM): fixed-size pages from a free list, reference counts, copy-on-write,
and automatic prefix caching by a chained hash of each full page's token ids.

    request a: [p0][p1][p2..]      p0, p1 full and hashed: h0 = H(root, ids[0:16]),
    request b: [p0][p1][p7..]                              h1 = H(h0, ids[16:32])
    b's prompt hashes to h0, h1 → it shares p0, p1 (ref 2); its own tokens start in p7.

Page states: in use (ref > 0), cached (ref 0, hashed, in the LRU), free (ref 0, not hashed).
Costs: allocate and free are O(1) (a stack of free pages); a cached page is revived or evicted
in O(1) (an OrderedDict as LRU: a plain dict's first item is O(deleted entries) to find); a prefix lookup is one dict probe per page plus a
token comparison of the hit (a hash is never trusted alone).
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from kvbench.strategies.base import Admission, InvariantError, PageId, RequestId, SlotStates, Strategy

_ROOT_HASH = 0x6B7662656E6368  # any fixed seed for the first page's parent hash


def page_hash(parent: int, ids: np.ndarray) -> int:
    """Chained hash of one full page: depends on every token before it, not only its own."""
    return hash((parent, ids.tobytes()))


@dataclass(slots=True)
class _Seq:
    tokens: np.ndarray  # all ids the request will hold
    kv_len: int
    pages: list[PageId] = field(default_factory=list)
    length: int = 0  # positions with room (computed between steps)
    hashes: list[int] = field(default_factory=list)  # chained hashes of its first full pages
    reserved: int = 0  # this request's share of the pool's reserved slots


class PagedStrategy(Strategy):
    """vLLM-style paging. `prefix_caching` turns automatic prefix caching on."""

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 16,
                 prefix_caching: bool = True, name: str = "paged") -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name)
        self.prefix_caching = prefix_caching
        n = self.num_pages
        self._free = array("l", range(n - 1, -1, -1))  # a stack of free page ids; pop() gives 0, 1, …
        self._ref = [0] * n
        self._fill = [0] * n  # tokens written in the page
        self._hash: list[int | None] = [None] * n  # set while the page is in the hash table
        self._table: dict[int, PageId] = {}  # chained hash → page holding those ids
        self._lru: OrderedDict[PageId, None] = OrderedDict()  # cached pages (ref 0, hashed), least recent first
        self._stored_ids: dict[PageId, np.ndarray] = {}  # ids of each hashed page, to verify hits
        self._seqs: dict[RequestId, _Seq] = {}
        self._token = 0  # slots of in-use pages holding tokens
        self._reserved = 0
        self._hit_memo: tuple[int, list[int]] | None = None  # (rid, prompt page hashes)

    # ---- helpers ----------------------------------------------------------------------------
    def _available(self) -> int:
        return len(self._free) + len(self._lru)

    def _take_page(self) -> PageId:
        if not self._free:
            self.evict(self.page_size)
        pid = self._free.pop()
        self._ref[pid] = 1
        self._fill[pid] = 0
        return pid

    def _unref(self, pid: PageId) -> None:
        self._ref[pid] -= 1
        if self._ref[pid]:
            return
        self._token -= self._fill[pid]
        if self._hash[pid] is not None:
            self._lru[pid] = None  # most recently used at the end
        else:
            self._free.append(pid)

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

    def _prompt_hashes(self, rid: RequestId, tokens: np.ndarray, num_full: int) -> list[int]:
        memo = self._hit_memo
        if memo is not None and memo[0] == rid and len(memo[1]) >= num_full:
            return memo[1]
        hashes, h, ps = [], _ROOT_HASH, self.page_size
        for i in range(num_full):
            h = page_hash(h, tokens[i * ps:(i + 1) * ps])
            hashes.append(h)
        self._hit_memo = (rid, hashes)
        return hashes

    def _lookup(self, h: int, ids: np.ndarray) -> PageId | None:
        pid = self._table.get(h)
        if pid is None:
            return None
        # verify the ids: a hash is only a hint
        return pid if np.array_equal(self._stored_ids[pid], ids) else None

    def _register_full_pages(self, seq: _Seq) -> None:
        """Put the request's newly completed pages into the hash table (they hold computed K/V)."""
        ps = self.page_size
        full = seq.length // ps
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            ids = seq.tokens[i * ps:(i + 1) * ps]
            h = page_hash(seq.hashes[-1] if seq.hashes else _ROOT_HASH, ids)
            seq.hashes.append(h)
            pid = seq.pages[i]
            if self._hash[pid] is None and h not in self._table:
                self._table[h] = pid
                self._hash[pid] = h
                self._stored_ids[pid] = ids
        # (a page whose content another page already caches stays unhashed: freed on release)

    # ---- contract ---------------------------------------------------------------------------
    def page_table(self, rid: RequestId) -> np.ndarray:
        return np.asarray(self._seqs[rid].pages, dtype=np.int32)

    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        ps = self.page_size
        hits: list[PageId] = []
        if self.prefix_caching:
            num_full = (num_prompt - 1) // ps  # leave at least one position to compute
            hashes = self._prompt_hashes(rid, tokens, num_full)
            for i in range(num_full):
                pid = self._lookup(hashes[i], tokens[i * ps:(i + 1) * ps])
                if pid is None:
                    break
                hits.append(pid)
        cached = len(hits) * ps
        length = cached + min(max_new, num_prompt - cached)
        need = self.pages_for(length) - len(hits)
        revived = sum(1 for p in hits if self._ref[p] == 0)  # these leave the evictable set
        if need > self._available() - revived:
            return Admission(False)
        for pid in hits:
            if self._ref[pid] == 0:
                del self._lru[pid]
                self._token += self._fill[pid]
            self._ref[pid] += 1
        seq = _Seq(tokens=tokens, kv_len=kv_len, pages=list(hits), length=cached)
        seq.hashes = list(self._hit_memo[1][: len(hits)]) if hits else []
        self._seqs[rid] = seq
        self._hit_memo = None
        ok = self.grow(rid, length - cached)
        assert ok, "room was checked above"
        return Admission(True, cached)

    def grow(self, rid, num_tokens) -> bool:
        seq, ps = self._seqs[rid], self.page_size
        if seq.length + num_tokens > seq.kv_len:
            raise ValueError(f"request {rid} grows past its final length {seq.kv_len}")
        if self.prefix_caching:
            self._register_full_pages(seq)
        new_len = seq.length + num_tokens
        cow = seq.length % ps != 0 and self._ref[seq.pages[-1]] > 1
        need = self.pages_for(new_len) - len(seq.pages) + (1 if cow else 0)
        if need > self._available():
            return False
        if cow:  # the last page is shared and partly filled: copy it before writing into it
            old = seq.pages[-1]
            new = self._take_page()
            self._fill[new] = self._fill[old]
            self._token += self._fill[new]
            self._copies.append((old, new))
            seq.pages[-1] = new
            self._unref(old)
            self._after_unshare(old)
        pos = seq.length
        while pos < new_len:
            if pos % ps == 0:
                seq.pages.append(self._take_page())
            pid = seq.pages[pos // ps]
            n = min(ps - pos % ps, new_len - pos)
            self._fill[pid] += n
            self._token += n
            pos += n
        seq.length = new_len
        self._set_reserved(seq)
        return True

    def release(self, rid) -> None:
        seq = self._seqs.pop(rid)
        if self.prefix_caching:
            self._register_full_pages(seq)
        self._reserved -= seq.reserved
        for pid in reversed(seq.pages):  # the tail first: it is the least likely to be reused
            self._unref(pid)
        if seq.length % self.page_size:
            self._after_unshare(seq.pages[-1])

    def fork(self, parent, child, child_tokens, child_kv_len) -> bool:
        src = self._seqs[parent]
        for pid in src.pages:
            self._ref[pid] += 1
        self._seqs[child] = _Seq(tokens=child_tokens, kv_len=child_kv_len, pages=list(src.pages),
                                 length=src.length, hashes=list(src.hashes))
        self._set_reserved(src)
        self._set_reserved(self._seqs[child])
        return True

    def evict(self, num_slots) -> int:
        freed = 0
        while freed < num_slots and self._lru:
            pid, _ = self._lru.popitem(last=False)  # least recently used
            del self._table[self._hash[pid]]
            del self._stored_ids[pid]
            self._hash[pid] = None
            self._free.append(pid)
            freed += self.page_size
        return freed

    def slot_states(self, waiting_kv_len: int | None) -> SlotStates:
        ps = self.page_size
        cached = len(self._lru) * ps
        free = len(self._free) * ps
        in_use = self.capacity - cached - free
        return SlotStates(token=self._token, reserved=self._reserved,
                          internal=in_use - self._token - self._reserved, external=0,
                          cached=cached, free=free)

    def check_invariants(self) -> None:
        n, ps = self.num_pages, self.page_size
        owners = [0] * n
        for seq in self._seqs.values():
            if len(seq.pages) != self.pages_for(seq.length):
                raise InvariantError(f"request holds {len(seq.pages)} pages for {seq.length} tokens")
            if len(set(seq.pages)) != len(seq.pages):
                raise InvariantError("a request holds one page twice")
            for pid in seq.pages:
                owners[pid] += 1
        free, lru = set(self._free), set(self._lru)
        if len(free) != len(self._free) or free & lru:
            raise InvariantError("a page is twice in the free list, or both free and cached")
        for pid in range(n):
            if owners[pid] != self._ref[pid]:
                raise InvariantError(f"page {pid}: ref {self._ref[pid]} but {owners[pid]} owners")
            state = (pid in free) + (pid in lru) + (owners[pid] > 0)
            if state != 1:
                raise InvariantError(f"page {pid} is in {state} states")
            if (pid in lru) and self._hash[pid] is None:
                raise InvariantError(f"cached page {pid} has no hash")
            if pid in free and self._hash[pid] is not None:
                raise InvariantError(f"free page {pid} still hashed")
        for h, pid in self._table.items():
            if self._hash[pid] != h:
                raise InvariantError(f"hash table points at page {pid} which holds another hash")
        token = sum(self._fill[p] for p in range(n) if owners[p])
        reserved = 0
        for seq in self._seqs.values():
            for i, pid in enumerate(seq.pages):
                expect = min(ps, seq.length - i * ps)
                if self._fill[pid] != expect:
                    raise InvariantError(f"page {pid} fill {self._fill[pid]}, request wrote {expect}")
            last_shared = seq.length % ps and self._ref[seq.pages[-1]] > 1
            reserved += 0 if last_shared else min(seq.kv_len, len(seq.pages) * ps) - seq.length
        if (token, reserved) != (self._token, self._reserved):
            raise InvariantError(f"counters (token {self._token}, reserved {self._reserved}) != "
                                 f"recount ({token}, {reserved})")
        states = self.slot_states(None)
        if states.total != self.capacity or min(states) < 0:
            raise InvariantError(f"slot states {states} do not sum to capacity {self.capacity}")

    @property
    def label(self) -> str:
        return f"{self.name}-{self.page_size}" + ("" if self.prefix_caching else "-nocache")

    def summary(self) -> dict:
        return {**super().summary(), "prefix_caching": self.prefix_caching}
