"""The event loop: arrivals → scheduler → engine → clock → recorder. Every request ends finished
or rejected.

Fast-forward (engines with a cost model, `engine.fast_forward`): after a steady step (every
running request decoded one token; nobody came, left or was preempted) the next steps repeat it
until a request would finish (or take a page while others wait: kvbench/quiet.py), or a request
arrives. Those quiet steps skip planning and batching; the strategy ends up exactly as stepping
leaves it; the clock advances step by step by the cost model; the recorder gets the same rows
and token times. Results are identical to stepping (tests/test_fast_forward.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from kvbench.engines.base import Engine
from kvbench.events import DecodeRun, StepEvent
from kvbench.metrics import Recorder
from kvbench.quiet import QuietRun
from kvbench.request import Request
from kvbench.scheduler import Scheduler, Seq


@dataclass
class Replay:
    finished: list[Seq]
    recorder: Recorder

    @property
    def itl(self) -> np.ndarray:
        return self.recorder.itl()


def replay(requests: list[Request], scheduler: Scheduler, engine: Engine, progress: bool = True) -> Replay:
    """Replay `requests` (sorted by arrival) to the end on a simulated or measured clock."""
    rec = Recorder(scheduler.strategy.capacity)
    finished: list[Seq] = []
    bar = tqdm(total=len(requests), unit="req", delay=2.0, disable=not progress, leave=False)
    now, nxt, n = 0.0, 0, len(requests)
    steady: StepEvent | None = None  # the last step, if it was steady (fast-forward may follow)
    while nxt < n or scheduler.has_work():
        while nxt < n and requests[nxt].arrival_s <= now:  # arrivals up to now
            req = requests[nxt]
            nxt += 1
            steady = None
            reason = scheduler.rejection(req)
            if reason is None:
                scheduler.add(Seq(req))
            else:
                rec.reject(req, reason)
                bar.update(1)
        if not scheduler.has_work():
            if nxt < n:
                now = requests[nxt].arrival_s  # idle: jump to the next arrival
            continue  # (or nothing left at all: the loop ends)
        if steady is not None and engine.fast_forward:
            until = requests[nxt].arrival_s if nxt < n else float("inf")
            now = fast_forward(QuietRun(scheduler, steady.states), engine, rec, steady, now, until)
            steady = None
            continue
        planned = scheduler.schedule()
        if not planned:
            raise RuntimeError(f"scheduler made no progress at t={now:.3f}s with {len(scheduler.waiting)} "
                               f"waiting and {len(scheduler.running)} running")
        ev = scheduler.event(planned, engine.needs_layout)
        dt = engine.step(ev.batch)
        rec.step(ev, now, dt)
        now += dt
        done = scheduler.complete(planned)
        steady = ev if ev.steady and not done else None
        if done:
            finished.extend(done)
            bar.update(len(done))
    bar.close()
    return Replay(finished, rec)


def fast_forward(run: QuietRun, engine: Engine, rec: Recorder, steady: StepEvent, now: float,
                 until: float) -> float:
    """The quiet steps of `run` (none if it has none), stopping before a step that would start
    at or after `until` (an arrival); returns the clock after them. Priced in chunks: step j
    reads d more K/V positions than step j - 1, and starts where j - 1 ended (a sequential sum,
    as stepping adds them). Mutates (through `run`) the strategy and the requests, and the
    recorder."""
    d = steady.running
    kv_read = steady.batch.kv_read_tokens + d  # every decode reads one position more each step
    while (left := run.limit - run.j) > 0:
        k = min(left, _CHUNK)
        kv = kv_read + d * np.arange(k, dtype=np.int64)
        dts = engine.decode_costs(d, kv)
        starts = np.add.accumulate(np.concatenate(([now], dts)))  # [k + 1]
        rows = run.run(int(np.searchsorted(starts[:k], until)))  # the steps that start before `until`
        j = len(rows)
        if j:
            rec.decode_run(DecodeRun([s.request for s in run.seqs], starts[:j], dts[:j], kv_read, d,
                                     steady.waiting, steady.preemptions, rows))
            now, kv_read = float(starts[j]), kv_read + j * d
        if j < k:
            break
    run.end()
    return now


_CHUNK = 4096  # quiet steps priced at once
