"""The scheduler's event stream: one event per step, one per request in it (`ScheduledSeq`).

Metrics, the timeline and the simulated step cost derive from these events only; nothing that
consumes them imports the scheduler.

    scheduler ──StepEvent──► engine.step(event.batch) → dt ──► Recorder.step(event, t, dt)
                             (sim: step_time of the batch's counts)   (timeline row, TTFT, ITL, E2E)

A run of k identical decode-only steps in which nothing happens may arrive as one
`DecodeRun` instead (the sim's fast-forward): the same k steps, rows and token times, exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kvbench.batch import StepBatch
from kvbench.request import Request
from kvbench.strategies.base import SlotStates


class StepEvent(NamedTuple):
    """One planned step, before it runs.

    `batch.seqs` are the per-request events (start, num_new, emits, is_decode); `states` are
    the pool's slot states with room made for the step (the memory it runs with).
    """

    batch: StepBatch
    running: int  # requests running in the step (including those admitted for it)
    waiting: int  # requests left waiting
    preemptions: int  # preemptions so far in the run (cumulative)
    states: SlotStates
    admitted: list[tuple[Request, int]]  # first admissions in this step: (request, prompt positions from cache)
    preempted: list[int]  # request ids preempted while planning this step

    @property
    def steady(self) -> bool:
        """Every running request decoded one token; nobody came, left or was preempted."""
        return (self.batch.decode_tokens == len(self.batch.seqs) == self.running
                and not self.admitted and not self.preempted)


class DecodeRun(NamedTuple):
    """k consecutive decode-only steps of the same `seqs` (all running, in order), in which
    nothing arrives or is preempted and nobody finishes before the last step (kvbench/quiet.py).

    Step j (0-based) starts at `t[j]`, lasts `dt[j]`, reads `kv_read0 + j * len(seqs)` K/V
    positions and runs with the slot states of row j of `states` and `stretches` together:
    a stretch `(e, m, token, reserved, d, internal, external, cached, free)` stands for m rows
    (token + i d, reserved - i d, internal, external, cached, free), i = 0..m-1, that come
    after the first e rows of `states`; rows of `states` that no stretch follows come last.
    (Steps without a page taken are one stretch: no per-step Python object.) A stretch with m < 0
    is a free-slope one: -m rows (token + i d, reserved, internal, external, cached, free - i d),
    steps in which each of d requests took a free page (radix's bulk decode steps, page_size 1).
    """

    seqs: Sequence[Request]  # [D] the requests (or their scheduler `Seq`s: only `.id` is read), in the order they run
    t: Sequence[float]  # [k] step start times (a list or a float64 array)
    dt: Sequence[float]  # [k] step durations
    kv_read0: int
    running: int
    waiting: int | Sequence[int]  # requests waiting in every step, or in each ([k]: some joined a refused head's queue)
    preemptions: int
    states: list[list[int]]  # [6][e] the SlotStates fields (columns) of the steps no stretch gives
    moved: tuple[int, int] = (0, 0)  # (d2h, h2d) token slots the strategy moved in the run (a host tier)
    done: Sequence[Request] = ()  # those of `seqs` whose last token is the last step's (they leave after it)
    stretches: Sequence[tuple[int, ...]] = ()  # the other steps' slot states, in stretches (above)


class StateColumns(list):
    """A `DecodeRun`'s `states` while its steps run: 6 lists (token, reserved, internal, external,
    cached, free) that `QuietRun.run` and a strategy's bulk steps append rows to, carrying the
    run's `stretches` list: a strategy's `decode_steps` may give m > 1 steps that took free pages
    there as one free-slope stretch of the first m - 1 and the last as a row (its caller reads a
    step's states from the columns' last row; the stretch's e counts the rows before it, so the
    order of rows and stretches is kept)."""

    __slots__ = ("stretches",)  # (set by the maker: StateColumns(([], [], [], [], [], [])), no Python __init__)
