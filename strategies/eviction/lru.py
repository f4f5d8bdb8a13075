"""LRU: evict the key least recently used (kvbench's original behaviour, bit for bit).

`LRU` (the host tier's default; paged's plain LRU is `PageLRU` below): an OrderedDict in event
order, O(1) per event; the key that became evictable or was touched last is most recent. Its
verbs are OrderedDict's own C methods where they can be (`lru[key] = t` is the dict subscript),
so the hot path pays no Python call for them.
`TimedLRU` (radix): recency by the strategy's logical time `t` (a parent that turns into a leaf
keeps its old last-use time, so it is not most recent), a heap with lazy deletion (O(log n));
ties by insertion order.
`PageLRU` (paged, plain LRU): the same order as `LRU`, kept as a FIFO list of keys with lazy
deletion, so that a strategy can take or add many keys in one C-level list operation (a slice,
an extend) instead of one dict operation each.
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


class PageLRU(EvictionPolicy):
    """Evictable keys, least recently used first, in the order `LRU` gives: a list `q` of keys
    in insertion order from `head` on, with lazy deletion. `remove` and `touch` leave the key's
    entry in place and count it in `dead` (key → its stale entries at or after `head`; a key's
    stale entries always come before its live one, so the first ones met are the stale ones).
    While `dead` is empty (no key removed or touched since the scan passed its entries), the
    first k evictable keys are `q[head:head + k]`. O(1) amortized per event; the list is cut
    when its dead front is more than half of it, and rebuilt from its live keys when stale
    entries are more than half of the rest (hits that revive pages while nothing is evicted), so
    it never holds more than about twice the evictable keys plus `cut_at`.

    The caller keeps one promise the OrderedDict does not need: `remove` and `touch` are called
    only for evictable keys, and `insert` only for keys that are not (paged: a page is evictable
    exactly while it is cached, ref 0 and hashed). `in` and iteration walk the list: O(n), for
    checks and tests. Mutating verbs: insert, extend, remove, touch, victim, take."""

    name = "lru"
    offline = False
    __slots__ = ("q", "head", "n", "dead", "cut_at")

    def __init__(self) -> None:
        self.q: list = []  # keys in insertion order; q[:head] are gone (evicted, or skipped stale)
        self.head = 0
        self.n = 0  # evictable keys
        self.dead: dict = {}  # key → its stale entries in q[head:]
        self.cut_at = 4096  # the dead front is cut once it is this long and half the list

    def insert(self, key, t=None, content=None) -> None:
        self.extend((key,))

    def __setitem__(self, key, content) -> None:
        self.extend((key,))

    def extend(self, keys) -> None:
        """Each key of `keys` became evictable, in this order (most recent last). Mutates."""
        q, head = self.q, self.head
        if head > self.cut_at and head > len(q) >> 1:  # cut the dead front: O(1) amortized per entry
            del q[:head]
            self.head = head = 0
        if len(q) - head > 2 * self.n + self.cut_at:  # mostly stale entries: keep the live ones, in order
            q[:] = list(self)
            self.head = 0
            self.dead.clear()
        n = len(q)
        q.extend(keys)
        self.n += len(q) - n

    def remove(self, key) -> None:
        self.dead[key] = self.dead.get(key, 0) + 1
        self.n -= 1

    def touch(self, key) -> None:
        self.dead[key] = self.dead.get(key, 0) + 1
        self.q.append(key)

    def victim(self):
        return self.take(1)[0]

    def take(self, k: int) -> list:
        """Remove and return the k least recently used keys (k <= len), first first. Mutates."""
        q, head, dead = self.q, self.head, self.dead
        self.n -= k
        if not dead:
            self.head = head + k
            return q[head:head + k]
        out = []
        while len(out) < k:
            key = q[head]
            head += 1
            c = dead.get(key)
            if c is None:
                out.append(key)
            elif c == 1:
                del dead[key]
            else:
                dead[key] = c - 1
        self.head = head
        return out

    def live(self):
        """The keys in the order `take` would give them, without taking: a generator over the
        list (only read), to be stopped where enough were seen."""
        q, dead, used = self.q, self.dead, {}
        for x in range(self.head, len(q)):
            key = q[x]
            if dead:
                c = dead.get(key)
                if c is not None and used.get(key, 0) < c:  # (a stale entry: `take` skips it)
                    used[key] = used.get(key, 0) + 1
                    continue
            yield key

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        view = PageLRU()  # (take on a copy of the scan state: the list itself is only read)
        view.q, view.head, view.n, view.dead = self.q, self.head, self.n, dict(self.dead)
        return iter(view.take(self.n))

    def __contains__(self, key) -> bool:
        return key in set(self)

    def check(self) -> None:
        live = list(self)
        assert len(live) == self.n == len(set(live)), f"{self.n} evictable keys counted, {len(live)} live entries"
        q = self.q[self.head:]
        assert all(q.count(k) >= c for k, c in self.dead.items()) and all(self.dead.values()), "stale counts"


class TimedLRU(HeapPolicy):
    """Evictable keys, least recent `t` first (t: the strategy's clock at the key's last use)."""

    name = "lru"

    def _rank(self, key, t):
        return t

    def insert(self, key, t=None, content=None) -> None:  # (inlined _push: radix's unlock path)
        self._live[key] = t
        heapq.heappush(self._heap, (t, next(self._seq), key))
