"""LRU: evict the key least recently used (kvbench's original behaviour, bit for bit).

`LRU` (paged): an OrderedDict in event order, O(1) per event; the key that became evictable or
was touched last is most recent. Its verbs are OrderedDict's own C methods where they can be
(`lru[key] = t` is the dict subscript), so the hot path pays no Python call for them.
`TimedLRU` (radix): recency by the strategy's logical time `t` (a parent that turns into a leaf
keeps its old last-use time, so it is not most recent), a heap with lazy deletion (O(log n));
ties by insertion order.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

from kvbench.strategies.eviction.base import EvictionPolicy, HeapPolicy


class LRU(OrderedDict, EvictionPolicy):
    """Evictable keys, least recently used first."""

    name = "lru"
    offline = False
    # `lru[key] = t` (insert) is OrderedDict's own subscript: no Python frame, ~75 ns (a call to
    # the slot wrapper, `insert = OrderedDict.__setitem__`, costs ~210 ns; setdefault on a
    # subclass pays a KeyError per insert). A key enters once; content is stored, unused.
    def insert(self, key, t=None, content=None) -> None:
        self[key] = content
    touch = OrderedDict.move_to_end

    def bind(self, capacity_keys: int) -> None:
        pass

    def remove(self, key) -> None:
        self.pop(key, None)

    def victim(self):
        return self.popitem(last=False)[0]

    def check(self) -> None:
        pass

    def __reduce__(self):  # (pickled by the content model's fingerprints: the order is the state)
        return LRU, (), None, None, iter(self.items())


class TimedLRU(HeapPolicy):
    """Evictable keys, least recent `t` first (t: the strategy's clock at the key's last use)."""

    name = "lru"

    def _rank(self, key, t):
        return t

    def insert(self, key, t=None, content=None) -> None:  # (inlined _push: radix's unlock path)
        self._live[key] = t
        heapq.heappush(self._heap, (t, next(self._seq), key))
