"""The content model (tests/content_model.py) for hybrid pools (strategies/hybrid/): one model
of every page-id space, and every page table of a request checked on its own.

`content_model.Driver(strategy)` builds a `HybridDriver` for a strategy with `tables` (the hybrid
contract). Per table t of group g (page size ps), once a request has computed `c` positions at
its last admit or grow (its tables are trimmed to that point):
- positions [first_needed(g, c), length) read through table t hold the request's own ids (a hit
  serves real content: at admit, c is the hit and the group's needed span must hold the ids:
  the hit rule of hits.py holds page by page);
- every entry of a page entirely before first_needed(g, c) is NULL_PAGE: the table handed to the
  kernels references no page outside the window (a kernel given it cannot read one);
- every entry from there on is a held page.
After release_all nothing is held: no token, reserved, out-of-window or external bytes in any group.
"""
from __future__ import annotations

import numpy as np

from content_model import ContentError, Driver
from kvbench.strategies.hybrid.base import NULL_PAGE
from kvbench.strategies.hybrid.hits import first_needed


class HybridDriver(Driver):
    def __init__(self, strategy, check_no_mutation: bool = True, invariants: bool = True) -> None:
        super().__init__(strategy, check_no_mutation=check_no_mutation, invariants=invariants)
        self.stride: dict[int, int] = {}
        pages: dict[int, int] = {}
        for spec in strategy.tables:
            self.stride[spec.space] = max(self.stride.get(spec.space, 0), spec.page_size)
            pages[spec.space] = spec.space_pages
        self.space_slots = {sp: np.full(n * self.stride[sp], -1, dtype=np.int64) for sp, n in pages.items()}
        self.computed: dict[int, int] = {}  # rid -> positions computed at its last admit / grow

    def _slots(self, rid: int, t: int, start: int, stop: int) -> np.ndarray:
        spec = self.s.tables[t]
        table = self.s.table(rid, t).astype(np.int64)
        pos = np.arange(start, stop)
        if len(table) < -(-stop // spec.page_size):
            raise ContentError(f"request {rid} table {t}: {len(table)} pages for {stop} positions")
        pages = table[pos // spec.page_size]
        if (pages == NULL_PAGE).any():
            raise ContentError(f"{self.s.label}: request {rid} table {t}: position {int(pos[pages == NULL_PAGE][0])} "
                               "it still reads is in no page")
        return pages * self.stride[spec.space] + pos % spec.page_size

    def _write(self, rid: int, start: int, stop: int) -> None:
        if stop > start:
            for t, spec in enumerate(self.s.tables):
                self.space_slots[spec.space][self._slots(rid, t, start, stop)] = self.live[rid].tokens[start:stop]

    def expect_holds(self, rid: int, stop: int, what: str) -> None:
        point = self.computed.setdefault(rid, stop)  # (at admit: the hit, checked before anything is written)
        tokens = self.live[rid].tokens
        for t, spec in enumerate(self.s.tables):
            group = self.s.groups[spec.group]
            lo = first_needed(group, point)
            table = self.s.table(rid, t)
            gone = lo // spec.page_size
            if (table[:gone] != NULL_PAGE).any():
                raise ContentError(f"{self.s.label}: {what}: request {rid} table {t} ({group.label}) references "
                                   f"pages {table[:gone].tolist()} outside its window (first needed position {lo})")
            got = self.space_slots[spec.space][self._slots(rid, t, lo, stop)]
            bad = np.flatnonzero(got != tokens[lo:stop])
            if len(bad):
                i = lo + int(bad[0])
                raise ContentError(f"{self.s.label}: {what}: request {rid} table {t} ({group.label}) position {i} "
                                   f"holds id {got[i - lo]}, expected {tokens[i]} ({len(bad)} positions wrong)")

    def check_all(self, what: str) -> None:
        for rid, lv in self.live.items():
            for t, spec in enumerate(self.s.tables):
                if len(self.s.table(rid, t)) != -(-lv.length // spec.page_size):
                    raise ContentError(f"{self.s.label}: {what}: request {rid} table {t} has "
                                       f"{len(self.s.table(rid, t))} entries for {lv.length} positions")
            self.expect_holds(rid, lv.length, what)
        if self.invariants:
            self.s.check_invariants()

    def grow(self, rid: int, n: int) -> bool:
        had = self.computed.get(rid)
        self.computed[rid] = self.live[rid].length
        ok = super().grow(rid, n)
        if not ok:
            self.computed[rid] = had
        return ok

    def release(self, rid: int) -> None:
        self.computed.pop(rid, None)
        super().release(rid)

    def release_all(self) -> None:
        for rid in sorted(self.live):
            self.release(rid)
        for label, st in self.s.group_slot_states(None).items():
            assert st.token == st.reserved == st.out_of_window == st.external == 0, (label, st)
        self.evict(self.s.capacity)
        states = self.s.group_slot_states(None)
        assert sum(st.cached for st in states.values()) == 0, states
        assert sum(st.free + st.internal for st in states.values()) == self.s.pool_bytes, states
