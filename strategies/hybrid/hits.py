"""Which positions a layer group reads, and the prefix-hit rule per group kind (issue 16).

One place both hybrid pool designs and their tests use. A request that has computed `length`
positions computes position `length` next; a layer of each kind reads, for that query and every
later one:

    kind      reads for the query at `point`          a prefix hit of `point` tokens needs held
    full      [0, point]                               [0, point)            every earlier token
    sliding   [point - window + 1, point]              [point - window + 1, point)   (the last
                                                        window - 1 tokens: the query is the
                                                        window's last; vLLM's SlidingWindowManager)
    chunked   [point // chunk * chunk, point]          [point // chunk * chunk, point)   its chunk
    state     its recurrent state after point - 1      a snapshot of the state at `point`

so positions before `first_needed(group, length)` are never read again by that group: a design
may free their pages (out of window) as decoding goes on. A hit of `point` tokens is valid only
if EVERY group holds what it needs at that point (SGLang's and vLLM's hybrid rule): all earlier
pages for full layers, the window's pages for sliding ones, the chunk's for chunked ones, and a
state snapshot taken exactly at `point` for state layers (a design that keeps no snapshots can
only hit 0 tokens on a model with state layers).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from math import gcd

from kvbench.sizes import LayerGroup


def first_needed(group: LayerGroup, point: int) -> int:
    """First position a layer of `group` still reads once `point` positions are computed (the
    queries at `point` and after). Pure. A state group reads no positions: `point`."""
    if group.kind == "sliding":
        return max(0, point - group.window + 1)
    if group.kind == "chunked":
        return point // group.chunk * group.chunk
    if group.kind == "state":
        return point
    return 0


def hit_span(group: LayerGroup, point: int) -> tuple[int, int]:
    """Positions [lo, hi) whose K/V a group must hold for a prefix hit of `point` tokens. Pure.
    (A state group needs no positions but a snapshot at `point`: `needs_snapshot`.)"""
    return first_needed(group, point), point


def needs_snapshot(group: LayerGroup) -> bool:
    """True when a hit needs a state snapshot taken at the hit point (state layers)."""
    return group.kind == "state"


def pages_needed(group: LayerGroup, point: int, page_size: int) -> range:
    """Indices of the pages of `page_size` tokens that hold `hit_span(group, point)`. Pure."""
    lo, hi = hit_span(group, point)
    if hi <= lo:
        return range(0)
    return range(lo // page_size, -(-hi // page_size))


def peak_pages(group: LayerGroup, kv_len: int, page_size: int, step_tokens: int | None) -> int:
    """Most pages of `page_size` tokens that one request of `kv_len` positions holds at once in a
    table of `group` (full, sliding or chunked), when no single admit or grow gives it more than
    `step_tokens` positions (the scheduler's max_num_batched_tokens; None: no bound, a window is
    counted whole) and the table keeps only the pages from first_needed(length) on. Pure.

        a step from `length` to `length + C` (C <= step_tokens) holds the pages of positions
        [first_needed(length), length + C): with back = window - 1 (sliding) or chunk - 1
        (chunked), at most back + C positions, whose first lies `r` positions into its page:
        r <= page_size - 1 for a window (it starts anywhere), r <= page_size - gcd(chunk,
        page_size) for a chunk (it starts at a multiple of the chunk), so
            pages <= ceil((r_max + back + C) / page_size)
        (the maximum once the request is long enough), never more than ceil(kv_len / page_size).
    """
    whole = -(-kv_len // page_size)
    if step_tokens is None or group.kind not in ("sliding", "chunked"):
        return whole
    span = group.window if group.kind == "sliding" else group.chunk
    r_max = page_size - (1 if group.kind == "sliding" else gcd(span, page_size))
    return min(whole, -(-(r_max + span - 1 + step_tokens) // page_size))


def longest_hit(tables: Sequence[tuple[LayerGroup, int]], present: Callable[[int, int], bool], max_point: int,
                step: int, has_snapshot: Callable[[int], bool] | None = None) -> int:
    """The longest prefix hit `point` (a multiple of `step`, at most `max_point`) at which every
    table (group, page_size) holds its `pages_needed`, by `present(table_index, page_index)`
    (a page of the request's own ids is cached or held), and every state group has a snapshot
    there (`has_snapshot(point)`; None: no design snapshot, so a state group allows only 0).
    Pure. O(pages of the longest full-attention match + candidate points x tables).

    Every table may answer `present` in any order; each (table, page) is asked at most once."""
    states = [g for g, _ in tables if g.kind == "state"]
    attn = [(i, g, ps) for i, (g, ps) in enumerate(tables) if g.kind != "state"]
    if states and has_snapshot is None:
        return 0
    bound = max_point // step * step
    memo: dict[tuple[int, int], bool] = {}

    def ok(i: int, j: int) -> bool:
        key = (i, j)
        if key not in memo:
            memo[key] = present(i, j)
        return memo[key]

    for i, g, ps in attn:  # a full table bounds the hit by its first missing page
        if g.kind == "full":
            j = 0
            while (j + 1) * ps <= bound and ok(i, j):
                j += 1
            bound = min(bound, j * ps // step * step)
    point = bound
    while point > 0:
        if all(all(ok(i, j) for j in pages_needed(g, point, ps)) for i, g, ps in attn) and (
                not states or has_snapshot(point)):
            return point
        point -= step
    return 0
