"""FIFO: evict the key that entered the cache first. A use does not move it: a key that was in
use (`remove`) keeps its entry time when it becomes evictable again; the time is forgotten when
the key is evicted. Heap with lazy deletion, O(log n)."""
from __future__ import annotations

import itertools

from kvbench.strategies.eviction.base import HeapPolicy


class FIFO(HeapPolicy):
    name = "fifo"

    def __init__(self) -> None:
        super().__init__()
        self._born: dict = {}  # key → order of its first insert (kept while the key is cached)
        self._clock = itertools.count()

    def _rank(self, key, t):
        born = self._born.get(key)
        if born is None:
            born = self._born[key] = next(self._clock)
        return born

    def touch(self, key) -> None:
        pass  # a use does not move a key

    def _forget(self, key) -> None:
        del self._born[key]
