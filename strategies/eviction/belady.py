"""Belady's MIN as a runnable policy (offline): evict the evictable key whose next use is the
farthest in the future (never used again: first).

Offline assumption: the policy is built with the whole future, `future[rid]` = the keys request
`rid` can hit, in prefix order (for paged: the chained hashes of its prompt's full pages,
`paged_future`), and requests are served once each in increasing `rid` (arrival) order. The
strategy tells it each admitted request (`request(rid)`): from then on that request's uses are
past. A re-admission after a preemption is not in the future (it was not known offline). Ties
(the same next use): the deeper key first, since a page after it in the same chain is used
whenever it is (its hash depends on it), and evicting the earlier one would strand the later.
O(log n) per event; `request` re-ranks the admitted request's keys that are evictable.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

from kvbench.strategies.eviction.base import HeapPolicy


class Belady(HeapPolicy):
    name = "belady"
    offline = True
    tracks_requests = True

    def __init__(self, future: Mapping[int, Sequence[Hashable]] | None = None) -> None:
        super().__init__()
        self._uses: dict[Hashable, list[int]] = {}  # key → rids that can hit it, increasing
        self._depth: dict[Hashable, int] = {}
        self._future = dict(future or {})
        for rid in sorted(self._future):
            for depth, key in enumerate(self._future[rid]):
                self._uses.setdefault(key, []).append(rid)
                self._depth[key] = depth
        self.now = -1  # the last admitted request (its uses are past)
        self._tie = itertools.count()
        self._content: dict = {}  # key (evictable or in use) → its content
        self._holder: dict = {}  # content → the key that holds it

    def next_use(self, key: Hashable) -> float:
        """The first request after `now` that can hit `key`'s content (inf: none). Pure."""
        uses = self._uses.get(self._content.get(key, key))
        if not uses:
            return math.inf
        i = bisect.bisect_right(uses, self.now)
        return uses[i] if i < len(uses) else math.inf

    def _rank(self, key, t):
        return (-self.next_use(key), -self._depth.get(self._content.get(key, key), 0), next(self._tie))

    def insert(self, key, t=None, content=None) -> None:
        c = key if content is None else content
        self._content[key] = c
        self._holder[c] = key
        self._push(key)

    def _forget(self, key) -> None:
        self._holder.pop(self._content.pop(key), None)

    def request(self, rid: int) -> None:
        """Request `rid` was admitted: its uses are past. Mutates (re-ranks its evictable keys)."""
        if rid <= self.now:
            return
        self.now = rid
        live = self._live
        for c in self._future.get(rid, ()):
            key = self._holder.get(c)
            if key in live:
                self._push(key)

    def check(self) -> None:
        super().check()
        for key, rank in self._live.items():
            assert -rank[0] == self.next_use(key), f"stale next use for {key!r}"


def paged_future(requests: Iterable, page_size: int) -> dict[int, list[int]]:
    """For `Belady` in paged: request id → the chained hashes of the full pages it can hit
    (the first (num_prompt - 1) // page_size pages of its prompt, as paged's admit). `requests`:
    objects with `id`, `tokens` (int32 ids, prompt first) and `num_prompt` (or `prompt_len`). Pure."""
    from kvbench.strategies.paged import _ROOT_HASH, page_hash

    out = {}
    for r in requests:
        toks = np.asarray(r.tokens, dtype=np.int32)
        n = (int(getattr(r, "num_prompt", getattr(r, "prompt_len", 0))) - 1) // page_size
        h, keys = _ROOT_HASH, []
        for i in range(n):
            h = page_hash(h, toks[i * page_size:(i + 1) * page_size].tobytes())
            keys.append(h)
        out[int(r.id)] = keys
    return out
