"""The event loop: arrivals → scheduler → engine → clock. Every request ends finished or rejected."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from kvbench.engines.base import Engine
from kvbench.metrics import Recorder
from kvbench.request import Request
from kvbench.scheduler import Scheduler, Seq


@dataclass
class Replay:
    finished: list[Seq]
    recorder: Recorder
    itl: np.ndarray


def replay(requests: list[Request], scheduler: Scheduler, engine: Engine, progress: bool = True) -> Replay:
    """Replay `requests` (sorted by arrival) to the end on a simulated or measured clock."""
    rec = Recorder(scheduler.strategy.capacity)
    finished: list[Seq] = []
    bar = tqdm(total=len(requests), unit="req", delay=2.0, disable=not progress, leave=False)
    now, nxt, n = 0.0, 0, len(requests)
    while nxt < n or scheduler.has_work():
        while nxt < n and requests[nxt].arrival_s <= now:  # arrivals up to now
            req = requests[nxt]
            nxt += 1
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
        planned = scheduler.schedule()
        if not planned:
            raise RuntimeError(f"scheduler made no progress at t={now:.3f}s with {len(scheduler.waiting)} "
                               f"waiting and {len(scheduler.running)} running")
        states = scheduler.strategy.slot_states(scheduler.waiting_kv_len())
        dt = engine.step(scheduler.batch(planned, engine.needs_layout))
        decode = sum(1 for s, k in planned if k == 1 and s.computed >= s.prefill_target)
        prefill = sum(k for _, k in planned) - decode
        kv_read = sum(s.computed for s, _ in planned) + prefill + decode
        rec.step(now, dt, len(scheduler.running), len(scheduler.waiting), prefill, decode, kv_read,
                 scheduler.num_preemptions, states)
        now += dt
        done = scheduler.complete(planned, now)
        finished.extend(done)
        bar.update(len(done))
    bar.close()
    return Replay(finished, rec, np.frombuffer(scheduler.itl, dtype=np.float64))
