"""Priority with optional expiry: evict an expired key first (the one that expired first), else
the key of the lowest priority, least recently used among equals.

A key's priority and time to live are those of the request that last let go of it (its
`release`): per-request values from the trace (`Request.meta["priority"]`, `meta["ttl"]`; see
`from_requests`) or a generator, given at construction as `requests[rid] = (priority, ttl)`
(missing: `default_priority`, no expiry). The strategy names the releasing request
(`releasing(rid)`, before the keys it lets go of are inserted) and each admitted request
(`request(rid)`); the clock is the number of requests admitted so far, and a key inserted at
clock t with ttl k expires at t + k (TTL in admissions: the policy sees no wall time).
Two heaps with lazy deletion, O(log n) per event.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping

from kvbench.strategies.eviction.base import EvictionPolicy, LiveKeys


class Priority(LiveKeys, EvictionPolicy):
    name = "priority"
    tracks_requests = True

    def __init__(self, requests: Mapping[int, tuple[float, int | None]] | None = None,
                 default_priority: float = 0.0) -> None:
        self._req = {int(k): (float(v[0]), None if v[1] is None else int(v[1])) for k, v in (requests or {}).items()}
        self.default_priority = float(default_priority)
        self.now = 0  # requests admitted so far
        self._owner = None
        self._live: dict = {}  # evictable key → (priority, seq, expires_at or None)
        self._by_priority: list = []  # (priority, seq, key)
        self._by_expiry: list = []  # (expires_at, seq, key)
        self._seq = itertools.count()

    def request(self, rid: int) -> None:
        """Request `rid` was admitted: the clock advances. Mutates."""
        self.now += 1

    def releasing(self, rid: int) -> None:
        """The keys inserted next are let go of by request `rid`. Mutates."""
        self._owner = rid

    def insert(self, key, t=None, content=None) -> None:
        prio, ttl = self._req.get(self._owner, (self.default_priority, None))
        seq = next(self._seq)
        expires = None if ttl is None else self.now + ttl
        self._live[key] = (prio, seq, expires)
        heapq.heappush(self._by_priority, (prio, seq, key))
        if expires is not None:
            heapq.heappush(self._by_expiry, (expires, seq, key))

    def remove(self, key) -> None:
        self._live.pop(key, None)

    def touch(self, key) -> None:
        if key in self._live:
            prio, _, expires = self._live[key]
            seq = next(self._seq)
            self._live[key] = (prio, seq, expires)
            heapq.heappush(self._by_priority, (prio, seq, key))
            if expires is not None:
                heapq.heappush(self._by_expiry, (expires, seq, key))

    def victim(self):
        live, exp = self._live, self._by_expiry
        while exp and (exp[0][0] <= self.now or live.get(exp[0][2], (0, -1))[1] != exp[0][1]):
            expires, seq, key = heapq.heappop(exp)
            if live.get(key, (0, -1))[1] == seq:  # live and expired
                del live[key]
                return key
        heap = self._by_priority
        while True:
            prio, seq, key = heapq.heappop(heap)
            if live.get(key, (0, -1))[1] == seq:
                del live[key]
                return key

    def check(self) -> None:
        entries = {(p, s, k) for p, s, k in self._by_priority}
        assert all((p, s, k) in entries for k, (p, s, _) in self._live.items()), "a live key has no heap entry"


def from_requests(requests: Iterable, default_priority: float = 0.0) -> dict[int, tuple[float, int | None]]:
    """`Priority`'s table from requests' `meta` ("priority", "ttl"; absent: default, no expiry). Pure."""
    return {int(r.id): (float(r.meta.get("priority", default_priority)), r.meta.get("ttl")) for r in requests}
