"""A bounded host-memory tier behind a prefix-caching strategy's GPU pool (issue 14; SGLang's
HiCache, vLLM's offloading connector, TensorRT-LLM's host offload).

    GPU pool:  [in use][cached][free]          evict a cached page ──d2h──► host pool
    host pool: [cached][free]                   a later prefix hit on it ──h2d──► a new GPU page

`HostPool` holds only what both strategies share: `num_pages` host pages of `page_size` token
slots (ids 0 .. num_pages-1, a stack of free ones), the host eviction policy (an injectable
policy of strategies/eviction/; its keys are the strategy's: paged's page hashes, radix's
host-resident leaf nodes), and the record of moves. What each host page holds (a page hash and
its ids, a tree node) is the strategy's.

Policy events: `insert` when content lands on the host (or a radix node turns into a host
leaf), `victim` to drop one, `remove` when content leaves the host otherwise (loaded back by a
hit, or superseded by a GPU copy): for the policy that is a use, as a GPU hit is, so a content
that comes back to the host later keeps its history (LFU's count, S3-FIFO's queue). Keys are
contents, not host page ids, for that reason (a host page id is reused for other content).
A content dropped other than as the host's victim (rare: demoted while every host page is
pinned by a loading admission, or a radix node larger than the host pool and its host subtree)
keeps its entry in the policy's history (for S3-FIFO, a key in use): the policy contract has no
verb to forget a key.

Rules (the strategies' `check_invariants` verify them):
- A cached page's content lives in exactly one tier. A page loaded back to the GPU frees its
  host copy at once (no clean copy is kept: an evicted-again page is copied out again), and a
  GPU page that registers content the host holds (a request recomputed it) drops the host copy.
- Moves are whole pages. In the simulation a copy completes within the step that needs it:
  nothing is ever "in flight" between steps, so the slot states of both pools are exact after
  every call; the scheduler charges the step for `take_moves()`'s token counts.
- Costs: a page move, a take and a give are O(1) plus the policy's cost; nothing is sized by the
  host pool up front (a stack of returned pages, then the next fresh id, as the GPU pool does).
"""
from __future__ import annotations

from array import array

from kvbench.strategies.eviction import EvictionPolicy, make_policy

#: host eviction policies: online ones that need no request tracking
HOST_POLICIES = ("lru", "fifo", "lfu", "slru", "arc", "s3fifo")


def host_pages_for(host_tier_tokens: int, page_size: int, who: str) -> int:
    """Host pages of a tier of `host_tier_tokens` token slots (whole pages); raises ValueError on
    a negative size. Pure."""
    if int(host_tier_tokens) < 0:
        raise ValueError(f"{who} host_tier_tokens must be >= 0, got {host_tier_tokens}")
    if 0 < int(host_tier_tokens) < page_size:
        raise ValueError(f"{who} host_tier_tokens={host_tier_tokens} is less than one page ({page_size} tokens): "
                         f"use 0 (off) or at least {page_size}")
    return int(host_tier_tokens) // page_size


class HostPool:
    """Host pages, their eviction policy, and the moves since the last `take_moves`.

    Mutating verbs: take, give, d2h, h2d, take_moves, take_copies. Counters (never reset):
    d2h_tokens, h2d_tokens, evicted_pages (host pages dropped by the host policy)."""

    def __init__(self, num_pages: int, page_size: int, eviction: str = "lru",
                 policy: EvictionPolicy | None = None) -> None:
        if eviction not in HOST_POLICIES:
            raise ValueError(f"host_tier_eviction must be one of {', '.join(HOST_POLICIES)}, got {eviction!r}")
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self.policy: EvictionPolicy = policy if policy is not None else make_policy(eviction)  # (radix: TimedLRU)
        self.policy.bind(self.num_pages)
        self.eviction = self.policy.name
        self._free = array("l")  # a stack of returned host pages (most recent on top)
        self._fresh = self.num_pages  # the last _fresh ids were never handed out (free)
        self.d2h_tokens = self.h2d_tokens = self.evicted_pages = 0
        self._moved = [0, 0]  # (d2h, h2d) tokens since take_moves
        self._copies: list[tuple[str, int, int]] = []  # ("d2h", gpu, host) / ("h2d", host, gpu), in order

    # ---- pure --------------------------------------------------------------------------------
    def free_pages(self) -> int:
        return len(self._free) + self._fresh

    # ---- mutating ------------------------------------------------------------------------------
    def take(self) -> int:
        """A free host page: a returned one, else the next fresh id (the caller made room first)."""
        if self._free:
            return self._free.pop()
        self._fresh -= 1
        return self.num_pages - self._fresh - 1

    def take_many(self, k: int) -> list[int]:
        """k free host pages in the order k `take` calls give them, in bulk (one slice of the
        stack, one range of fresh ids); the caller made room first."""
        free = self._free
        r = min(k, len(free))
        out = free[len(free) - r:].tolist()
        del free[len(free) - r:]
        out.reverse()
        if k > r:
            first = self.num_pages - self._fresh
            self._fresh -= k - r
            out.extend(range(first, first + k - r))
        return out

    def give(self, hp: int) -> None:
        """Host page `hp` holds nothing any more."""
        self._free.append(hp)

    def give_many(self, hps) -> None:
        """`give` of each of `hps`, in order."""
        self._free.extend(hps)

    def d2h(self, gpu_page: int, host_page: int) -> None:
        """Record a copy of one GPU page into a host page (its content now lives on the host)."""
        self._moved[0] += self.page_size
        self.d2h_tokens += self.page_size
        self._copies.append(("d2h", gpu_page, host_page))

    def d2h_many(self, gpu_pages: list[int], host_pages: list[int]) -> None:
        """`d2h` of each pair, in order, in bulk."""
        n = len(gpu_pages) * self.page_size
        self._moved[0] += n
        self.d2h_tokens += n
        self._copies.extend(zip(["d2h"] * len(gpu_pages), gpu_pages, host_pages))

    def h2d_many(self, host_pages: list[int], gpu_pages: list[int]) -> None:
        """`h2d` of each pair, in order, in bulk."""
        n = len(gpu_pages) * self.page_size
        self._moved[1] += n
        self.h2d_tokens += n
        self._copies.extend(zip(["h2d"] * len(gpu_pages), host_pages, gpu_pages))

    def h2d(self, host_page: int, gpu_page: int) -> None:
        """Record a copy of one host page back into a GPU page."""
        self._moved[1] += self.page_size
        self.h2d_tokens += self.page_size
        self._copies.append(("h2d", host_page, gpu_page))

    def take_moves(self) -> tuple[int, int]:
        """(d2h_tokens, h2d_tokens) since the last call; the copy log is handed over too."""
        moved, self._moved = self._moved, [0, 0]
        self._copies = []
        return moved[0], moved[1]

    def take_copies(self) -> list[tuple[str, int, int]]:
        """The page copies since the last call, in the order they must run ("d2h", gpu, host) /
        ("h2d", host, gpu): the content model applies them; an engine with a real host pool would."""
        copies, self._copies = self._copies, []
        return copies

    def check(self, owned: set[int]) -> None:
        """Raise AssertionError unless the host pages are exactly `owned` (by the strategy's
        content map) plus the free ones, each once, and the policy is consistent. Pure."""
        free, used = set(self._free), self.num_pages - self._fresh  # ids >= used: fresh
        assert len(free) == len(self._free), "a host page is twice in the free list"
        assert not (free & owned), f"host pages both free and holding content: {sorted(free & owned)[:5]}"
        assert all(0 <= hp < used for hp in free | owned), "a fresh host page is free-listed or holds content"
        assert len(free) + len(owned) == used, (
            f"host pages: {len(owned)} hold content + {len(free)} returned != {used} handed out")
        self.policy.check()
