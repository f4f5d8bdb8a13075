"""The eviction policy contract (see the package docstring) and `make_policy`."""
from __future__ import annotations

import heapq
import importlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator

#: policy name → "module:Class" (module under kvbench.strategies.eviction)
POLICIES = {
    "lru": "lru:LRU",
    "fifo": "fifo:FIFO",
    "lfu": "lfu:LFU",
    "slru": "slru:SLRU",
    "arc": "arc:ARC",
    "s3fifo": "s3fifo:S3FIFO",
    "belady": "belady:Belady",
    "priority": "priority:Priority",
}


class EvictionPolicy(ABC):
    """Chooses the next evictable key to free. Mutating verbs: insert, remove, touch, victim."""

    name = "policy"
    #: True when the policy needs the whole future at construction (Belady: paged only)
    offline = False
    #: True when the strategy tells it each admitted request (`request(rid)`) and, where the
    #: strategy can, the request whose keys are inserted next (`releasing(rid)`)
    tracks_requests = False

    def request(self, rid: int) -> None:
        """Request `rid` was admitted. Mutates. Default: ignored."""

    def releasing(self, rid: int) -> None:
        """The keys inserted next are let go of by request `rid`. Mutates. Default: ignored."""

    def bind(self, capacity_keys: int) -> None:
        """The cache holds at most `capacity_keys` keys (pages). Mutates. Default: ignored."""

    @abstractmethod
    def insert(self, key: Hashable, t: int | None = None, content: Hashable | None = None) -> None: ...

    def __setitem__(self, key: Hashable, content: Hashable | None) -> None:
        """`policy[key] = content` is `insert(key, content=content)` (the hot path's spelling:
        LRU's is the dict subscript, no Python frame)."""
        self.insert(key, None, content)

    def __delitem__(self, key: Hashable) -> None:
        """`del policy[key]` removes an evictable key (as `remove`)."""
        self.remove(key)

    @abstractmethod
    def remove(self, key: Hashable) -> None: ...

    @abstractmethod
    def touch(self, key: Hashable) -> None: ...

    @abstractmethod
    def victim(self) -> Hashable: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: Hashable) -> bool: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Hashable]: ...

    def check(self) -> None:
        """Raise AssertionError if the policy's own bookkeeping is inconsistent. Pure."""


class LiveKeys:
    """Size, membership and iteration of a policy that keeps its cached keys in `self._live`."""

    _live: dict

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key) -> bool:
        return key in self._live

    def __iter__(self):
        return iter(list(self._live))


class HeapPolicy(LiveKeys, EvictionPolicy):
    """Evicts the evictable key of least `_rank(key)`; a binary heap with lazy deletion
    (an entry is live while `_live[key]` is its rank). O(log n) per insert and victim."""

    def __init__(self) -> None:
        self._live: dict[Hashable, tuple] = {}  # evictable key → its rank in the heap
        self._heap: list[tuple] = []
        self._seq = itertools.count()

    def _rank(self, key: Hashable, t: int | None) -> tuple:
        raise NotImplementedError

    def _push(self, key: Hashable, t: int | None = None) -> None:
        rank = self._rank(key, t)
        self._live[key] = rank
        heapq.heappush(self._heap, (rank, next(self._seq), key))

    def insert(self, key, t=None, content=None) -> None:
        self._push(key, t)

    def remove(self, key) -> None:
        self._live.pop(key, None)

    def touch(self, key) -> None:
        if key in self._live:
            self._push(key)

    def victim(self):
        heap, live = self._heap, self._live
        while True:
            rank, _, key = heapq.heappop(heap)
            if live.get(key) == rank:
                del live[key]
                self._forget(key)
                return key

    def _forget(self, key) -> None:
        """`key` was evicted: drop what the policy keeps about it."""

    def check(self) -> None:
        entries = {(rank, key) for rank, _, key in self._heap}
        assert all((rank, key) in entries for key, rank in self._live.items()), "a live key has no heap entry"


def make_policy(spec) -> EvictionPolicy:
    """A policy from a name ("lru"), a policy object, or a dict {"name": ..., **kwargs}. Raises
    ValueError on an unknown name (config time)."""
    if isinstance(spec, EvictionPolicy):
        return spec
    kwargs = {}
    if isinstance(spec, dict) or hasattr(spec, "items"):
        kwargs = dict(spec.items())
        spec = kwargs.pop("name", None)
    if spec not in POLICIES:
        raise ValueError(f"eviction must be one of {', '.join(POLICIES)}, got {spec!r}")
    if spec == "belady" and "future" not in kwargs:
        raise ValueError("eviction belady is offline: it needs every future request's pages "
                         "(experiments/eviction_curves.py builds it from the trace)")
    module, cls = POLICIES[spec].split(":")
    return getattr(importlib.import_module(f"kvbench.strategies.eviction.{module}"), cls)(**kwargs)
