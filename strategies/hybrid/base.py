"""The hybrid pool contract: one KV pool of BYTES shared by layer groups that keep different
caches (full, sliding window, chunked, recurrent state; kvbench.sizes.LayerGroup), with exact
slot accounting per group. Designs 1-4 of issue 16 implement it (separate.py, unified.py, and
the Jenga / hybrid-radix designs).

A `HybridStrategy` is a `kvbench.strategies.base.Strategy` (the scheduler drives it through the
same verbs and never knows it is hybrid) built with the run's frozen `PoolGeometry`
(`geometry=`: kvbench.run passes it to every strategy whose constructor has that parameter).

Pool and units
    pool_bytes = capacity x geometry.bytes_per_token          (capacity = num_pages x page_size)
i.e. the bytes a uniform single-group pool of `kv_capacity_tokens` would have: every design
compares at equal pool bytes. A design lays those bytes out as it likes (pages per group, one
page size, large pages split in small ones...). Everything it accounts is in BYTES.

Page tables (what the kernels read): one table per *table spec* (`tables`, a tuple of `TableSpec`):
a design has at least one per attention group (vLLM's design splits a group into several KV-cache
groups of equal layer count, each with its own table). `table(rid, t)` is int32, one entry per
`tables[t].page_size` positions of the request's `length` (positions with room), the page id in
the page-id space `tables[t].space`; `NULL_PAGE` (-1) for a page the request does not hold (its
positions are outside the group's window / chunk: hits.first_needed). A table never references a
page for positions the group no longer reads once the design has freed them. State groups have
no table (their state is accounted per request).
    token i of table t lives in slot  table(rid, t)[i // ps] * ps + i % ps   (ps = tables[t].page_size)
`page_table(rid)` (the base contract) is `table(rid, primary)`, the first full-attention table.

Slot states (per group, bytes, exact)
`group_slot_states(waiting_kv_len)` -> dict label -> `GroupSlotStates` (bytes), one entry per
geometry group (by `LayerGroup.label`) plus `POOL` ("(pool)") for bytes no group owns (free pages
of a shared pool, bytes a split or a page size cannot use). Per group:
    token          K/V (or state) of positions the group still reads (a shared page counts once)
    reserved       held for a position the request will still produce
    internal       held but never written: last-page tails past the final length, page padding
                   (a page larger than its layers need), bytes a fixed split cannot use
    external       free, but cannot serve the allocation that waits (a design-1 pool whose group
                   has room while another group's pool is full)
    cached         a finished request's reusable pages (evictable)
    out_of_window  written K/V the group will never read again (outside its window/chunk) still
                   held: not yet freed, or kept by a design on purpose (hits on later prefixes)
    free           usable now
Over all entries and fields the sum is `pool_bytes`, at every step (check_invariants proves it).

`slot_states(waiting_kv_len)` (the base contract, what the timeline and summary.json read) is
the sum over groups, in TOKEN-EQUIVALENTS of the pool (bytes / geometry.bytes_per_token:
summing token slots of groups with different bytes per token would be meaningless), rounded by
largest remainder so the six fields still sum to `capacity` exactly; `out_of_window` is folded
into `internal` there (held, never read: waste), and reported on its own per group
(`group_slot_states`, the per-group timeline `groups_timeline.parquet`, summary keys
`mem_group_<label>_<state>_frac` and `mem_out_of_window_frac`; timeline.py).

What the base class gives (designs may override):
- `slot_states` from `group_slot_states`; `page_table` = the primary table;
- `room()` = 0 and `fast_forward = False`: a decode step may move positions out of a window, so
  the sim's fast-forward (which assumes a decode moves one slot from reserved to token) is off
  (kvbench.run turns the engine's fast_forward off for such a strategy);
- `fork` answers False (no parallel sampling; the scheduler never forks);
- `take_copies` (none: hits are whole pages, a shared page is never written).

Hit rules: kvbench.strategies.hybrid.hits (first_needed, hit_span, pages_needed, longest_hit).
Each design states its rule in `hit_rule` (one line, also in summary.json).
"""
from __future__ import annotations

from abc import abstractmethod
from typing import NamedTuple

import numpy as np

from kvbench.sizes import LayerGroup, PoolGeometry
from kvbench.strategies.base import InvariantError, RequestId, SlotStates, Strategy

NULL_PAGE = -1  # a table entry for a page the request does not hold (outside its window)
POOL = "(pool)"  # group_slot_states key of bytes that belong to no group


class GroupSlotStates(NamedTuple):
    """Bytes of one group (or of POOL) in each state; see the module docstring."""

    token: int = 0
    reserved: int = 0
    internal: int = 0
    external: int = 0
    cached: int = 0
    out_of_window: int = 0
    free: int = 0

    @property
    def total(self) -> int:
        return sum(self)

    def __add__(self, other):  # field-wise (NamedTuple's + would concatenate)
        return GroupSlotStates(*(a + b for a, b in zip(self, other)))


GROUP_STATES = GroupSlotStates._fields


class TableSpec(NamedTuple):
    """One page table of a request: the layers of geometry group `group` it serves (all of them
    or a slice: `layers`), `page_size` tokens per page, page ids from page-id space `space`
    (tables with equal `space` share one pool of `space_pages` pages of `page_bytes` bytes)."""

    group: int  # index into geometry.groups
    layers: int  # layers of the group this table serves
    page_size: int  # tokens per page
    space: int  # page-id space
    space_pages: int  # pages in that space
    page_bytes: int  # bytes of one page of that space


def to_units(values: list[int], unit: int, total_units: int) -> list[int]:
    """Integer units of `values` (bytes, summing to total_units x unit) by largest remainder:
    each is floor(v / unit) or one more, and they sum to `total_units` exactly. Pure."""
    q = [v // unit for v in values]
    short = total_units - sum(q)
    if short:
        order = sorted(range(len(values)), key=lambda i: (-(values[i] % unit), i))
        for i in order[:short]:
            q[i] += 1
    return q


class HybridStrategy(Strategy):
    """Base of the hybrid pool designs (module docstring: the contract).

    Args (beyond Strategy's): geometry: the run's PoolGeometry (its groups; its page_size and
    num_pages are the uniform pool's, the bytes to lay out: pool_bytes)."""

    fast_forward = False  # kvbench.run: the sim engine must step every step (module docstring)
    hit_rule = "none"

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int, name: str,
                 geometry: PoolGeometry | None) -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name)
        if geometry is None:
            raise ValueError(f"strategy {name}: a hybrid pool design needs the run's geometry (geometry=)")
        self.geometry = geometry
        self.groups: tuple[LayerGroup, ...] = geometry.groups
        self.unit_bytes = geometry.bytes_per_token  # one token-equivalent of the pool
        self.pool_bytes = self.capacity * self.unit_bytes

    # ---- the per-group contract (abstract) -----------------------------------------------------
    @property
    @abstractmethod
    def tables(self) -> tuple[TableSpec, ...]:
        """The page tables every request has, in a fixed order. Pure."""

    @abstractmethod
    def table(self, rid: RequestId, t: int) -> np.ndarray:
        """Request `rid`'s pages of table `t` in token order (NULL_PAGE where not held), int32. Pure."""

    @abstractmethod
    def group_slot_states(self, waiting_kv_len: int | None) -> dict[str, GroupSlotStates]:
        """Bytes per state of every group (by label) and of POOL; they sum to pool_bytes. Pure."""

    # ---- derived -------------------------------------------------------------------------------
    @property
    def primary(self) -> int:
        """The table `page_table` hands out: the first full-attention table (else table 0)."""
        for t, spec in enumerate(self.tables):
            if self.groups[spec.group].kind == "full":
                return t
        return 0

    def page_table(self, rid: RequestId) -> np.ndarray:
        return self.table(rid, self.primary)

    def room(self, rid: RequestId, length: int) -> int:
        return 0

    def slot_states(self, waiting_kv_len: int | None) -> SlotStates:
        return self.units(self.group_slot_states(waiting_kv_len))

    def units(self, groups: dict[str, GroupSlotStates]) -> SlotStates:
        """Group states (bytes) summed, in token-equivalents summing to `capacity`. Pure."""
        total = GroupSlotStates()
        for states in groups.values():
            total = total + states
        b = [total.token, total.reserved, total.internal + total.out_of_window, total.external, total.cached,
             total.free]
        return SlotStates(*to_units(b, self.unit_bytes, self.capacity))

    def _check_state_sums(self) -> None:
        """Raise InvariantError unless the group states sum to the pool's bytes and their units to
        the capacity, none negative (every design's `check_invariants` ends with this). Pure."""
        states = self.group_slot_states(None)
        total = sum(s.total for s in states.values())
        if total != self.pool_bytes or min(min(s) for s in states.values()) < 0:
            raise InvariantError(f"group slot states {states} sum to {total}, pool {self.pool_bytes} bytes")
        units = self.slot_states(None)
        if units.total != self.capacity or min(units) < 0:
            raise InvariantError(f"slot states {units} do not sum to capacity {self.capacity}")

    def fork(self, parent, child, child_tokens, child_kv_len) -> bool:
        return False

    def summary(self) -> dict:
        return {**super().summary(), "hit_rule": self.hit_rule, "pool_bytes": self.pool_bytes,
                "groups": [g.label for g in self.groups]}
