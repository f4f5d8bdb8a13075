"""S3-FIFO (Yang et al., SOSP 2023): a small FIFO S (`small` = 10 % of the capacity), a main
FIFO M and a ghost FIFO G of keys evicted from S (as many as M can hold). A new key enters S,
or M if G remembers it. A use (`remove`, `touch`) adds one to the key's 2-bit count (at most
3); a use never moves a key. To evict: from S while |S| >= its share (or M is empty): S's
oldest key moves to M if it was used since it entered (count >= 1, libCacheSim's
move-to-main threshold), else it is evicted into G; from M: the oldest key with count 0 is
evicted, older ones with a count go back to M's head with count - 1 (a CLOCK).

A key in use stays in its queue (as in a cache where hits do not move objects) but cannot be
evicted: met at S's end it moves to M, met at M's end it goes back to M's head (as a used key
does). Amortized O(1) per event."""
from __future__ import annotations

from collections import OrderedDict

from kvbench.strategies.eviction.base import EvictionPolicy


class S3FIFO(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, small: float = 0.1) -> None:
        if not 0 < small < 1:
            raise ValueError(f"s3fifo small must be in (0, 1), got {small}")
        self.small = float(small)
        self._s_cap, self._g_cap = 1, 1
        self.s: OrderedDict = OrderedDict()  # key → count, oldest first (in use or evictable)
        self.m: OrderedDict = OrderedDict()
        self.g: OrderedDict = OrderedDict()  # ghosts, oldest first
        self._busy: set = set()  # keys in S or M that are in use
        self._busy_m = 0  # of them, in M
        self._content: dict = {}  # key in S or M → its content (G holds contents)

    def bind(self, capacity_keys: int) -> None:
        self._s_cap = max(1, int(self.small * capacity_keys))
        self._g_cap = max(1, int(capacity_keys) - self._s_cap)

    def insert(self, key, t=None, content=None) -> None:
        c = key if content is None else content
        if key in self._busy:
            self._busy.discard(key)
            self._busy_m -= key in self.m
        elif c in self.g:
            del self.g[c]
            self.m[key] = 0
            self._content[key] = c
        elif key not in self.s and key not in self.m:
            self.s[key] = 0
            self._content[key] = c

    def _use(self, key) -> bool:
        for q in (self.s, self.m):
            if key in q:
                q[key] = min(q[key] + 1, 3)
                return True
        return False

    def remove(self, key) -> None:
        if key not in self._busy and self._use(key):
            self._busy.add(key)
            self._busy_m += key in self.m

    def touch(self, key) -> None:
        if key not in self._busy:
            self._use(key)

    def victim(self):
        s, m, busy = self.s, self.m, self._busy
        while True:
            if s and (len(s) >= self._s_cap or len(m) == self._busy_m):
                key, count = s.popitem(last=False)
                if count >= 1 or key in busy:  # used since it entered, or in use: to M
                    m[key] = 0
                    self._busy_m += key in busy
                    continue
                self.g[self._content.pop(key)] = None
                if len(self.g) > self._g_cap:
                    self.g.popitem(last=False)
                return key
            key, count = m.popitem(last=False)
            if count or key in busy:
                m[key] = max(count - 1, 0)
                continue
            del self._content[key]
            return key

    def __len__(self) -> int:
        return len(self.s) + len(self.m) - len(self._busy)

    def __contains__(self, key) -> bool:
        return (key in self.s or key in self.m) and key not in self._busy

    def __iter__(self):
        return iter([k for q in (self.s, self.m) for k in q if k not in self._busy])

    def check(self) -> None:
        assert not (self.s.keys() & self.m.keys()), "a key in both S and M"
        assert self._busy <= (self.s.keys() | self.m.keys()), "a key in use is in no queue"
        assert self._busy_m == len(self._busy & self.m.keys()), "count of keys in use in M"
        assert self._content.keys() == self.s.keys() | self.m.keys(), "content of the cached keys"
        assert not (self.g.keys() & set(self._content.values())), "a cached content is a ghost"
