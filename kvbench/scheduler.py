"""Iteration-level continuous batching (Orca / vLLM), preemption by recompute or swap, and the
order in which waiting requests are admitted (`policy`, `dedup_prefix`).

Each step: every running request, oldest first, gets room for its next prefill chunk or its
next decode token; when the strategy has no room, the most recently admitted request is
preempted (its memory released, its progress kept as tokens to recompute) and goes back to the
front of the queue. Then waiting requests are admitted while the strategy can hold them and the
step's limits allow, in the policy's order:

- `fcfs`: queue order (arrival order, preempted requests in front); nobody overtakes the head
  of the queue when it does not fit.
- `lpm` (SGLang's longest prefix match): the longest cached prefix first (the strategy's pure
  `cached_prefix_len`, asked of every waiting request each step), ties in queue order.
- `dfs_weight` (SGLang's order): each waiting request hangs under the end of its cached prefix;
  a subtree weighs as many waiting requests as it holds; a depth-first walk visits heavier
  subtrees first (ties: the subtree with the earliest request in the queue) and lists a node's
  own requests after its subtrees. The tree is the compressed trie of the matched prefixes, cut
  at whole pages: on radix it is the radix tree restricted to the waiting requests' paths; on
  paged it is the chain of page hashes (the same idea over page-hash prefixes).
  A strategy that caches no prefix matches 0 for all: both orders are then queue order.

For lpm and dfs_weight, a request that the policy picks and that does not fit ends admission for
this step (as SGLang's PrefillAdder stops): nobody behind it in that order is tried. Starvation
guard: a waiting request is *passed over* in a step when a request behind it in the queue is
admitted and it is not; once passed over in `max_wait_steps` steps (scheduler steps, not seconds:
the scheduler knows no clock), and always while it waits for a recompute after a preemption, it is
*urgent*: urgent requests go first, in queue order, ahead of the policy's order. So no request is
passed over in more than `max_wait_steps` steps, and max_wait_steps=0 is FCFS. The scheduler never
knows which strategy it drives, and knows no clock: what it did goes out as events
(kvbench/events.py).

Preemption (`preemption`):
- `recompute` (vLLM's default): the victim's memory is released and all it had computed is
  computed again when it is re-admitted (less what the prefix cache still holds then).
- `swap`: the victim's computed positions [0, computed) are copied to host memory (d2h, in the
  step that preempts, before anything writes into its released pages) and its memory released.
  Re-admitted, it asks the strategy for room as a recompute would (num_prompt = prompt + emitted),
  with `max_new` raised by the swapped positions the cache does not serve (the strategy's pure
  `cached_prefix_len`, which `admit` must then answer): positions [0, cached) are prefix hits as
  usual, [cached, swapped) are copied back (h2d) and marked computed without being scheduled,
  and only [swapped, prompt + emitted) (at least its last output token) is computed, within the
  step's token budget (the copy itself takes none of it: the sim charges its bytes). Host memory
  for swapped requests is unbounded (`peak_host_tokens` is its peak); each copy is dropped when
  its request is re-admitted. All of a victim's computed positions are copied out, also those
  whose pages stay cached on the GPU (they may be evicted while it waits).

In-batch prefix deduplication (`dedup_prefix`, SGLang's in-batch prefix caching): a waiting
request that is not urgent is *deferred* for this step when a request admitted before it in this
step, or a running request still in its prefill, shares a prefix with it of at least
`dedup_min_prefix` positions more than the prefix cache serves it now (whole pages, at most the
positions it could hit). It waits so that the next steps hit the other's pages. Deferred
requests are passed over like any other (the starvation guard bounds them), and requests behind
them may be admitted (with fcfs too: dedup makes fcfs overtake a deferred request, never one
that does not fit). SGLang only sorts such requests last in lpm; here they wait for the step. A
strategy that caches no prefix defers nobody. Off (the default), nothing changes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from kvbench.batch import KVReadGroups, PlannedSeqs, ScheduledSeq, StepBatch, SwapIn, SwapOut
from kvbench.events import StepEvent
from kvbench.request import Request
from kvbench.strategies.base import Admission, RequestId, Strategy


@dataclass(slots=True, eq=False)
class Seq:
    """A request's progress. Positions [0, computed) hold K/V; `emitted` outputs exist."""

    request: Request
    id: RequestId = RequestId(-1)  # = request.id (a plain field: read on every step)
    computed: int = 0
    emitted: int = 0
    prefill_target: int = 0  # positions to compute before decoding: prompt (+ emitted, after a preemption)
    cached_tokens: int | None = None  # prompt positions served from cache at its first admission
    preemptions: int = 0
    passed: int = 0  # steps in which a request behind it in the queue was admitted and it was not
    swapped: int = 0  # preemption by swap: positions [0, swapped) wait in host memory

    def __post_init__(self) -> None:
        self.id = self.request.id  # (RequestId is a NewType of int: the same value, without its call)


POLICIES = ("fcfs", "lpm", "dfs_weight")
_new_tuple = tuple.__new__
PREEMPTIONS = ("recompute", "swap")


class Scheduler:
    """Plans steps over one strategy.

    Args:
        strategy: the allocator that holds the pool.
        max_num_seqs: most running requests.
        max_num_batched_tokens: most tokens computed in one step.
        chunked_prefill: split a prompt over several steps; if False a prompt runs whole,
            and a prompt longer than max_num_batched_tokens is rejected (the recompute of a
            preempted request that outgrew the step is still chunked, or it could never run).
        policy: admission order, one of POLICIES (module docstring); fcfs pays nothing for the others.
        max_wait_steps: steps a waiting request may be passed over before it is admitted in
            queue order (lpm and dfs_weight, and fcfs with dedup_prefix; module docstring).
        preemption: "recompute" or "swap" (module docstring).
        dedup_prefix: defer a waiting request that would share a long uncached prefix with one
            admitted before it (module docstring).
        dedup_min_prefix: positions of shared, uncached prefix that make a request wait (>= 1).
        kv_read_groups: a model with sliding-window or chunked layers: each batch counts its K/V
            reads per layer group (kvbench.batch.KVReadGroups; kvbench.run passes it); None: plain.
    """

    def __init__(self, strategy: Strategy, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True, policy: str = "fcfs", max_wait_steps: int = 256,
                 preemption: str = "recompute", dedup_prefix: bool = False, dedup_min_prefix: int = 32,
                 kv_read_groups: KVReadGroups | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if policy not in POLICIES:
            raise ValueError(f"scheduler policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if max_wait_steps < 0:
            raise ValueError(f"max_wait_steps must be >= 0, got {max_wait_steps}")
        if preemption not in PREEMPTIONS:
            raise ValueError(f"scheduler preemption must be one of {', '.join(PREEMPTIONS)}, got {preemption!r}")
        if dedup_min_prefix < 1:
            raise ValueError(f"dedup_min_prefix must be >= 1, got {dedup_min_prefix}")
        self.policy, self.max_wait_steps = policy, int(max_wait_steps)
        self.swap = preemption == "swap"
        self.dedup = bool(dedup_prefix) and strategy.caches_prefixes
        self.dedup_min_prefix = int(dedup_min_prefix)
        self._admit = self._admit_fcfs if policy == "fcfs" and not self.dedup else self._admit_ordered
        self.strategy = strategy
        # a strategy whose class declares `reads_tokens` false (slab; paged without prefix caching)
        # never reads admit's ids: it gets None, so a lazily built request's ids are never made
        # (a wrapper class without the attribute, e.g. a checker, gets them)
        self._ids = not hasattr(type(strategy), "reads_tokens") or bool(strategy.reads_tokens)
        self.kv_read_groups = kv_read_groups  # a windowed model's K/V read weights (kvbench.batch), for each batch
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # in admission order
        self.num_preemptions = 0
        self.recomputed_hits = 0  # positions served from cache when a preempted request came back
        self._admitted: list[tuple[Request, int]] = []  # this step's (request, cached positions)
        self._preempted: list[int] = []  # this step's preempted request ids
        self._swap_out: list[SwapOut] = []  # this step's swap-outs (preemption by swap)
        self._swap_in: list[tuple[Seq, int, int]] = []  # this step's swap-ins: (request, start, tokens)
        self.swap_out_tokens = self.swap_in_tokens = 0  # positions copied to / from host, in all
        self.host_tokens = self.peak_host_tokens = 0  # positions held in host memory by swapped requests
        self.deferred = 0  # admissions deferred by dedup_prefix (request-steps)
        self.emitted_all = True  # every running request emitted a token in the last step (`complete`)
        # (`complete`, nobody waiting: positions the running requests hold after the step, and the
        # indices of those whose step was not a decode; one attribute: an instance of over 29 keeps
        # its attributes in a plain dict, slower to read)
        self.held_after: tuple[int, list[int]] = (0, [])
        self.quiet_calls: tuple | None = None  # the strategy's calls a quiet run makes (kvbench/quiet.py)
        # (the last step `schedule` planned; the K/V positions its requests held before it where it
        # is steady, else None, for `steady_plan`; the counts of the rows it planned before admitting
        # (rows, decodes, the decodes' positions held, the other rows' tokens, K/V reads and query-key
        # pairs), for `batch`)
        self._steady: tuple = (None, None, None)

    # ---- intake -----------------------------------------------------------------------------
    def rejection(self, request: Request) -> str | None:
        """Why `request` can never run (None if it can). Pure."""
        reason = self.strategy.never_fits(request.kv_len)
        if reason is None and not self.chunked_prefill and request.prompt_len > self.max_num_batched_tokens:
            reason = (f"batch_tokens: prompt of {request.prompt_len} tokens exceeds max_num_batched_tokens "
                      f"{self.max_num_batched_tokens} without chunked prefill")
        return reason

    def add(self, seq: Seq) -> None:
        seq.prefill_target = seq.request.prompt_len
        self.waiting.append(seq)

    @property
    def fifo_admission(self) -> bool:
        """Whether admission tries the waiting requests strictly from the head of the queue (fcfs
        without dedup_prefix): a request that joins behind a waiting one changes no step until
        the head is admitted."""
        return self._admit == self._admit_fcfs

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def waiting_kv_len(self) -> int | None:
        return self.waiting[0].request.kv_len if self.waiting else None

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Seq, int]]:
        """Plan the next step: (request, positions to compute). Mutates the strategy."""
        budget = self.max_num_batched_tokens
        planned: list[tuple[Seq, int]] = []
        self._admitted, self._preempted = [], []
        if self._swap_out or self._swap_in:
            self._swap_out, self._swap_in = [], []
        running, grow = self.running, self.strategy.grow  # (the same list all along: pop and append)
        plan = planned.append
        skipped, failed, held, chunks = 0, None, 0, 0
        chunk_tokens = chunk_kv = pairs = 0  # the prefill chunks' tokens, K/V reads and query-key pairs
        rest = running
        if len(running) < budget:  # the leading decodes (they cannot use the budget up): one token each
            for seq in running:
                c = seq.computed
                if c < seq.prefill_target:
                    break
                if not grow(seq.id, 1):
                    failed = 1
                    break
                plan((seq, 1))
                held += c
            m = len(planned)
            budget -= m
            if failed is not None or m == len(running):
                rest = ()
            elif m:
                rest = running[m:]
        for seq in rest:  # while every grow succeeds (nobody preempted: the list stays)
            if budget <= 0:
                break
            c = seq.computed
            if c >= seq.prefill_target:  # a decode
                if not grow(seq.id, 1):
                    failed = 1
                    break
                plan((seq, 1))
                budget -= 1
                held += c
                continue
            n = self._tokens_for(seq, budget)
            if n == 0:
                skipped += 1
                continue
            if not grow(seq.id, n):
                failed = n
                break
            plan((seq, n))
            budget -= n
            chunks += 1
            chunk_tokens += n  # (counted as StepBatch counts a row that is not a decode)
            chunk_kv += c + n
            pairs += n * c + n * (n + 1) // 2
        if failed is None:
            m = len(planned)
            decodes = m - chunks
            self._admit(planned, budget)
            # (`steady_plan`: every request planned decodes, nobody was admitted or preempted; `batch`:
            # the counts of the first m rows)
            self._steady = (planned, held if decodes == len(planned) == len(running) else None,
                            (m, decodes, held, chunk_tokens, chunk_kv, pairs))
        else:  # the request after those planned or skipped got no room: preempt, then go on as before
            self._plan_preempting(planned, budget, len(planned) + skipped, failed)
            self._steady = (None, None, None)
        return planned

    def _plan_preempting(self, planned: list[tuple[Seq, int]], budget: int, i: int, n: int) -> None:
        """`schedule` from running request i on, whose grow by n just failed: the most recently
        admitted request is preempted until it fits (or is itself preempted), and so on for the
        rest; nobody is admitted in this step. Mutates the strategy, `running` and the queue."""
        running, grow = self.running, self.strategy.grow
        seq = running[i]
        while True:  # (its grow failed)
            victim = running.pop()
            self._preempt(victim)
            if victim is seq:
                break
            if grow(seq.id, n):
                planned.append((seq, n))
                budget -= n
                i += 1
                break
        while i < len(running) and budget > 0:
            seq = running[i]
            n = 1 if seq.computed >= seq.prefill_target else self._tokens_for(seq, budget)  # (1: a decode)
            if n == 0:
                i += 1
                continue
            while not grow(seq.id, n):
                victim = running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                planned.append((seq, n))
                budget -= n
                i += 1

    def _tokens_for(self, seq: Seq, budget: int) -> int:
        left = seq.prefill_target - seq.computed
        if left <= 0:
            return 1  # decode
        if self.chunked_prefill or left > self.max_num_batched_tokens:
            return min(left, budget)  # (a recompute longer than a step is chunked regardless)
        return left if left <= budget else 0

    def _admit_fcfs(self, planned: list[tuple[Seq, int]], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            req = seq.request
            if not self.chunked_prefill and budget < seq.prefill_target - seq.swapped <= self.max_num_batched_tokens:
                break
            adm = (self._admit_swapped(seq, budget) if seq.swapped else
                   self.strategy.admit(seq.id, req.tokens if self._ids else None, req.kv_len, seq.prefill_target,
                                       budget))
            if not adm.admitted:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            budget = self._start(seq, adm.cached_tokens, planned, budget)

    def _start(self, seq: Seq, cached: int, planned: list[tuple[Seq, int]], budget: int) -> int:
        """An admitted request runs: plan its first chunk; returns the budget left."""
        if seq.cached_tokens is None:
            seq.cached_tokens = cached
            self._admitted.append((seq.request, cached))
        else:
            self.recomputed_hits += cached
        seq.computed = cached
        if seq.swapped:  # its host copy comes back, less what the prefix cache served (then dropped)
            back = max(seq.swapped - cached, 0)
            self._swap_in.append((seq, cached, back))
            self.swap_in_tokens += back
            seq.computed = cached + back
            self.host_tokens -= seq.swapped
            seq.swapped = 0
        n = min(budget, seq.prefill_target - seq.computed)
        self.running.append(seq)
        planned.append((seq, n))
        return budget - n

    def _admit_swapped(self, seq: Seq, budget: int) -> Admission:
        """Admit a swapped request with room for its swapped positions beyond the cached prefix
        plus the step's chunk (module docstring). Mutates the strategy when admitted."""
        st, req = self.strategy, seq.request
        cached = st.cached_prefix_len(req.tokens, seq.prefill_target)
        adm = st.admit(seq.id, req.tokens if self._ids else None, req.kv_len, seq.prefill_target,
                       budget + max(seq.swapped - cached, 0))
        if adm.admitted and adm.cached_tokens != cached:
            raise RuntimeError(f"strategy '{st.label}': admit served {adm.cached_tokens} cached positions of request "
                               f"{seq.id}, cached_prefix_len said {cached} (the contract says they are equal)")
        return adm

    def _admit_ordered(self, planned: list[tuple[Seq, int]], budget: int) -> None:
        """lpm / dfs_weight (and fcfs with dedup_prefix): admit in the policy's order (urgent
        requests first), skip those deferred by dedup_prefix, stop at the first that does not fit;
        count who was passed over. O(waiting x prefix match) per step."""
        if not self.waiting or budget <= 0 or len(self.running) >= self.max_num_seqs:
            return
        waiting = list(self.waiting)
        taken: list[int] = []
        flying = self._in_flight() if self.dedup else None
        bound = self.max_wait_steps
        for i in self.order(waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            seq = waiting[i]
            if not self.chunked_prefill and budget < seq.prefill_target - seq.swapped <= self.max_num_batched_tokens:
                break
            if flying and seq.passed < bound and not seq.preemptions and self._defer(seq, flying):
                self.deferred += 1
                continue
            req = seq.request
            adm = (self._admit_swapped(seq, budget) if seq.swapped else
                   self.strategy.admit(seq.id, req.tokens if self._ids else None, req.kv_len, seq.prefill_target,
                                       budget))
            if not adm.admitted:
                break  # the chosen request does not fit: admission ends for this step (SGLang)
            taken.append(i)
            budget = self._start(seq, adm.cached_tokens, planned, budget)
            if flying is not None:
                self._fly(flying, seq)
        if taken:
            last, gone = max(taken), set(taken)
            for j in range(last):
                if j not in gone:
                    waiting[j].passed += 1
            self.waiting = deque(s for j, s in enumerate(waiting) if j not in gone)

    # ---- in-batch prefix deduplication -------------------------------------------------------
    def _in_flight(self) -> dict[bytes, list[np.ndarray]]:
        """The prompts being computed: running requests still in their prefill, keyed by their
        first dedup_min_prefix ids (a request shares a long enough prefix only with those). Pure."""
        flying: dict[bytes, list[np.ndarray]] = {}
        for s in self.running:
            if s.computed < s.prefill_target:
                self._fly(flying, s)
        return flying

    def _fly(self, flying: dict[bytes, list[np.ndarray]], seq: Seq) -> None:
        m = self.dedup_min_prefix
        if seq.prefill_target > m:
            ids = seq.request.tokens[:seq.prefill_target]
            flying.setdefault(ids[:m].tobytes(), []).append(ids)

    def _defer(self, seq: Seq, flying: dict[bytes, list[np.ndarray]]) -> bool:
        """Whether `seq` shares, with a prompt in flight, at least dedup_min_prefix whole-page
        positions more than the cache serves it now. Pure (asks `cached_prefix_len`)."""
        m, target = self.dedup_min_prefix, seq.prefill_target
        if target - 1 < m:
            return False
        ids = seq.request.tokens
        group = flying.get(ids[:m].tobytes())
        if not group:
            return False
        hittable = ids[:target - 1]  # at most target - 1 positions come from cache
        shared = 0
        for other in group:
            n = min(len(hittable), len(other))
            diff = np.flatnonzero(hittable[:n] != other[:n])
            shared = max(shared, int(diff[0]) if len(diff) else n)
        ps = self.strategy.page_size
        shared = shared // ps * ps
        return shared >= m and shared - self.strategy.cached_prefix_len(ids, target) >= m

    def order(self, waiting: list[Seq]) -> list[int]:
        """Positions in `waiting` in the order the policy tries them: urgent requests (passed over
        max_wait_steps times, or waiting for a recompute) in queue order, then the policy's order
        of the rest. Pure (asks the strategy's pure `cached_prefix_len`)."""
        bound = self.max_wait_steps
        urgent = [i for i, s in enumerate(waiting) if s.passed >= bound or s.preemptions]
        if len(urgent) == len(waiting):
            return urgent
        rest = [i for i, s in enumerate(waiting) if not (s.passed >= bound or s.preemptions)]
        if self.policy == "fcfs":  # (with dedup_prefix)
            return urgent + rest
        st = self.strategy
        lens = {i: st.cached_prefix_len(waiting[i].request.tokens, waiting[i].prefill_target) for i in rest}
        if self.policy == "lpm":
            return urgent + sorted(rest, key=lambda i: -lens[i])  # stable: ties in queue order
        out = urgent
        self._dfs([(i, waiting[i].request.tokens, lens[i]) for i in rest], 0, out)
        return out

    def _dfs(self, group: list[tuple[int, np.ndarray, int]], depth: int, out: list[int]) -> None:
        """SGLang's DFS-weight walk over the trie of the group's matched prefixes, which all share
        their first `depth` ids: subtrees by the next page, heaviest first (ties: earliest in the
        queue), each jumping to its next branch point; then the requests whose match ends here."""
        ps = self.strategy.page_size
        children: dict[bytes, list[tuple[int, np.ndarray, int]]] = {}
        here = []
        for item in group:
            if item[2] == depth:
                here.append(item[0])
            else:
                children.setdefault(item[1][depth:depth + ps].tobytes(), []).append(item)
        for members in sorted(children.values(), key=lambda m: (-len(m), m[0][0])):
            end = min(m[2] for m in members)  # the next branch point: the members' common prefix
            first = members[0][1]
            for _, ids, _ in members[1:]:
                diff = np.flatnonzero(ids[depth:end] != first[depth:end])
                if len(diff):
                    end = depth + int(diff[0]) // ps * ps
            self._dfs(members, max(end, depth + ps), out)
        out.extend(here)

    def _preempt(self, seq: Seq) -> None:
        if self.swap:  # its computed K/V go to host memory before its pages are released
            n = seq.computed
            pages = self.strategy.page_table(seq.id)[:self.strategy.pages_for(n)]
            self._swap_out.append(SwapOut(seq.id, pages, n))
            seq.swapped = n
            self.swap_out_tokens += n
            self.host_tokens += n
            self.peak_host_tokens = max(self.peak_host_tokens, self.host_tokens)
        self.strategy.release(seq.id)
        seq.preemptions += 1
        self.num_preemptions += 1
        self._preempted.append(seq.id)
        seq.prefill_target = seq.request.prompt_len + seq.emitted  # recompute what it had
        seq.computed = 0
        self.waiting.appendleft(seq)

    def batch(self, planned: list[tuple[Seq, int]], with_layout: bool, lazy: bool = False) -> StepBatch:
        """The engine's view of a planned step. Pure, except that pending page copies and the
        strategy's host moves are handed over (`take_copies`, `take_host_moves`, and with the
        layout `take_host_copies` where the strategy has it). `lazy` (without the layout): its
        seqs are a `PlannedSeqs` of `planned`, made where read (the caller seals it before
        `complete`)."""
        st = self.strategy
        new = ScheduledSeq
        if with_layout:
            seqs = [new(s.request, c, n, st.page_table(s.id), c + n >= (t := s.prefill_target), c >= t)
                    for s, n in planned if (c := s.computed) is not None]
        elif lazy:
            seqs = PlannedSeqs(planned)
        else:
            seqs = [new(s.request, c, n, None, c + n >= (t := s.prefill_target), c >= t)
                    for s, n in planned if (c := s.computed) is not None]
        # the host tier's page copies, for engines that make them (before take_host_moves, which drops them)
        take = getattr(st, "take_host_copies", None) if with_layout else None
        host_copies = take() if take is not None else None
        d2h, h2d = st.take_host_moves()
        last, _, counts = self._steady
        if self.kv_read_groups is None:
            # the rows counted here as StepBatch counts a row (the same sums, in integers): those
            # after the first m, which `schedule` counted where it planned the step without a
            # preemption (the rows admitted after them), else all
            if planned is last:
                m, decode, held, tokens, kv_read, pairs = counts
                tokens += decode
                kv_read += held + decode
            else:
                m = decode = tokens = kv_read = pairs = 0
            for s, n in planned[m:] if m else planned:
                c = s.computed
                tokens += n
                kv_read += c + n
                if c >= s.prefill_target:
                    decode += 1
                else:
                    pairs += n * c + n * (n + 1) // 2
            batch = StepBatch.counted(seqs, st.page_size, st.num_pages, st.contiguous, st.take_copies(), h2d, d2h,
                                      tokens, decode, kv_read, pairs)
        else:
            batch = StepBatch(seqs, st.page_size, st.num_pages, st.contiguous, st.take_copies(), h2d, d2h,
                              kv_read_groups=self.kv_read_groups)
        if host_copies:
            batch.host_copies = host_copies
        if self._swap_out or self._swap_in:
            batch.swap_out = self._swap_out
            batch.swap_in = [SwapIn(s.id, st.page_table(s.id)[:st.pages_for(start + k)], start, k)
                             for s, start, k in self._swap_in]
            batch.d2h_tokens += sum(o.tokens for o in self._swap_out)
            batch.h2d_tokens += sum(i.tokens for i in batch.swap_in)
        return batch

    def event(self, planned: list[tuple[Seq, int]], with_layout: bool, lazy: bool = False) -> StepEvent:
        """The planned step as an event: its batch, the queue lengths and the slot states it
        runs with, who was admitted (first admissions only) and who preempted. Pure, as `batch`
        (`lazy`: see there)."""
        waiting = self.waiting
        return _new_tuple(StepEvent, (self.batch(planned, with_layout, lazy), len(self.running), len(waiting),
                                      self.num_preemptions,
                                      self.strategy.slot_states(waiting[0].request.kv_len if waiting else None),
                                      self._admitted, self._preempted))  # (without StepEvent's Python __new__)

    def steady_plan(self, planned: list[tuple[Seq, int]]) -> int | None:
        """Whether the planned step is steady (every running request decodes one token, nobody
        was admitted or preempted: `StepEvent.steady`); if so, the K/V positions its requests
        hold before it (the step reads that plus one per request), else None. Pure."""
        last, held, _ = self._steady
        if planned is last:  # (counted by `schedule`, which made it: any admission makes it longer)
            return held
        if len(planned) != len(self.running) or self._preempted or self._admitted:
            return None
        held = 0
        for seq, _ in planned:
            c = seq.computed
            if c < seq.prefill_target:  # (a chunk of a prefill or of a recompute, also a re-admitted one)
                return None
            held += c
        return held

    def complete(self, planned: list[tuple[Seq, int]]) -> list[Seq]:
        """The step ran: advance every request; release the finished ones (returned).
        `emitted_all`: whether every request still running emitted a token in the step;
        `held_after`: (the K/V positions the requests that ran and emitted hold, the indices in
        planned order of those whose step was not a decode), which `kvbench.replay.quiet_after`
        reads when nobody waits (every running request then ran in it, in running order)."""
        done = []
        emitted = held = i = 0
        fresh = []
        for seq, n in planned:
            c = seq.computed + n
            seq.computed = c
            t = seq.prefill_target
            if c < t:
                continue  # a prefill chunk that emits nothing yet (then not all emitted)
            seq.emitted += 1
            emitted += 1
            if seq.emitted == seq.request.output_len:
                done.append(seq)
                continue
            if c - n < t:  # a prefill's last chunk, not a decode
                fresh.append(i)
            held += c
            i += 1
        if done:
            self.retire(done)
        self.emitted_all = emitted - len(done) == len(self.running)
        self.held_after = (held, fresh)
        return done

    def retire(self, done: list[Seq]) -> None:
        """Finished requests leave: out of `running`, their memory released, in `done`'s order."""
        if len(done) == 1:
            self.running.remove(done[0])  # (Seq compares by identity)
        else:
            finished = set(map(id, done))
            self.running = [s for s in self.running if id(s) not in finished]
        for seq in done:
            self.strategy.release(seq.id)
