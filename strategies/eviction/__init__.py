"""Eviction policies: which cached unit a strategy frees next (issue 14).

A policy is a small object a strategy is built with (`strategy.eviction=lru|fifo|lfu|slru|arc|
s3fifo|belady`, or a `_target_` dict). It sees keys and access events only, never the pool:

- `insert(key, t=None, content=None)`: the key became evictable (it entered the cache, or its
  last user let go of it). `t`: the strategy's logical time of the key's last use, where that
  is not now (radix: a parent that turns into a leaf when its last child is evicted); only
  recency policies that accept out-of-order times use it. `content`: a hashable name of what
  the key holds, where a key can later hold something else (paged: a page id is reused after
  an eviction; its content is the page's chained hash): ghost lists and Belady's future use it
  (default: the key). `policy[key] = content` is `insert(key, content=content)`.
- `remove(key)`: the key is used again (a prefix hit, a lock): not evictable until the next
  `insert`. Its history (counts, segment) is kept. Unknown keys: no-op. `del policy[key]`: the
  same for an evictable key.
- `touch(key)`: an evictable key was used and stays evictable (paged's `dedup_touch`).
- `victim()`: removes and returns the evictable key to free next. The strategy frees it.
- `len()`, `in`, iteration: the evictable keys. `check()`: the policy's own invariants.

Keys are what the strategy frees: paged's cached page ids (content: the page hash), radix's
unlocked leaf nodes (radix evicts unlocked leaves only, whatever the policy; no content: a
prefix evicted and inserted again is a new node, so ghost lists never hit in radix).
The subscript spellings are what the hot path uses: LRU is an OrderedDict, so for it they are
dict operations with no Python frame (a page id keyed dict, as before the plug-in: keyed by
page hash, paged's release measured 25 % slower, dict locality). A policy that counts a capacity (SLRU's protected segment, ARC, S3-FIFO's small queue)
counts keys, told by `bind(capacity_keys)`.
"""
from __future__ import annotations

from kvbench.strategies.eviction.base import EvictionPolicy, make_policy

__all__ = ["EvictionPolicy", "make_policy"]
