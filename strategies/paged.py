"""PagedAttention (vLLM): fixed-size pages from a free list, reference counts, copy-on-write,
and automatic prefix caching by a chained hash of each full page's token ids.

    request a: [p0][p1][p2..]      p0, p1 full and hashed: h0 = H(root, ids[0:16]),
    request b: [p0][p1][p7..]                              h1 = H(h0, ids[16:32])
    b's prompt hashes to h0, h1 → it shares p0, p1 (ref 2); its own tokens start in p7.

Page states: in use (ref > 0), cached (ref 0, hashed, in the LRU), free (ref 0, not hashed).
Costs: allocate and free are O(1) (a stack of free pages); a cached page is revived or evicted
in O(1) (an OrderedDict as LRU: a plain dict's first item is O(deleted entries) to find); a prefix lookup is one dict probe per page plus a
token comparison of the hit (a hash is never trusted alone). A prompt's page hashes are computed
lazily, up to its first miss; a full page is hashed once, in bytes (a numpy slice compare costs
~1.5 us, a bytes compare ~0.1 us). With prefix caching off, `grow` pays one boolean test.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from kvbench.strategies.base import Admission, InvariantError, PageId, RequestId, SlotStates, Strategy

_ROOT_HASH = 0x6B7662656E6368  # any fixed seed for the first page's parent hash


def page_hash(parent: int, ids: bytes) -> int:
    """Chained hash of one full page (`ids`: its token ids as bytes): depends on every token
    before it, not only its own."""
    return hash((parent, ids))


@dataclass(slots=True)
class _Seq:
    tokens: np.ndarray  # all ids the request will hold
    kv_len: int
    pages: list[PageId] = field(default_factory=list)
    length: int = 0  # positions with room (computed between steps)
    hashes: list[int] = field(default_factory=list)  # chained hashes of its first full pages
    hash_at: int = 0  # length at which its next unhashed page is full: (len(hashes) + 1) * page_size
    reserved: int = 0  # this request's share of the pool's reserved slots


class PagedStrategy(Strategy):
    """vLLM-style paging. `prefix_caching` turns automatic prefix caching on."""

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 16,
                 prefix_caching: bool = True, name: str = "paged") -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name)
        self.prefix_caching = self.caches_prefixes = prefix_caching
        n = self.num_pages
        self._free = array("l", range(n - 1, -1, -1))  # a stack of free page ids; pop() gives 0, 1, …
        self._ref = [0] * n
        self._fill = [0] * n  # tokens written in the page
        self._hash: list[int | None] = [None] * n  # set while the page is in the hash table
        self._table: dict[int, PageId] = {}  # chained hash → page holding those ids
        self._lru: OrderedDict[PageId, None] = OrderedDict()  # cached pages (ref 0, hashed), least recent first
        self._stored_ids: list[bytes | None] = [None] * n  # ids (as bytes) of each hashed page, to verify hits
        self._seqs: dict[RequestId, _Seq] = {}
        self._token = 0  # slots of in-use pages holding tokens
        self._reserved = 0
        self._hit_memo: tuple[int, list[int]] | None = None  # (rid, prompt page hashes)

    # ---- helpers ----------------------------------------------------------------------------
    def _available(self) -> int:
        return len(self._free) + len(self._lru)

    def _take_page(self) -> PageId:
        pid = self._free.pop() if self._free else self._evict_one()
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

    def _evict_one(self) -> PageId:
        """Take the least recently used cached page out of the hash table; the caller owns it."""
        pid, _ = self._lru.popitem(last=False)
        del self._table[self._hash[pid]]
        self._stored_ids[pid] = None
        self._hash[pid] = None
        return pid

    def _cached_prefix(self, rid: RequestId, tokens: np.ndarray, num_full: int) -> list[PageId]:
        """Pages holding the longest cached prefix of `tokens`' first `num_full` pages. The page
        hashes are computed up to the first miss and kept in a memo for a retry of the same rid."""
        memo = self._hit_memo
        hashes = memo[1] if memo is not None and memo[0] == rid else []
        self._hit_memo = (rid, hashes)
        ps, hits = self.page_size, []
        for i in range(num_full):
            ids = None
            if i == len(hashes):
                ids = tokens[i * ps:(i + 1) * ps].tobytes()
                hashes.append(page_hash(hashes[-1] if i else _ROOT_HASH, ids))
            pid = self._table.get(hashes[i])
            if pid is None:
                break
            if ids is None:
                ids = tokens[i * ps:(i + 1) * ps].tobytes()
            if self._stored_ids[pid] != ids:  # a hash is only a hint: verify the ids
                break
            hits.append(pid)
        return hits

    def _register_full_pages(self, seq: _Seq) -> None:
        """Put the request's newly completed pages into the hash table (they hold computed K/V)."""
        ps, hashes = self.page_size, seq.hashes
        first, full = len(hashes), seq.length // ps
        data = seq.tokens[first * ps:full * ps].tobytes()  # ids are final once their K/V exist
        nb = len(data) // (full - first)
        table, page_hashes, stored = self._table, self._hash, self._stored_ids
        h = hashes[-1] if hashes else _ROOT_HASH
        for k, pid in enumerate(seq.pages[first:full]):
            ids = data[k * nb:(k + 1) * nb]
            h = page_hash(h, ids)
            hashes.append(h)
            if h not in table and page_hashes[pid] is None:
                table[h] = pid
                page_hashes[pid] = h
                stored[pid] = ids
        seq.hash_at = (full + 1) * ps
        # (a page whose content another page already caches stays unhashed: freed on release)

    # ---- contract ---------------------------------------------------------------------------
    def page_table(self, rid: RequestId) -> np.ndarray:
        return np.asarray(self._seqs[rid].pages, dtype=np.int32)

    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        ps = self.page_size
        hits: list[PageId] = []
        if self.prefix_caching:
            hits = self._cached_prefix(rid, tokens, (num_prompt - 1) // ps)  # leave >= 1 to compute
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
        seq.hash_at = (len(hits) + 1) * ps
        self._seqs[rid] = seq
        self._hit_memo = None
        ok = self.grow(rid, length - cached)
        assert ok, "room was checked above"
        return Admission(True, cached)

    def grow(self, rid, num_tokens) -> bool:
        seq, ps = self._seqs[rid], self.page_size
        if seq.length + num_tokens > seq.kv_len:
            raise ValueError(f"request {rid} grows past its final length {seq.kv_len}")
        new_len = seq.length + num_tokens
        cow = seq.length % ps != 0 and self._ref[seq.pages[-1]] > 1
        need = self.pages_for(new_len) - len(seq.pages) + (1 if cow else 0)
        if need > self._available():
            return False  # before registering pages: a grow that answers no changes nothing
        if self.prefix_caching and seq.length >= seq.hash_at:
            self._register_full_pages(seq)
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
        if self.prefix_caching and seq.length >= seq.hash_at:
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
                                 length=src.length, hashes=list(src.hashes), hash_at=src.hash_at)
        self._set_reserved(src)
        self._set_reserved(self._seqs[child])
        return True

    def evict(self, num_slots) -> int:
        freed = 0
        while freed < num_slots and self._lru:
            self._free.append(self._evict_one())  # least recently used first
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
            if (self._hash[pid] is None) != (self._stored_ids[pid] is None):
                raise InvariantError(f"page {pid}: hash and stored ids disagree")
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
            if seq.hash_at != (len(seq.hashes) + 1) * ps or len(seq.hashes) > seq.length // ps:
                raise InvariantError(f"request: {len(seq.hashes)} page hashes, hash_at {seq.hash_at}")
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
