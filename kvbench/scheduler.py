"""Iteration-level continuous batching (Orca / vLLM), FCFS, preemption by recompute.

Each step: every running request, oldest first, gets room for its next prefill chunk or its
next decode token; when the strategy has no room, the most recently admitted request is
preempted (its memory released, its progress kept as tokens to recompute) and goes back to the
front of the queue. Then waiting requests are admitted in arrival order while the strategy can
hold them and the step's limits allow. The scheduler never knows which strategy it drives, and
knows no clock: what it did goes out as events (kvbench/events.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvbench.batch import ScheduledSeq, StepBatch
from kvbench.events import StepEvent
from kvbench.request import Request
from kvbench.strategies.base import RequestId, Strategy


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

    def __post_init__(self) -> None:
        self.id = RequestId(self.request.id)


class Scheduler:
    """Plans steps over one strategy.

    Args:
        strategy: the allocator that holds the pool.
        max_num_seqs: most running requests.
        max_num_batched_tokens: most tokens computed in one step.
        chunked_prefill: split a prompt over several steps; if False a prompt runs whole,
            and a prompt longer than max_num_batched_tokens is rejected (the recompute of a
            preempted request that outgrew the step is still chunked, or it could never run).
    """

    def __init__(self, strategy: Strategy, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.strategy = strategy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # in admission order
        self.num_preemptions = 0
        self.recomputed_hits = 0  # positions served from cache when a preempted request came back
        self._admitted: list[tuple[Request, int]] = []  # this step's (request, cached positions)
        self._preempted: list[int] = []  # this step's preempted request ids

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
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._tokens_for(seq, budget)
            if n == 0:
                i += 1
                continue
            while not self.strategy.grow(seq.id, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                planned.append((seq, n))
                budget -= n
                i += 1
        if not preempted:
            self._admit(planned, budget)
        return planned

    def _tokens_for(self, seq: Seq, budget: int) -> int:
        left = seq.prefill_target - seq.computed
        if left <= 0:
            return 1  # decode
        if self.chunked_prefill or left > self.max_num_batched_tokens:
            return min(left, budget)  # (a recompute longer than a step is chunked regardless)
        return left if left <= budget else 0

    def _admit(self, planned: list[tuple[Seq, int]], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            req = seq.request
            if not self.chunked_prefill and budget < seq.prefill_target <= self.max_num_batched_tokens:
                break
            adm = self.strategy.admit(seq.id, req.tokens, req.kv_len, seq.prefill_target, budget)
            if not adm.admitted:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if seq.cached_tokens is None:
                seq.cached_tokens = adm.cached_tokens
                self._admitted.append((req, adm.cached_tokens))
            else:
                self.recomputed_hits += adm.cached_tokens
            seq.computed = adm.cached_tokens
            n = min(budget, seq.prefill_target - seq.computed)
            self.running.append(seq)
            planned.append((seq, n))
            budget -= n

    def _preempt(self, seq: Seq) -> None:
        self.strategy.release(seq.id)
        seq.preemptions += 1
        self.num_preemptions += 1
        self._preempted.append(seq.id)
        seq.prefill_target = seq.request.prompt_len + seq.emitted  # recompute what it had
        seq.computed = 0
        self.waiting.appendleft(seq)

    def batch(self, planned: list[tuple[Seq, int]], with_layout: bool) -> StepBatch:
        """The engine's view of a planned step. Pure, except that pending page copies are handed over."""
        st = self.strategy
        seqs = []
        for s, n in planned:
            target = s.prefill_target
            seqs.append(ScheduledSeq(s.request, s.computed, n, st.page_table(s.id) if with_layout else None,
                                     s.computed + n >= target, s.computed >= target))
        return StepBatch(seqs, st.page_size, st.num_pages, st.contiguous, st.take_copies())

    def event(self, planned: list[tuple[Seq, int]], with_layout: bool) -> StepEvent:
        """The planned step as an event: its batch, the queue lengths and the slot states it
        runs with, who was admitted (first admissions only) and who preempted. Pure, as `batch`."""
        return StepEvent(self.batch(planned, with_layout), len(self.running), len(self.waiting),
                         self.num_preemptions, self.strategy.slot_states(self.waiting_kv_len()),
                         self._admitted, self._preempted)

    def complete(self, planned: list[tuple[Seq, int]]) -> list[Seq]:
        """The step ran: advance every request; release the finished ones (returned)."""
        done = []
        for seq, n in planned:
            seq.computed += n
            if seq.computed < seq.prefill_target:
                continue  # a prefill chunk that emits nothing yet
            seq.emitted += 1
            if seq.emitted == seq.request.output_len:
                done.append(seq)
        if done:
            finished = set(map(id, done))
            self.running = [s for s in self.running if id(s) not in finished]
            for seq in done:
                self.strategy.release(seq.id)
        return done
