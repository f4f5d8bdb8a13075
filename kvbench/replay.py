"""The event loop: arrivals → scheduler → engine → clock → recorder. Every request ends finished
or rejected.

Fast-forward (engines with a cost model, `engine.fast_forward`): after a steady step (every
running request decoded one token; nobody came, left or was preempted) the next steps repeat it
until a request would take a new page or finish, or a request arrives. Those quiet steps skip
planning and batching: the strategy still gets every `grow` call, in order; the clock advances
step by step by the cost model; the recorder gets the same rows and token times. Results are
identical to stepping (tests/test_fast_forward.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from kvbench.engines.base import Engine
from kvbench.events import DecodeRun, StepEvent
from kvbench.metrics import Recorder
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
            k = scheduler.quiet_steps()
            if k:
                until = requests[nxt].arrival_s if nxt < n else float("inf")
                now = fast_forward(scheduler, engine, rec, steady, k, now, until)
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


def fast_forward(scheduler: Scheduler, engine: Engine, rec: Recorder, steady: StepEvent, k: int,
                 now: float, until: float) -> float:
    """Up to k quiet steps after the `steady` one (`Scheduler.quiet_steps`), stopping before a
    step that would start at or after `until` (an arrival); returns the clock after them.

    With requests waiting no step takes a page: the slot states follow from the steady step's
    (each decode moves a slot from reserved to token), checked against the strategy's at the
    end. With none waiting a step may take pages: it runs only while free + cached slots could
    give every request a page, and its states are the strategy's own. Mutates scheduler,
    strategy, recorder."""
    st, d = scheduler.strategy, steady.running
    paging = not scheduler.waiting
    need = d * st.page_size  # slots that one page per request takes
    kv_read = steady.batch.kv_read_tokens + d  # every decode reads one position more each step
    kv0, cost, states = kv_read, engine.cost, steady.states
    t, dts, rows = [], [], []
    while len(t) < k and now < until:
        if paging and states.free + states.cached < need:
            break
        scheduler.grow_all()
        if paging:
            states = st.slot_states(None)
            rows.append(states)
        dt = cost(0, d, kv_read)
        t.append(now)
        dts.append(dt)
        now += dt
        kv_read += d
    if not t:
        return now
    scheduler.advance(len(t))
    rec.decode_run(DecodeRun([s.request for s in scheduler.running], t, dts, kv0, d, steady.waiting,
                             steady.preemptions, steady.states, rows if paging else None))
    if not paging and (now_states := st.slot_states(scheduler.waiting_kv_len())) != rec.last_states():
        raise RuntimeError(f"fast-forward: strategy '{st.label}' reports {now_states} after {len(t)} quiet "
                           f"decode steps of {d} requests, but {rec.last_states()} was expected (each "
                           f"decode token moves one slot from reserved to token)")
    return now
