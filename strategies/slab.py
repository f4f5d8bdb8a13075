"""Contiguous slabs (FasterTransformer / Orca): each request reserves one consecutive extent.

The reservation is made once, at admission, for the whole life of the request:
    max     max_model_len slots (Orca "Max")
    pow2    the next power of two of the request's final length (Orca "Pow2")
    oracle  exactly its final length, known from the trace (Orca "Oracle")

    pool:  [aaaaaaaa....][bbbb][........][cc..]      a: 8 tokens in a 12-slot extent
                  ^ reserved / internal        ^ free extent: too small for a 10-slot need
                                                     → external fragmentation

Free space is a list of extents sorted by start, coalesced on release. Placement is first fit
(lowest address) or best fit (smallest extent that fits); both scan the extents, O(number of
free extents), which stays small (at most one more than the running requests).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from kvbench.strategies.base import Admission, InvariantError, RequestId, SlotStates, Strategy

_new_tuple = tuple.__new__


@dataclass(slots=True)
class _Extent:
    start: int  # first page
    pages: int  # reserved pages
    kv_len: int  # slots the request will fill
    length: int  # slots filled (room made) so far


class SlabStrategy(Strategy):
    contiguous = True
    reads_tokens = False  # admit never reads the ids (the scheduler passes None: kvbench/scheduler.py)
    grows_merge = True  # grow(a) then grow(b) leaves the pool as grow(a + b) does (kvbench/quiet.py)
    room_holds_final_length = True  # room(rid, n) = kv_len - n: no decode takes a page (kvbench/quiet.py)

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 1,
                 reservation: str = "max", placement: str = "first_fit", name: str = "slab") -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name)
        if reservation not in ("max", "pow2", "oracle"):
            raise ValueError(f"slab reservation must be max, pow2 or oracle, got {reservation!r}")
        if placement not in ("first_fit", "best_fit"):
            raise ValueError(f"slab placement must be first_fit or best_fit, got {placement!r}")
        self.reservation, self.placement = reservation, placement
        if reservation == "max" and self.pages_for(max_model_len) > self.num_pages:
            raise ValueError(f"slab(max) reserves max_model_len={max_model_len} slots per request "
                             f"but the pool holds {self.capacity}: raise kv_capacity_tokens or lower max_model_len")
        self._max_pages = self.pages_for(max_model_len)  # reservation max: every request's
        self._starts: list[int] = [0]  # free extents, sorted by start page
        self._sizes: list[int] = [self.num_pages]
        self._ext: dict[RequestId, _Extent] = {}
        self._token = self._reserved = self._internal = 0

    def reserve_pages(self, kv_len: int) -> int:
        """Pages a request of final length `kv_len` reserves. Pure."""
        if self.reservation == "max":
            return self._max_pages
        elif self.reservation == "pow2":
            slots = min(max(1 << (kv_len - 1).bit_length(), 1), max(self.max_model_len, kv_len))
        else:
            slots = kv_len
        return self.pages_for(slots)

    def never_fits(self, kv_len: int) -> str | None:
        reason = super().never_fits(kv_len)
        if reason is None and self.reserve_pages(kv_len) > self.num_pages:
            return f"pool: its {self.reservation} reservation of {self.reserve_pages(kv_len) * self.page_size} slots exceeds the pool ({self.capacity})"
        return reason

    # ---- free extents -----------------------------------------------------------------------
    def _find(self, pages: int) -> int | None:
        """Index of the free extent to place `pages` in, or None."""
        best = None
        for i, size in enumerate(self._sizes):
            if size >= pages:
                if self.placement == "first_fit":
                    return i
                if best is None or size < self._sizes[best]:
                    best = i
        return best

    def _alloc(self, pages: int) -> int | None:
        i = self._find(pages)
        if i is None:
            return None
        start = self._starts[i]
        if self._sizes[i] == pages:
            del self._starts[i], self._sizes[i]
        else:
            self._starts[i] += pages
            self._sizes[i] -= pages
        return start

    def _free(self, start: int, pages: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and start + pages == self._starts[i]:  # merge with the next
            pages += self._sizes[i]
            del self._starts[i], self._sizes[i]
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == start:  # merge with the previous
            self._sizes[i - 1] += pages
        else:
            self._starts.insert(i, start)
            self._sizes.insert(i, pages)

    # ---- contract ---------------------------------------------------------------------------
    def page_table(self, rid: RequestId) -> np.ndarray:
        ext = self._ext[rid]
        return np.arange(ext.start, ext.start + self.pages_for(ext.length), dtype=np.int32)

    def room(self, rid: RequestId, length: int) -> int:
        ext = self._ext[rid]
        return ext.kv_len - length  # the reservation holds the final length

    def _place(self, rid: RequestId, kv_len: int, length: int) -> _Extent | None:
        pages = self.reserve_pages(kv_len)
        start = self._alloc(pages)
        if start is None:
            return None
        ext = self._ext[rid] = _Extent(start, pages, kv_len, length)
        self._token += length
        self._reserved += kv_len - length
        self._internal += pages * self.page_size - kv_len
        return ext

    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        ok = self._place(rid, kv_len, min(max_new, num_prompt)) is not None
        return Admission(ok, 0)

    def grow(self, rid, num_tokens) -> bool:
        ext = self._ext[rid]
        if ext.length + num_tokens > ext.kv_len:
            raise ValueError(f"request {rid} grows past its final length {ext.kv_len}")
        ext.length += num_tokens
        self._token += num_tokens
        self._reserved -= num_tokens
        return True

    def release(self, rid) -> None:
        ext = self._ext.pop(rid)
        self._token -= ext.length
        self._reserved -= ext.kv_len - ext.length
        self._internal -= ext.pages * self.page_size - ext.kv_len
        self._free(ext.start, ext.pages)

    def fork(self, parent, child, child_tokens, child_kv_len) -> bool:
        src = self._ext[parent]
        dst = self._place(child, child_kv_len, src.length)
        if dst is None:
            return False
        self._copies.extend((src.start + i, dst.start + i) for i in range(self.pages_for(src.length)))
        return True

    def evict(self, num_slots) -> int:
        return 0  # slabs cache nothing

    def slot_states(self, waiting_kv_len: int | None) -> SlotStates:
        sizes, ps = self._sizes, self.page_size
        free = sum(sizes) * ps
        external = 0
        if waiting_kv_len is not None:
            need = self.reserve_pages(waiting_kv_len)
            external = sum([s for s in sizes if s < need]) * ps
        # (token, reserved, internal, external, cached, free), built without SlotStates' Python __new__
        return _new_tuple(SlotStates, (self._token, self._reserved, self._internal, external, 0, free - external))

    def check_invariants(self) -> None:
        spans = [(s, n, "free") for s, n in zip(self._starts, self._sizes)]
        spans += [(e.start, e.pages, f"request {r}") for r, e in self._ext.items()]
        spans.sort()
        pos = 0
        for start, pages, who in spans:
            if start != pos or pages <= 0:
                raise InvariantError(f"extent of {who} at page {start} (+{pages}); expected start {pos}")
            pos += pages
        if pos != self.num_pages:
            raise InvariantError(f"extents cover {pos} pages of {self.num_pages}")
        for i in range(len(self._starts) - 1):
            if self._starts[i] + self._sizes[i] == self._starts[i + 1]:
                raise InvariantError(f"free extents at pages {self._starts[i]} and {self._starts[i + 1]} are not merged")
        exts = self._ext.values()
        recount = (sum(e.length for e in exts), sum(e.kv_len - e.length for e in exts),
                   sum(e.pages * self.page_size - e.kv_len for e in exts))
        if recount != (self._token, self._reserved, self._internal):
            raise InvariantError(f"counters {(self._token, self._reserved, self._internal)} != recount {recount}")
        if any(e.length > e.kv_len or e.kv_len > e.pages * self.page_size for e in exts):
            raise InvariantError("a request outgrew its reservation")
        states = self.slot_states(None)
        if states.total != self.capacity:
            raise InvariantError(f"slot states {states} do not sum to capacity {self.capacity}")

    @property
    def label(self) -> str:
        return f"{self.name}-{self.reservation}"

    def summary(self) -> dict:
        return {**super().summary(), "reservation": self.reservation, "placement": self.placement}
