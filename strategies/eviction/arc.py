"""ARC (Megiddo & Modha, FAST 2003): two LRU lists, T1 (keys used once since they entered)
and T2 (used again), two ghost lists B1, B2 of keys evicted from them, and a target p for T1's
size that a ghost hit moves (a B1 hit: T1 was too small, p grows; a B2 hit: p shrinks).
`victim` is the paper's REPLACE: T1's least recent key if |T1| > p (or T2 has no evictable
key), else T2's; it goes to the head of its ghost list. The directory is kept as in the paper:
|T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c (c: `bind`'s capacity).

Two differences from the paper, both from where a pool evicts: (1) room is made before the
missing key is known (paged frees a page before the step computes what it will hold), so a
ghost hit moves p when the key enters (`insert`), after the eviction that made room for it, and
REPLACE's tie rule for a B2 hit (|T1| = p) is not applied; (2) a key in use (`remove`) is in no
list (it cannot be evicted) and enters T2 when it becomes evictable again. O(1) per event.
"""
from __future__ import annotations

from collections import OrderedDict

from kvbench.strategies.eviction.base import EvictionPolicy


class ARC(EvictionPolicy):
    name = "arc"

    def __init__(self) -> None:
        self.c = 0
        self.p = 0.0
        self.t1: OrderedDict = OrderedDict()  # evictable, least recent first
        self.t2: OrderedDict = OrderedDict()
        self.b1: OrderedDict = OrderedDict()  # ghosts (no data), least recent first
        self.b2: OrderedDict = OrderedDict()
        self._hot: set = set()  # keys in use: they come back into T2
        self._pending = None  # the content announced by `miss` (p already adapted for it)
        self._content: dict = {}  # key in T1, T2 or in use → its content (ghosts are contents)

    def bind(self, capacity_keys: int) -> None:
        self.c = int(capacity_keys)

    def miss(self, key) -> None:
        """Optional, before the eviction that makes room for `key` (a caller that knows the
        missing key: the paper's order, used by the textbook test; the strategies cannot).
        A ghost hit adapts p now, and REPLACE applies its B2 tie rule. Mutates."""
        self._adapt(key)
        self._pending = key

    def _adapt(self, key) -> None:
        if key == self._pending:
            return
        if key in self.b1:
            self.p = min(self.c, self.p + max(len(self.b2) / len(self.b1), 1))
        elif key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1))

    def insert(self, key, t=None, content=None) -> None:
        c = key if content is None else content
        if key in self._hot:
            self._hot.discard(key)
        elif c in self.b1 or c in self.b2:
            self._adapt(c)
            self.b1.pop(c, None) or self.b2.pop(c, None)
            self._content[key] = c
        else:
            self._content[key] = c
            t1, b1, c = len(self.t1), len(self.b1), self.c
            if t1 + b1 >= c and b1:
                self.b1.popitem(last=False)
            elif t1 + len(self.t2) + b1 + len(self.b2) >= 2 * c and self.b2:
                self.b2.popitem(last=False)
            self.t1[key] = None
            self._pending = None
            return
        self._pending = None
        self.t2[key] = None

    def remove(self, key) -> None:
        if self.t1.pop(key, 0) is None or self.t2.pop(key, 0) is None:
            self._hot.add(key)

    def touch(self, key) -> None:
        if self.t1.pop(key, 0) is None:
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)

    def victim(self):
        t1 = len(self.t1)
        if t1 and (t1 > self.p or not self.t2 or (t1 == self.p and self._pending in self.b2)):
            key, _ = self.t1.popitem(last=False)
            self.b1[self._content.pop(key)] = None
        else:
            key, _ = self.t2.popitem(last=False)
            self.b2[self._content.pop(key)] = None
        return key

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)

    def __contains__(self, key) -> bool:
        return key in self.t1 or key in self.t2

    def __iter__(self):
        return iter([*self.t1, *self.t2])

    def check(self) -> None:
        lists = [set(self.t1), set(self.t2), self._hot]
        assert sum(map(len, lists)) == len(set().union(*lists)) == len(self._content), "a key in two ARC lists"
        assert not (self.b1.keys() & self.b2.keys()), "a ghost in both B1 and B2"
        assert not ((self.b1.keys() | self.b2.keys()) & set(self._content.values())), "a cached content is a ghost"
        assert 0 <= self.p <= max(self.c, 0), f"p {self.p} outside [0, {self.c}]"
