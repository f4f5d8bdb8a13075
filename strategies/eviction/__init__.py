"""Eviction policies: which cached unit a strategy frees next (issue 14).

A policy is a small object a strategy is built with (`strategy.eviction=lru|fifo|lfu|slru|arc|
s3fifo|belady`, or a `_target_` dict). It sees keys and access events only, never the pool:

- `insert(key, t=None)`: the key became evictable (it entered the cache, or its last user let
  go of it). `t`: the strategy's logical time of the key's last use, where that is not now
  (radix: a parent that turns into a leaf when its last child is evicted); only recency
  policies that accept out-of-order times use it.
- `remove(key)`: the key is used again (a prefix hit, a lock): not evictable until the next
  `insert`. Its history (counts, segment) is kept. Unknown keys: no-op.
- `touch(key)`: an evictable key was used and stays evictable (paged's `dedup_touch`).
- `victim()`: removes and returns the evictable key to free next. The strategy frees it.
- `len()`, `in`, iteration: the evictable keys. `check()`: the policy's own invariants.

Keys are what the strategy caches: paged's chained page hash (it names the page's content: a
page id is reused for other ids after an eviction, so a ghost list of page ids would match the
wrong content), radix's unlocked leaf nodes (radix evicts unlocked leaves only, whatever the
policy). A policy that counts a capacity (SLRU's protected segment, ARC, S3-FIFO's small queue)
counts keys, told by `bind(capacity_keys)`.
"""
from __future__ import annotations

from kvbench.strategies.eviction.base import EvictionPolicy, make_policy

__all__ = ["EvictionPolicy", "make_policy"]
