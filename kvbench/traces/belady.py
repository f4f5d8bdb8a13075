"""The prefix hit rate a trace allows: unbounded, Belady-optimal and LRU at a capacity of C blocks.

Each strategy's measured hit rate means little alone; these bounds say what was possible.

The model (exact definitions; `analysis.prefix_reuse` is the unbounded case):
- Blocks. A prompt is cut into blocks of `block_size` tokens (the last may be partial). A block
  is a node of a trie over blocks: it is the same block only after the same whole prefix, so
  the ids of a cached block are its prefix's ids, exactly (no hashes).
- Order. Requests are served one at a time in arrival order; the block references form one
  sequence: request 0's blocks in prompt order, then request 1's, ... (position = index there).
- Cache. At most C blocks are kept. A request's own blocks need not stay (a policy may decline
  to keep a block: "bypass"), so C is the memory set aside for reuse, not for running requests.
- Hits (the prefix property). A block reference hits when the block *and every block before it
  in the prompt* are cached when the request arrives; the hit rate is hit references /
  references (or hit tokens / prompt tokens).
- Belady (MIN with bypass). On a miss with a full cache, of the cached blocks and the new one,
  drop the one whose next reference is furthest away (never again = infinitely far; ties go to
  the deepest block). A block's next reference is always preceded, in the same request, by
  references to all its ancestors, so an ancestor is always needed sooner than its
  descendants: the dropped block is a leaf, the cache stays prefix-closed, and every cached
  block referenced is a prefix hit. MIN maximises hits even without the prefix rule, which
  only removes hits, so this is the optimum over all policies, clairvoyant or not.
- LRU (what SGLang's radix cache does, without concurrency). All blocks of a request are
  touched at its arrival and kept; over capacity, the least recently used leaf goes first
  (ties: the deepest). A chain longer than the whole cache keeps only its first C blocks.

Costs: O(R log R) for R block references (a heap with lazy deletion; R is 3.8 M for Mooncake
at 16-token blocks, a few seconds).
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from kvbench.request import Request


class BlockRefs(NamedTuple):
    """Every block reference of a trace, in serving order."""

    node: np.ndarray  # [R] int64 trie node of the reference (1..num_blocks)
    depth: np.ndarray  # [R] int64 block index within its prompt (0 = first block)
    tokens: np.ndarray  # [R] int64 tokens in the block (block_size, or less for a last block)
    starts: np.ndarray  # [N + 1] request i's references are [starts[i], starts[i+1])
    block_size: int

    @property
    def num_blocks(self) -> int:
        """Distinct blocks (trie nodes)."""
        return int(self.node.max()) if len(self.node) else 0


class CacheHits(NamedTuple):
    policy: str  # unbounded | belady | lru
    capacity_blocks: int | None  # None = unbounded
    block_size: int
    hit_blocks: int
    blocks: int
    hit_tokens: int
    prompt_tokens: int

    @property
    def block_hit_rate(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def row(self) -> dict:
        return {**self._asdict(), "block_hit_rate": self.block_hit_rate, "token_hit_rate": self.token_hit_rate}


def block_references(requests: Iterable[Request], block_size: int = 16) -> BlockRefs:
    """The block references of `requests` taken in arrival order (ties by id)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    trie: dict[tuple[int, bytes], int] = {}  # (parent node, block bytes) -> node; root is 0
    node, depth, tokens, starts = [], [], [], [0]
    for req in sorted(requests, key=lambda r: (r.arrival_s, r.id)):
        prompt = req.prompt  # [prompt_len] int32
        parent = 0
        for i, start in enumerate(range(0, len(prompt), block_size)):
            chunk = prompt[start:start + block_size]
            parent = trie.setdefault((parent, chunk.tobytes()), len(trie) + 1)
            node.append(parent)
            depth.append(i)
            tokens.append(len(chunk))
        starts.append(len(node))
    as_i64 = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return BlockRefs(as_i64(node), as_i64(depth), as_i64(tokens), as_i64(starts), block_size)


def _count(refs: BlockRefs, policy: str, capacity: int | None, hit: np.ndarray) -> CacheHits:
    return CacheHits(policy, capacity, refs.block_size, int(hit.sum()), len(hit),
                     int(refs.tokens[hit].sum()), int(refs.tokens.sum()))


def unbounded_hits(refs: BlockRefs) -> CacheHits:
    """Hits with a cache that keeps every block (equals `analysis.prefix_reuse`)."""
    first = np.zeros(len(refs.node), dtype=bool)  # first reference of each node
    _, idx = np.unique(refs.node, return_index=True)
    first[idx] = True
    # a node's first reference is a miss; every later one hits (its ancestors were seen too)
    return _count(refs, "unbounded", None, ~first)


def next_use(refs: BlockRefs) -> np.ndarray:
    """[R] int64: position of the next reference to the same block, or R (never again)."""
    n = len(refs.node)
    order = np.argsort(refs.node, kind="stable")  # positions grouped by node, ascending
    nxt = np.full(n, n, dtype=np.int64)
    same = refs.node[order[1:]] == refs.node[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def belady_hits(refs: BlockRefs, capacity_blocks: int) -> CacheHits:
    """Hits under Belady's optimal eviction (MIN with bypass) with `capacity_blocks` blocks."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    nxt = next_use(refs)
    node, depth = refs.node.tolist(), refs.depth.tolist()
    cached: dict[int, int] = {}  # node -> its next use
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, node); stale entries skipped
    hit = np.zeros(len(node), dtype=bool)
    for r in range(len(node)):
        x, nu = node[r], int(nxt[r])
        if x in cached:  # prefix-closed cache (module docstring): the ancestors hit too
            hit[r] = depth[r] == 0 or hit[r - 1]
        elif len(cached) >= capacity_blocks:
            while heap and cached.get(heap[0][2]) != -heap[0][0]:
                heapq.heappop(heap)
            if not heap or (-heap[0][0], -heap[0][1]) <= (nu, depth[r]):
                continue  # the new block is needed last: bypass it
            del cached[heapq.heappop(heap)[2]]
        cached[x] = nu
        heapq.heappush(heap, (-nu, -depth[r], x))
    return _count(refs, "belady", capacity_blocks, hit)


def lru_hits(refs: BlockRefs, capacity_blocks: int) -> CacheHits:
    """Hits under LRU eviction of leaves with `capacity_blocks` blocks (see module docstring)."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    node, depth = refs.node.tolist(), refs.depth.tolist()
    cached: dict[int, int] = {}  # node -> request index of its last use
    heap: list[tuple[int, int, int]] = []  # (last use, -depth, node); stale entries skipped
    hit = np.zeros(len(node), dtype=bool)
    for i in range(len(refs.starts) - 1):
        lo, hi = int(refs.starts[i]), int(refs.starts[i + 1])
        r = lo
        while r < hi and node[r] in cached:  # the leading run of cached blocks
            hit[r] = True
            r += 1
        for r in range(lo, hi):
            x = node[r]
            if x not in cached and len(cached) >= capacity_blocks:
                while heap and cached.get(heap[0][2]) != heap[0][0]:
                    heapq.heappop(heap)
                if not heap or heap[0][0] == i:
                    break  # only this request's blocks are left: keep its first C blocks
                del cached[heapq.heappop(heap)[2]]
            cached[x] = i
            heapq.heappush(heap, (i, -depth[r], x))
    return _count(refs, "lru", capacity_blocks, hit)


def hit_rate_bounds(requests: Iterable[Request], block_size: int, capacities: Iterable[int]) -> list[CacheHits]:
    """Unbounded, then Belady and LRU at each capacity (in blocks)."""
    refs = block_references(requests, block_size)
    rows = [unbounded_hits(refs)]
    for c in capacities:
        rows += [belady_hits(refs, int(c)), lru_hits(refs, int(c))]
    return rows
