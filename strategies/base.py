"""The strategy contract: one KV pool, many requests, and exact accounting of every slot.

A strategy owns the `num_pages x page_size` token slots of one KV pool. The scheduler drives it
through a handful of verbs and never learns which strategy it is; engines read only the layout
(`page_table`). Every verb's docstring says whether it mutates.

    pool (page_size = 4, num_pages = 6)          request r: page_table = [3, 0]
    page:  0     1     2     3     4     5       token i -> slot page_table[i // 4] * 4 + i % 4
         [aabb][....][....][aaaa][....][....]    slots 12..15 hold tokens 0..3, slots 0..1 hold 4..5
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple, NewType

import numpy as np

RequestId = NewType("RequestId", int)
PageId = NewType("PageId", int)


class Admission(NamedTuple):
    """Answer to `admit`: whether the request now holds memory, and how much came from cache."""

    admitted: bool
    cached_tokens: int = 0  # leading tokens whose K/V were already in the pool (prefix hit)
    host_tokens: int = 0  # how many of `cached_tokens` came back from the host tier (copied in)

    # An (admitted, cached_tokens) pair, the shape before the host tier, still compares equal
    # to an answer with no host tokens: `admit(...) == (True, 32)` reads "32 cached, none from
    # host". Not on any hot path (callers read the fields).
    def __eq__(self, other: object) -> bool:
        if isinstance(other, tuple) and len(other) == 2 and not isinstance(other, Admission):
            return self.host_tokens == 0 and tuple.__eq__(self[:2], other)
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__


class SlotStates(NamedTuple):
    """Every slot of the pool in exactly one state (DESIGN.md); the fields sum to the capacity."""

    token: int  # holds K/V of a token that exists (a shared prefix counts once)
    reserved: int  # held by a running request for a token it will still produce
    internal: int  # held by a request but never written (over-reservation, last-page tail)
    external: int  # free, but in pieces too small for the allocation that waits
    cached: int  # a finished request's reusable prefix, evictable
    free: int  # usable now

    @property
    def total(self) -> int:
        return self.token + self.reserved + self.internal + self.external + self.cached + self.free


class HostStates(NamedTuple):
    """Every slot of a strategy's host tier (`host_states`): the fields sum to its capacity."""

    cached: int  # holds an evicted page's K/V, hittable (whole pages)
    free: int

    @property
    def total(self) -> int:
        return self.cached + self.free


class InvariantError(AssertionError):
    """A strategy's bookkeeping disagrees with a recount from first principles."""


class Strategy(ABC):
    """Base of every KV-cache allocation strategy.

    Life of a request: `admit` (room for its first prefill chunk, maybe a prefix from cache) →
    `grow` every step (room for the step's tokens) → `release` (finished or preempted).
    Between two calls all positions a request was given room for hold computed K/V: the
    scheduler calls `grow` for a step before the step runs and `release` only between steps.

    Args:
        capacity_tokens: pool size in token slots (rounded down to whole pages).
        max_model_len: the longest request (prompt + output) the model serves.
        page_size: tokens per page.
        name: label used in summaries and figures.
    """

    #: True when each request's pages are consecutive, so kernels may skip the table walk.
    contiguous: bool = False
    #: True when a request's computed prefix can serve a later request (admit may answer cached > 0).
    caches_prefixes: bool = False
    #: True when a request `admit` refused stays refused while running requests' decodes take free
    #: pages (no eviction, no host copy): its need and its match do not change and free memory only
    #: drops. Lets a sim quiet run go on through such steps while requests wait (kvbench.quiet).
    refusal_outlasts_free_takes: bool = False

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int, name: str) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if capacity_tokens < page_size:
            raise ValueError(f"kv capacity {capacity_tokens} tokens is less than one page ({page_size})")
        self.page_size = int(page_size)
        self.num_pages = int(capacity_tokens) // self.page_size
        self.max_model_len = int(max_model_len)
        self.name = name
        self._copies: list[tuple[int, int]] = []

    @property
    def capacity(self) -> int:
        """Token slots in the pool."""
        return self.num_pages * self.page_size

    @property
    def label(self) -> str:
        """Name plus the parameters that tell two variants apart (for tables and figures)."""
        return self.name

    # ---- always safe (no mutation) ----------------------------------------------------------
    def never_fits(self, kv_len: int) -> str | None:
        """Why a request of `kv_len` slots can never run here (None if it can). Pure."""
        if kv_len + 1 > self.max_model_len:
            return f"max_model_len: prompt + output = {kv_len + 1} tokens exceeds max_model_len {self.max_model_len}"
        if self.pages_for(kv_len) > self.num_pages:
            return f"pool: needs {kv_len} KV slots, the pool holds {self.capacity}"
        return None

    def pages_for(self, tokens: int) -> int:
        """Pages that `tokens` positions occupy. Pure."""
        return -(-tokens // self.page_size)

    def cached_prefix_len(self, tokens: np.ndarray, num_prompt: int) -> int:
        """Leading positions of `tokens` that `admit(..., num_prompt, ...)` would serve from
        cache now (at most `num_prompt - 1`, whole pages), without admitting. Pure: no memo, no
        recency, nothing changes (cache-aware scheduling asks it of every waiting request).
        Default: 0 (a strategy that caches no prefix)."""
        return 0

    @abstractmethod
    def page_table(self, rid: RequestId) -> np.ndarray:
        """The request's pages in token order, int32 (the layout kernels read). Pure. Read-only to the
        caller: a strategy may hand the same array out again while the request's pages are the
        same (paged, radix: engines that need the layout ask for every row's table every step)."""

    def room(self, rid: RequestId, length: int) -> int:
        """How many positions request `rid`, now holding `length`, can still grow by without
        taking a page (such a `grow` cannot fail; the simulation fast-forwards decode steps
        inside it). Pure. O(1). Default: the rest of its last page (a strategy that takes pages
        as positions need them holds ceil(length / page_size) of them)."""
        return -length % self.page_size

    @abstractmethod
    def slot_states(self, waiting_kv_len: int | None) -> SlotStates:
        """The state of every slot now. Pure.

        `waiting_kv_len` is the final KV length of the request at the head of the waiting queue
        (None if none waits): free slots that cannot serve its allocation are external
        fragmentation.
        """

    @abstractmethod
    def check_invariants(self) -> None:
        """Recount everything from first principles; raise `InvariantError` on any mismatch:
        slots conserved, no slot owned twice, reference counts match owners, counters match."""

    # ---- mutating ---------------------------------------------------------------------------
    @abstractmethod
    def admit(self, rid: RequestId, tokens: np.ndarray, kv_len: int, num_prompt: int,
              max_new: int) -> Admission:
        """Try to take a new request. Mutates only when it answers admitted.

        tokens: all ids the request will hold (prompt ++ output), int32.
        kv_len: slots it holds when finished.
        num_prompt: positions to compute before it decodes (the prompt, or after a preemption
            the prompt plus what it had generated); at most `num_prompt - 1` come from cache.
        max_new: most positions this step may compute for it.
        On success the request holds room for `cached + min(max_new, num_prompt - cached)`
        positions, may evict cached memory to get it, and its cached positions are locked.
        A refused request is asked again (the scheduler retries the head of its queue every
        step): a strategy may keep a memo of its work for that retry (paged and radix keep the
        prefix match), never state, and every answer equals one computed from scratch.
        """

    @abstractmethod
    def grow(self, rid: RequestId, num_tokens: int) -> bool:
        """Make room for `num_tokens` more positions. Mutates only when it returns True
        (it may evict cached memory, and may copy a shared page: see `take_copies`)."""

    @abstractmethod
    def release(self, rid: RequestId) -> None:
        """The request leaves (finished or preempted). Mutates: its memory is freed, or kept
        as cached (evictable) where the strategy caches prefixes."""

    @abstractmethod
    def fork(self, parent: RequestId, child: RequestId, child_tokens: np.ndarray, child_kv_len: int) -> bool:
        """Parallel sampling: `child` starts with all of `parent`'s positions, sharing its
        memory where the strategy can (copy-on-write). Mutates only when it returns True."""

    @abstractmethod
    def evict(self, num_slots: int) -> int:
        """Free cached (unreferenced) memory until `num_slots` slots are free or nothing is
        left to evict; returns the slots freed. Mutates."""

    def take_copies(self) -> list[tuple[int, int]]:
        """(src_page, dst_page) copies the engine must make before the next step (copy-on-write).
        Mutates: the list is handed over once."""
        copies, self._copies = self._copies, []
        return copies

    def host_states(self) -> HostStates:
        """The host tier's slots now (cached, free), apart from `slot_states` (which sums to the
        GPU pool). Pure. Default: no host tier, (0, 0)."""
        return HostStates(0, 0)

    def take_host_moves(self) -> tuple[int, int]:
        """(d2h_tokens, h2d_tokens): token slots copied device → host (cached pages evicted into
        the host tier) and host → device (host-tier hits loaded back) since the last call.
        Mutates: the counts are handed over once (the scheduler adds them to the step's batch;
        the sim charges them). A copy completes within the step that needs it: nothing is in
        flight between steps (strategies/host_tier.py). Default (0, 0): no host tier."""
        return (0, 0)

    def take_host_copies(self) -> list[tuple[str, int, int]]:
        """The host tier's page copies since the last call, in the order they must run:
        ("d2h", gpu_page, host_page) / ("h2d", host_page, gpu_page) (for an engine with a real
        host pool, and the content model). Mutates: handed over once (`take_host_moves` drops
        them too). Default []: no host tier."""
        return []

    def summary(self) -> dict:
        """Strategy-specific keys for summary.json. Pure."""
        return {"page_size": self.page_size, "num_pages": self.num_pages}
