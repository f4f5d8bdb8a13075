"""What the scheduler hands an engine each step: which tokens to run, and where their K/V live."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kvbench.request import Request

_new_object = object.__new__


class KVReadGroups(NamedTuple):
    """What a step's K/V read count needs of a model whose layers do not all read the whole
    context (issue 16: sliding-window and chunked attention). Built once per run by `of` (from
    the run's `kvbench.sizes.PoolGeometry`); None where every attention layer reads the whole
    context (every Llama/Qwen yaml, and a model whose only attention is full: the count is then
    the plain one, and a step pays nothing for this).

    A request whose last query sits at context length c reads, in group g, `positions(g, c)`:
    c (full), min(c, window) (sliding: the window includes the query), (c - 1) % chunk + 1
    (chunked: the query's own chunk), 0 (state layers: no K/V per token). Weighted by the
    group's share of the model's K/V bytes per token, summed over groups and the step's
    requests, and rounded to the nearest whole position once per step, that is the step's
    `kv_read_tokens` in positions of the whole model's K/V: `kv_read_token_s` keeps its meaning.
    """

    bytes_per_token: int  # the model's K/V bytes per token (the sum over groups)
    full_bytes: int  # K/V bytes per token of the full-attention groups together
    windowed: tuple[tuple[int, int, int], ...]  # (bytes per token, window, chunk) per sliding / chunked group

    @classmethod
    def of(cls, groups) -> KVReadGroups | None:
        """From `LayerGroup`s (kvbench.sizes); None when no attention group is windowed or chunked."""
        windowed = tuple((g.bytes_per_token, g.window, g.chunk) for g in groups
                         if g.kind in ("sliding", "chunked") and g.bytes_per_token)
        if not windowed:
            return None
        return cls(sum(g.bytes_per_token for g in groups),
                   sum(g.bytes_per_token for g in groups if g.kind == "full"), windowed)

    def read(self, contexts) -> int:
        """K/V positions (whole-model equivalents, rounded half up) read by requests whose last
        queries sit at context lengths `contexts` (ints >= 1)."""
        total = self.full_bytes * sum(contexts)
        for b, window, chunk in self.windowed:
            if window:
                total += b * sum(c if c < window else window for c in contexts)
            else:
                total += b * sum((c - 1) % chunk + 1 for c in contexts)
        return (2 * total + self.bytes_per_token) // (2 * self.bytes_per_token)

    def pairs(self, chunks) -> int:
        """Causal query-key pairs (whole-model equivalents, rounded half up) of prefill chunks
        `chunks` = (p, n): queries at positions p..p+n-1, each over what its group's attention
        reads at context q + 1 (`read`'s rule), weighted as `read` weights, in O(1) per chunk."""
        full = sum(n * p + n * (n + 1) // 2 for p, n in chunks)
        total = self.full_bytes * full
        for b, window, chunk in self.windowed:
            if window:  # sum over contexts c in (p, p + n] of min(c, window)
                f = lambda m: m * (m + 1) // 2 if m <= window else window * (window + 1) // 2 + (m - window) * window  # noqa: E731
            else:  # sum over contexts c in (p, p + n] of (c - 1) % chunk + 1
                f = lambda m: (m // chunk) * chunk * (chunk + 1) // 2 + (m % chunk) * (m % chunk + 1) // 2  # noqa: E731
            total += b * sum(f(p + n) - f(p) for p, n in chunks)
        return (2 * total + self.bytes_per_token) // (2 * self.bytes_per_token)


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step: the per-request event every metric derives from.

    The step feeds tokens `token_ids[start : start + num_new]` (a prefill chunk, or one decode
    token). Before the step, positions `[0, start)` hold computed K/V (some of them served from
    a prefix cache); after it, `[0, start + num_new)` do, and when `emits` the step produces the
    request's output token number `start + num_new - prompt_len`.

    `is_decode`: one new token of a request that has computed everything it had to recompute
    (its prompt, plus its outputs after a preemption). The last 1-token chunk of a recompute is
    not a decode (it recomputes K/V of a token that exists), although it emits. The scheduler
    sets both flags; a batch built by hand (no preemptions) gets them from the prompt length.
    """

    request: Request
    start: int
    num_new: int
    page_table: np.ndarray | None  # [ceil((start + num_new) / page_size)] int32; None if not asked for
    emits: bool | None = None  # None: set by StepBatch from the prompt length
    is_decode: bool | None = None  # None: set by StepBatch from the prompt length

    @property
    def emits_token(self) -> bool:
        """True when this step produces a new output token (the last prefill chunk, or a decode)."""
        return self.emits


class PlannedSeqs:
    """A planned step's `ScheduledSeq`s, made only where read (`StepBatch.seqs` of the batches
    the replay hands a sim engine: no engine and no recorder reads them there, so a step costs no
    object per request). `rows` is the scheduler's plan: (request's progress, positions to
    compute) pairs, the progress read as it stands before the step runs (`.request`, `.computed`:
    the row's start, `.prefill_target`: the row emits where start + positions reach it, and is a
    decode where start does). `seal` (the replay, before the scheduler advances the progress):
    the rows are no longer read; a read of the seqs after it that was not made before raises
    (it would read the progress after the step); its length stays. A read-only sequence: len,
    iteration, index, == (as a list)."""

    __slots__ = ("rows", "made", "n")

    def __init__(self, rows: list) -> None:
        self.rows, self.made, self.n = rows, None, len(rows)  # made: the ScheduledSeqs, once read

    def __len__(self) -> int:
        return self.n

    def _make(self) -> list[ScheduledSeq]:
        made = self.made
        if made is None:
            if self.rows is None:
                raise RuntimeError("a step's seqs read after the step ran (PlannedSeqs.seal): read them before")
            new = ScheduledSeq
            made = self.made = [new(s.request, c, n, None, c + n >= (t := s.prefill_target), c >= t)
                                for s, n in self.rows if (c := s.computed) is not None]
        return made

    def __iter__(self):
        return iter(self._make())

    def __getitem__(self, i):
        return self._make()[i]

    def __eq__(self, other) -> bool:  # (as the list of its seqs)
        if isinstance(other, PlannedSeqs):
            other = other._make()
        return self._make() == other if isinstance(other, list) else NotImplemented

    __hash__ = None

    def seal(self) -> None:
        """The step ran: its rows' progress moves on (later reads raise unless made before)."""
        if self.made is None:
            self.rows = None


class RunSeqs(PlannedSeqs):
    """`PlannedSeqs` of a step a quiet run takes with an admission (kvbench.replay `admit_step`):
    `rows` is (the run's live requests, each decoding the position computed + j, j, the
    scheduler's plan of the admitted requests), made only where read, sealed as PlannedSeqs is."""

    __slots__ = ()

    def __init__(self, seqs: list, j: int, planned: list) -> None:
        self.rows, self.made, self.n = (seqs, j, planned), None, len(seqs) + len(planned)

    def _make(self) -> list[ScheduledSeq]:
        made = self.made
        if made is None:
            if self.rows is None:
                raise RuntimeError("a step's seqs read after the step ran (PlannedSeqs.seal): read them before")
            seqs, j, planned = self.rows
            new = ScheduledSeq
            made = [new(s.request, s.computed + j, 1, None, True, True) for s in seqs]
            made += [new(s.request, c, n, None, c + n >= (t := s.prefill_target), c >= t) for s, n in planned
                     if (c := s.computed) is not None]
            self.made = made
        return made


@dataclass(slots=True, frozen=True)
class SwapOut:
    """Preemption by swap: the victim's positions [0, tokens) leave the pool for host memory.
    `pages` [ceil(tokens / page_size)] int32 are its pages as it held them (released since: the
    engine copies them out before anything else in the step writes into the pool)."""

    rid: int
    pages: np.ndarray
    tokens: int


@dataclass(slots=True, frozen=True)
class SwapIn:
    """A swapped request re-admitted: its host copy's positions [start, start + tokens) go back
    into `pages` [ceil((start + tokens) / page_size)] int32, its page table now (positions below
    `start` were served from the GPU's prefix cache; `tokens` is 0 when the cache served all of
    it). The host copy is dropped after."""

    rid: int
    pages: np.ndarray
    start: int
    tokens: int


@dataclass(slots=True)
class StepBatch:
    """A flattened variable-length batch: prefill chunks and decode tokens mixed.

    Pool geometry: `num_pages x page_size` token slots per layer; token i of a request lives in
    slot `page_table[i // page_size] * page_size + i % page_size`. `contiguous` is True when
    every request's pages are consecutive (slab), so kernels may take their contiguous path.
    `copies` lists (src_page, dst_page) copy-on-write copies the engine must do before the step.

    Host moves (issue 14): `d2h_tokens` / `h2d_tokens` are the token slots whose K/V the step
    moves device -> host / host -> device (preemption by swap, plus the strategy's host tier);
    the sim charges their bytes, serialized with the step. `swap_out` / `swap_in` name the swap
    moves' pages (for an engine that really copies; the host tier's pages are the strategy's).
    `host_copies` are the host tier's page copies, in order: ("d2h", gpu_page, host_page) /
    ("h2d", host_page, gpu_page) (filled only for engines that read the layout). An engine makes
    them all before the forward, in this order: swap-outs, host-tier copies, copy-on-write
    copies, swap-ins (a page released by a swap-out, or evicted to the host, may be taken again
    in the same step; swap-outs and swap-ins never share a step: the scheduler admits nobody in
    a step that preempts).

    The step's token counts (the cost model's inputs, the timeline's columns) are counted here
    once, from the seqs' `is_decode` flags: `decode_tokens` decode tokens, `prefill_tokens` the
    rest, `kv_read_tokens` K/V positions attention reads (a chunk of n after a prefix of p reads
    p + n, the last query's context, in every layer). With `kv_read_groups` (a model with
    sliding-window or chunked layers: `KVReadGroups`) each layer group reads only what its
    attention reads, weighted by its share of the model's K/V bytes, and the count is in
    positions of the whole model's K/V (rounded once per step). `prefill_pairs`: the causal
    query-key pairs the step's prefill rows (every row that is not a decode) compute, a chunk of
    n after a prefix of p: n p + n (n + 1) / 2 (with `kv_read_groups`: `KVReadGroups.pairs`);
    0 in a decode-only step.
    """

    seqs: list[ScheduledSeq]
    page_size: int
    num_pages: int
    contiguous: bool
    copies: list[tuple[int, int]]
    h2d_tokens: int = 0
    d2h_tokens: int = 0
    swap_out: list[SwapOut] = field(default_factory=list)
    swap_in: list[SwapIn] = field(default_factory=list)
    host_copies: list[tuple[str, int, int]] = field(default_factory=list)
    kv_read_groups: KVReadGroups | None = None
    num_tokens: int = field(init=False)
    decode_tokens: int = field(init=False)
    prefill_tokens: int = field(init=False)
    kv_read_tokens: int = field(init=False)
    prefill_pairs: int = field(init=False)

    def __post_init__(self) -> None:
        tokens = decode = kv_read = pairs = 0
        for s in self.seqs:
            if s.is_decode is None or s.emits is None:  # built by hand, not by the scheduler
                s.emits = s.start + s.num_new >= s.request.prompt_len
                s.is_decode = s.num_new == 1 and s.start >= s.request.prompt_len
            n = s.num_new
            tokens += n
            kv_read += s.start + n
            if s.is_decode:
                decode += 1
            else:
                pairs += n * s.start + n * (n + 1) // 2
        self.num_tokens, self.decode_tokens = tokens, decode
        self.prefill_tokens, self.kv_read_tokens, self.prefill_pairs = tokens - decode, kv_read, pairs
        if self.kv_read_groups is not None:  # (a windowed model only: the plain count above otherwise)
            self.kv_read_tokens = self.kv_read_groups.read([s.start + s.num_new for s in self.seqs])
            if pairs:
                self.prefill_pairs = self.kv_read_groups.pairs([(s.start, s.num_new) for s in self.seqs
                                                                if not s.is_decode])

    @classmethod
    def counted(cls, seqs: list[ScheduledSeq], page_size: int, num_pages: int, contiguous: bool,
                copies: list[tuple[int, int]], h2d_tokens: int, d2h_tokens: int, num_tokens: int,
                decode_tokens: int, kv_read_tokens: int, prefill_pairs: int) -> StepBatch:
        """The batch the constructor makes of `seqs` (their flags set, no `kv_read_groups`), with the
        counts the caller made as the constructor makes them (`Scheduler.batch`, from its plan),
        without a pass over the seqs."""
        b = _new_object(cls)
        b.seqs, b.page_size, b.num_pages, b.contiguous, b.copies = seqs, page_size, num_pages, contiguous, copies
        b.h2d_tokens, b.d2h_tokens, b.swap_out, b.swap_in, b.host_copies = h2d_tokens, d2h_tokens, [], [], []
        b.kv_read_groups, b.num_tokens, b.decode_tokens = None, num_tokens, decode_tokens
        b.prefill_tokens, b.kv_read_tokens, b.prefill_pairs = num_tokens - decode_tokens, kv_read_tokens, prefill_pairs
        return b

    @property
    def moves(self) -> bool:
        """The step moves K/V between device and host (it is never a quiet step)."""
        return bool(self.h2d_tokens or self.d2h_tokens)

    @property
    def decode_only(self) -> bool:
        """Every request decodes one token (a CUDA-graph step on the gpu engine)."""
        return self.decode_tokens == len(self.seqs) > 0
