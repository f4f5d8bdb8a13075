"""LFU: evict the evictable key used the fewest times; ties: the least recently used. A use is
the insert that brings the key into the cache, each `remove` (a hit, a lock) and each `touch`.
Counts are kept while the key is cached (in use or evictable) and forgotten at eviction (no
aging). Heap with lazy deletion, O(log n)."""
from __future__ import annotations

import itertools

from kvbench.strategies.eviction.base import HeapPolicy


class LFU(HeapPolicy):
    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._count: dict = {}  # key → uses while cached
        self._clock = itertools.count()

    def _rank(self, key, t):
        return (self._count.get(key, 0), next(self._clock))

    def insert(self, key, t=None, content=None) -> None:
        if key not in self._count:
            self._count[key] = 1
        self._push(key)

    def remove(self, key) -> None:
        if key in self._count:
            self._count[key] += 1
        self._live.pop(key, None)

    def touch(self, key) -> None:
        if key in self._live:
            self._count[key] += 1
            self._push(key)

    def _forget(self, key) -> None:
        del self._count[key]
