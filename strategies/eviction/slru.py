"""Segmented LRU: new keys enter a probationary LRU segment; a key used again (`remove`: a hit
or a lock, or `touch`) moves to the protected segment, which holds at most `protected` of the
cache's keys (a fraction of `bind`'s capacity); the protected segment's least recent key drops
back to the probationary segment's most recent end when it overflows. Victims come from the
probationary segment's least recent end, or the protected one's when it is empty. O(1)."""
from __future__ import annotations

from collections import OrderedDict

from kvbench.strategies.eviction.base import EvictionPolicy


class SLRU(EvictionPolicy):
    name = "slru"

    def __init__(self, protected: float = 0.8) -> None:
        if not 0 <= protected <= 1:
            raise ValueError(f"slru protected must be in [0, 1], got {protected}")
        self.protected = float(protected)
        self._limit = 0
        self._prob: OrderedDict = OrderedDict()  # evictable, least recent first
        self._prot: OrderedDict = OrderedDict()
        self._hot: set = set()  # keys in use that were used again: they come back protected

    def bind(self, capacity_keys: int) -> None:
        self._limit = int(self.protected * capacity_keys)

    def _protect(self, key) -> None:
        self._prot[key] = None
        while len(self._prot) > self._limit:
            old, _ = self._prot.popitem(last=False)
            self._prob[old] = None

    def insert(self, key, t=None, content=None) -> None:
        if key in self._hot:
            self._hot.discard(key)
            self._protect(key)
        else:
            self._prob[key] = None

    def remove(self, key) -> None:
        if self._prob.pop(key, 0) is None or self._prot.pop(key, 0) is None:
            self._hot.add(key)

    def touch(self, key) -> None:
        if key in self._prot:
            self._prot.move_to_end(key)
        elif self._prob.pop(key, 0) is None:
            self._protect(key)

    def victim(self):
        seg = self._prob if self._prob else self._prot
        return seg.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._prob) + len(self._prot)

    def __contains__(self, key) -> bool:
        return key in self._prob or key in self._prot

    def __iter__(self):
        return iter([*self._prob, *self._prot])

    def check(self) -> None:
        assert not (set(self._prob) & set(self._prot)), "a key in both segments"
        assert len(self._prot) <= max(self._limit, 0) or not self._prot, "protected segment overflows"
