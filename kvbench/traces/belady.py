"""The prefix hit rate a trace allows: unbounded, Belady-optimal and LRU at a capacity of C blocks.

Each strategy's measured hit rate means little alone; these bounds say what was possible.

The model (exact definitions; `block_references(..., outputs=False, last_token_computed=False)`
makes the unbounded case `analysis.prefix_reuse`, reuse among prompts):
- Blocks. A prompt is cut into blocks of `block_size` tokens (the last may be partial). A block
  is a node of a trie over blocks: it is the same block only after the same whole prefix, so
  the ids of a cached block are its prefix's ids, exactly (no hashes).
- What a request may take from the cache: the whole blocks of its first `prompt_len - 1`
  tokens (a server computes at least the last prompt token, for its logits: vLLM, SGLang and
  `Strategy.admit` alike). These are its *counted* references.
- What a request leaves in the cache: the K/V of every position it computed, i.e. its prompt
  and all but its last output token (`Request.kv_len` positions), in whole blocks: a multi-turn
  chat's next prompt repeats this output, and both paged (vLLM) and radix (SGLang) serve it
  from cache. Partial blocks are never kept (neither server shares a partly filled page).
- Order. Requests are served one at a time in arrival order (FCFS: a request's first admission
  comes after that of every earlier arrival, before that of every later one); the block
  references form one sequence: request 0's prompt blocks, then its output blocks, then request
  1's, ... (position = index there). Counted references' hits are the hit rate; the others
  (output, the last prompt block) only bring a block in (a hit there is the request's own work).
- Cache. At most C blocks are kept. A request's own blocks need not stay (a policy may decline
  to keep a block: "bypass"), so C is the memory set aside for reuse, not for running requests.
- Hits (the prefix property). A counted reference hits when the block *and every block before
  it in the prompt* are cached when the request arrives; the hit rate is hit references /
  prompt blocks (or hit tokens / prompt tokens).
- Belady (MIN with bypass). On a miss with a full cache, of the cached blocks and the new one,
  drop the one whose next *counted* reference is furthest away (never again, or an output
  reference first, which brings it back for free = infinitely far; ties go to the deepest
  block). A block's next counted reference is always preceded, in the same prompt, by counted
  references to all its ancestors, so an ancestor is always needed sooner than its
  descendants: the dropped block is a leaf, the cache stays prefix-closed, and every cached
  block referenced is a prefix hit. MIN maximises hits even without the prefix rule, which
  only removes hits, so this is the optimum over all policies, clairvoyant or not.
- LRU (what SGLang's radix cache does, without concurrency). All blocks of a request are
  touched at its arrival and kept; over capacity, the least recently used leaf goes first
  (ties: the deepest). A chain longer than the whole cache keeps only its first C blocks.

What bounds what: no server that caches whole pages of `block_size` tokens (paged, or radix
with that page size) and admits in arrival order can serve more prompt tokens from cache than
`unbounded_hits` at that block size; a smaller page can (bound it with a smaller block).
The Belady line is the best a cache of C blocks can do serving requests one at a time; a
server that overlaps requests is not bound by it exactly (a later request may find output
pages of an earlier one that is still running), only in practice.

Costs: O(R log R) for R block references (a heap with lazy deletion). Mooncake at 16-token
blocks: R = 3.86 M; building the references 23 s, Belady at 8192 / 65536 blocks 13 / 24 s
(CPython 3.11 on a loaded 2-core box); the report skips block sizes past 8 M references.
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
    depth: np.ndarray  # [R] int64 block index within its request (0 = first block)
    tokens: np.ndarray  # [R] int64 tokens in the block (block_size, or less for a prompt's last block)
    counted: np.ndarray  # [R] bool a prompt block (its hit counts); False: a block of output K/V
    starts: np.ndarray  # [N + 1] request i's references are [starts[i], starts[i+1])
    prompt_tokens: int  # all prompt tokens of the trace
    prompt_blocks: int  # ceil(prompt_len / block_size) summed over requests
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
    blocks: int  # prompt blocks, ceil(prompt_len / block_size) per request
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


def block_references(requests: Iterable[Request], block_size: int = 16, outputs: bool = True,
                     last_token_computed: bool = True) -> BlockRefs:
    """The block references of `requests` taken in arrival order (ties by id).

    Per request: its counted prompt blocks, then the whole blocks of the K/V it holds past them
    (`outputs`: prompt and output, all but the last output token; else the prompt only).
    `last_token_computed`: a server computes at least the last prompt token (it needs its
    logits), so only the whole blocks of the first `prompt_len - 1` tokens can hit, as in
    vLLM, SGLang and the strategy contract (`Strategy.admit`). Without it every prompt block
    counts, the partial last one too (a node of its own, hit only by the same partial run).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    trie: dict[tuple[int, bytes], int] = {}  # (parent node, block bytes) -> node; root is 0
    node, depth, tokens, counted, starts = [], [], [], [], [0]
    prompt_tokens = prompt_blocks = 0

    def ref(parent: int, ids: np.ndarray, i: int, is_prompt: bool) -> int:
        child = trie.setdefault((parent, ids.tobytes()), len(trie) + 1)
        node.append(child)
        depth.append(i)
        tokens.append(len(ids))
        counted.append(is_prompt)
        return child

    b = block_size
    for req in sorted(requests, key=lambda r: (r.arrival_s, r.id)):
        p = req.prompt_len
        prompt_tokens += p
        prompt_blocks += -(-p // b)
        whole = (p - 1) // b if last_token_computed else p // b  # counted whole blocks
        parent = 0
        for i in range(whole):
            parent = ref(parent, req.prompt[i * b:(i + 1) * b], i, True)
        if not last_token_computed and p % b:
            ref(parent, req.prompt[whole * b:], whole, True)  # a leaf: nothing hangs under it
        kv = req.tokens[:req.kv_len] if outputs else req.prompt  # [n] ids whose K/V it holds
        for i in range(whole, len(kv) // b):
            parent = ref(parent, kv[i * b:(i + 1) * b], i, False)
        starts.append(len(node))
    as_i64 = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return BlockRefs(as_i64(node), as_i64(depth), as_i64(tokens), np.asarray(counted, dtype=bool),
                     as_i64(starts), prompt_tokens, prompt_blocks, block_size)


def _count(refs: BlockRefs, policy: str, capacity: int | None, hit: np.ndarray) -> CacheHits:
    if (hit & ~refs.counted).any():
        raise AssertionError("internal: an output block was counted as a prompt hit")
    return CacheHits(policy, capacity, refs.block_size, int(hit.sum()), refs.prompt_blocks,
                     int(refs.tokens[hit].sum()), refs.prompt_tokens)


def unbounded_mask(refs: BlockRefs) -> np.ndarray:
    """[R] bool: which references hit a cache that keeps every block."""
    first = np.zeros(len(refs.node), dtype=bool)  # first reference of each node
    _, idx = np.unique(refs.node, return_index=True)
    first[idx] = True
    # a node's first reference is a miss; every later one hits (its ancestors were seen too)
    return refs.counted & ~first


def unbounded_hits(refs: BlockRefs) -> CacheHits:
    """Hits with a cache that keeps every block (with `outputs=False`, `analysis.prefix_reuse`)."""
    return _count(refs, "unbounded", None, unbounded_mask(refs))


def hit_tokens_per_request(refs: BlockRefs, hit: np.ndarray | None = None) -> np.ndarray:
    """[N] int64: prompt tokens each request (in arrival order) served from cache, given the
    [R] bool hits of a policy (default: the unbounded cache's)."""
    if hit is None:
        hit = unbounded_mask(refs)
    cum = np.concatenate([[0], np.cumsum(np.where(hit, refs.tokens, 0))])
    return cum[refs.starts[1:]] - cum[refs.starts[:-1]]


def next_use(refs: BlockRefs) -> np.ndarray:
    """[R] int64: position of the next counted reference to the same block, or R (never again,
    or an output reference comes first: it brings the block back for free)."""
    n = len(refs.node)
    order = np.argsort(refs.node, kind="stable")  # positions grouped by node, ascending
    nxt = np.full(n, n, dtype=np.int64)
    same = refs.node[order[1:]] == refs.node[order[:-1]]
    later = order[1:][same]
    nxt[order[:-1][same]] = np.where(refs.counted[later], later, n)
    return nxt


def belady_hits(refs: BlockRefs, capacity_blocks: int) -> CacheHits:
    """Hits under Belady's optimal eviction (MIN with bypass) with `capacity_blocks` blocks."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    nxt = next_use(refs)
    node, depth, counted = refs.node.tolist(), refs.depth.tolist(), refs.counted.tolist()
    cached: dict[int, int] = {}  # node -> its next use
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, node); stale entries skipped
    hit = np.zeros(len(node), dtype=bool)
    for r in range(len(node)):
        x, nu = node[r], int(nxt[r])
        if x in cached:  # prefix-closed cache (module docstring): the ancestors hit too
            hit[r] = counted[r] and (depth[r] == 0 or hit[r - 1])
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
    node, depth, counted = refs.node.tolist(), refs.depth.tolist(), refs.counted.tolist()
    cached: dict[int, int] = {}  # node -> request index of its last use
    heap: list[tuple[int, int, int]] = []  # (last use, -depth, node); stale entries skipped
    hit = np.zeros(len(node), dtype=bool)
    for i in range(len(refs.starts) - 1):
        lo, hi = int(refs.starts[i]), int(refs.starts[i + 1])
        r = lo
        while r < hi and counted[r] and node[r] in cached:  # the leading run of cached prompt blocks
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
