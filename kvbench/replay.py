"""The event loop: arrivals → scheduler → engine → clock → recorder. Every request ends finished
or rejected.

Fast-forward (engines with a cost model, `engine.fast_forward`): after a steady step (every
running request decoded one token; nobody came, left or was preempted) the next steps repeat it
(kvbench/quiet.py) until a request arrives that may change the next step, or, with requests
waiting, until a request finishes or would take a page (unless the head stays refused through
it: `kvbench.quiet.head_need`). With nobody waiting, a request that
finishes leaves after its last step and the others go on; a request that joins a queue whose
head was refused (fcfs admission) or that is rejected changes no step, so the run goes on (with
requests waiting and fcfs every arrival is such: the run is not paused at each, its arrivals are
taken in when its steps are recorded, each counted as waiting from the first step that starts at
or after its arrival, as pausing would count it); a request that arrives alone with nobody
waiting is admitted in the run's next step, taken inside the run (`admit_step`: the run's
decodes, then fcfs admission), and joins it when its prompt is done there. Those
quiet steps skip planning and batching; the strategy ends up exactly as stepping leaves it; the
clock advances step by step by the cost model; the recorder gets the same rows and token times.
Results are identical to stepping (tests/test_fast_forward.py).
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
import numpy as np
from tqdm import tqdm

from kvbench.batch import RunSeqs, StepBatch
from kvbench.engines.base import Engine
from kvbench.events import StateColumns, StepEvent
from kvbench.metrics import Recorder
from kvbench.quiet import Quiet, QuietRun, _first_tried, head_need
from kvbench.request import Request
from kvbench.scheduler import Scheduler, Seq
from kvbench.strategies.base import SlotStates, Strategy


@dataclass
class Replay:
    finished: list[Seq]
    recorder: Recorder

    @property
    def itl(self) -> np.ndarray:
        return self.recorder.itl()


def replay(requests: Sequence[Request], scheduler: Scheduler, engine: Engine, progress: bool = True,
           recorder: Recorder | None = None, keep_finished: bool = True) -> Replay:
    """Replay `requests` (sorted by arrival) to the end on a simulated or measured clock.

    `requests` is read once, in order (a `LazyTrace` makes each request then); `recorder`: one
    made by the caller (e.g. streaming its timeline to a file), else a new in-memory one, closed
    at the end. keep_finished=False keeps no finished `Seq` (`Replay.finished` stays empty), so
    a request is freed when it leaves (with the recorder's compact per-request rows, a replay's
    memory is then what is in flight plus O(steps) small runs)."""
    rec = Recorder(scheduler.strategy.capacity) if recorder is None else recorder
    finished: list[Seq] = []
    bar = tqdm(total=len(requests), unit="req", delay=2.0, disable=not progress, leave=False)
    now, arrivals = 0.0, iter(requests)
    head = next(arrivals, None)  # the next request to arrive (None: no more)
    forget = engine.forgets_ids  # a request's ids are dropped when it leaves (rebuilt if read)
    steady: Quiet | None = None  # set after a step that quiet steps may follow (fast-forward)
    run: QuietRun | None = None  # a quiet run paused at an arrival that may not end it
    # a planned step that is steady starts a quiet run as its step 0 (not stepped) where every
    # running request's last token came out at `now` (`fresh`) and quiet steps may follow it
    plan_runs = engine.fast_forward and not engine.needs_layout and quiet_plans(scheduler)
    fresh = True
    fifo = scheduler.fifo_admission  # (fixed for a scheduler)
    mix = fifo and not engine.needs_layout  # an arrival with nobody waiting is admitted inside a run (`admit_step`)
    layout = engine.needs_layout

    def rejected(req: Request) -> bool:
        """Whether the arriving `req` is rejected (recorded with its reason; it changes nothing
        the next steps see). Mutates the recorder."""
        reason = scheduler.rejection(req)
        if reason is None:
            return False
        rec.reject(req, reason)
        if forget:
            req.forget()
        bar.update(1)
        return True

    def intake(t: float) -> list[float]:
        """The arrivals up to `t` while a quiet run goes on behind a refused head (fcfs): each
        is rejected or joins the queue (neither changes a step); returns the arrival times of
        those that joined. Mutates the queue and the recorder (rejections)."""
        nonlocal head
        joined = []
        while head is not None and head.arrival_s <= t:
            req, head = head, next(arrivals, None)
            if rejected(req):
                continue
            joined.append(req.arrival_s)
            scheduler.add(Seq(req))
        return joined

    def leave(done: list[Seq]) -> None:  # finished requests are out of the scheduler
        if keep_finished:
            finished.extend(done)
        bar.update(len(done))
        if forget:
            for s in done:
                s.request.forget()

    while head is not None or scheduler.waiting or scheduler.running:
        while head is not None and head.arrival_s <= now:  # arrivals up to now
            req, head = head, next(arrivals, None)
            if rejected(req):
                continue
            if scheduler.waiting and fifo:  # behind the refused head: the next steps
                if run is not None:  # are as quiet as they were, with one more waiting
                    run.waiting += 1
                elif steady is not None:
                    steady = steady._replace(waiting=steady.waiting + 1)
            else:
                if run is not None:
                    if mix and not scheduler.waiting and (head is None or head.arrival_s > now) \
                            and _mixes(run, req):
                        # it alone arrives with nobody waiting: the run's next step admits it (or tries)
                        got = admit_step(run, Seq(req), scheduler, engine, rec, now)
                        if got is not None:  # (None: step j is not quiet; it is planned)
                            now, ended = got
                            if ended is not None:  # (not admitted whole: the run ended after the step)
                                leave(run.done)
                                run, steady, fresh = None, None, ended
                            continue
                    end_run(run, rec)
                    leave(run.done)
                    run = None
                steady = None
            scheduler.add(Seq(req))
        if not (scheduler.waiting or scheduler.running):
            if head is not None:
                now = head.arrival_s  # idle: jump to the next arrival
            continue  # (or nothing left at all: the loop ends)
        if steady is not None:
            run, steady = QuietRun(scheduler, steady), None
        if run is not None:
            if run.limit == 1 and run.grown:  # step 0 only (the planned one): recorded at once
                now = _step_zero(run, engine, rec, now, intake if fifo and scheduler.waiting else None)
            elif fifo and scheduler.waiting and run.chunk is None:
                # every arrival joins behind the refused head (or is rejected) and changes no step:
                # the run goes on to its end, the arrivals taken in as its steps are recorded
                now = fast_forward(run, engine, rec, now, _INF, intake)
            else:
                until = head.arrival_s if head is not None else _INF
                now = fast_forward(run, engine, rec, now, until)
            if not run.paused:  # (paused: it stopped at the arrival `until` only)
                if run.j:
                    fresh = True  # every live request emitted at the run's last step
                end_run(run, rec)
                leave(run.done)  # requests that emitted their last token in the run
                run = None
            continue
        planned = scheduler.schedule()
        if not planned:
            raise RuntimeError(f"scheduler made no progress at t={now:.3f}s with {len(scheduler.waiting)} "
                               f"waiting and {len(scheduler.running)} running")
        if plan_runs and fresh:
            held = scheduler.steady_plan(planned)
            if held is not None:  # the step is a steady one: step 0 of a quiet run (its grows are made)
                st = scheduler.strategy
                st.take_copies()  # (handed over as `Scheduler.batch` would)
                run = QuietRun(scheduler, _new_tuple(Quiet, (len(planned), held, len(scheduler.waiting),
                                                             scheduler.num_preemptions,
                                                             st.slot_states(scheduler.waiting_kv_len()), ())),
                               grown=True)
                continue
        ev = scheduler.event(planned, layout, not layout)  # (no layout: seqs made only where read)
        dt = engine.step(ev.batch)
        rec.step(ev, now, dt)
        if not layout:
            ev.batch.seqs.seal()  # (`complete` moves the progress they would be made of)
        now += dt
        done = scheduler.complete(planned)
        fresh = scheduler.emitted_all
        steady = None
        if engine.fast_forward:
            steady = Quiet.of(ev) if ev.steady and not done else quiet_after(scheduler, ev, bool(done))
        if done:
            leave(done)
    bar.close()
    rec.close()
    return Replay(finished, rec)


def quiet_plans(scheduler: Scheduler) -> bool:
    """Whether a steady planned step may start a quiet run (`QuietRun(grown=True)`): quiet steps
    may follow steps of this scheduler and strategy (a plain model, a strategy whose decodes
    keep its pages) and the strategy moves no pages to host (a step's host moves would be
    priced in it). Pure."""
    st = scheduler.strategy
    moves = getattr(getattr(st, "take_host_moves", None), "__func__", Strategy.take_host_moves)
    return (getattr(st, "fast_forward", True) and getattr(scheduler, "kv_read_groups", None) is None
            and (moves is Strategy.take_host_moves or getattr(st, "host_tier_tokens", 1) == 0))


def quiet_after(scheduler: Scheduler, ev: StepEvent, left: bool = True) -> Quiet | None:
    """After a step `ev` that was not steady, whether the next steps are quiet all the same:
    nobody waits, nobody was preempted, every running request ran in the step, emitted a token
    and has only decodes left (its prefill, or its last chunk, finished there). Then the next
    step decodes every running request once, as a steady step would have, and fast-forward may
    start at once, from the slot states the strategy reports now. The requests whose step was
    not a decode make their first quiet grow at its own step, in running order (a strategy may
    do more than move a slot on that grow: paged registers the prompt's full pages). `left`: some
    requests finished in the step and were released; else the strategy is as the step's event
    read it, and its states are the event's (nobody waits: read without a waiting head). Pure."""
    running = scheduler.running
    # (every running request emitted in the step: it ran in it, and `complete` counted what they
    # hold and which were not decodes, in running order)
    if not running or not scheduler.emitted_all:
        return None
    waiting = scheduler.waiting
    if waiting:
        return _quiet_behind(scheduler, ev, left)
    if ev.preempted:
        return None
    held, fresh = scheduler.held_after
    states = scheduler.strategy.slot_states(None) if left else ev.states
    return _new_tuple(Quiet, (len(running), held, 0, scheduler.num_preemptions, states, tuple(fresh)))


def _quiet_behind(scheduler: Scheduler, ev: StepEvent, left: bool) -> Quiet | None:
    """`quiet_after` with requests waiting (the step may have preempted some: they wait in
    front): the next steps are quiet too where every running request emitted in the step and
    has only decodes left (none whose step was not a decode: its first grow, not at a page
    start, is one the head's guard does not check), and the request the scheduler tries first
    in the next step is refused there, or nobody is tried (`kvbench.quiet.head_need` 0). The
    next step decodes every running request once (d = len(running): the budget left to the
    head is max_num_batched_tokens - d, as in every step of the run), then tries the head. Why
    its refusal is known now: head_need 1 (paged without prefix caching, no host tier): the
    strategy refuses it now (`still_refused`, admit's decision with that budget), and the
    step's grows take free pages only or none (the run stops before any other), which leaves
    it refused (see head_need). head_need 2 (paged, prefix caching, plain LRU): the next step
    takes no page (see below), so its grows leave the pool admission sees as it is now, and the
    head is refused now (`still_refused`: admit's decision, its match retried as admit retries
    it): the match the run keeps is the one stepping's refusal in step 0 leaves, and from step
    1 on the run is one behind a head refused in the step before (`quiet_pages`' guard).
    Everything else the run needs is what a run after a steady step has: the queue's head stays
    while it lasts (fcfs: arrivals join behind it; another policy: an arrival ends the run
    before it starts, `replay`), and nobody is admitted, preempted or passed over in its steps. Mutates only the strategy's waiting match (still_refused, as the
    scheduler's refused retry would in the next step)."""
    held, fresh = scheduler.held_after
    if fresh:
        return None
    d = len(scheduler.running)
    need = head_need(scheduler, d)
    st = scheduler.strategy
    waiting = scheduler.waiting  # (not left: the event's states, read with the same head, as now)
    states = st.slot_states(waiting[0].request.kv_len) if left else ev.states
    if need == 1 or need == 2:
        refused = getattr(st, "still_refused", None)
        if refused is None:
            return None
        if need == 2:
            # the next step takes no page: no request's last page is full (paged: a request holds
            # its computed positions). Then its grows only move slots from reserved to token in the
            # requests' own pages: they take, evict, register and release nothing, so the pool the
            # head's admission sees in it is the one now, whatever the waiting match was before
            # (asked here, the match is the head's before those grows: stepping makes it after them,
            # the same). Where the step takes pages, stepping runs its grows with the match it kept
            # (another request's, or this one's as last retried), not one retried now: the guard's
            # argument covers the steps after a refusal in the step before, not this (checked on
            # results/baselines' paged-shared_prefix, whose numbers moved when it was allowed)
            ps = st.page_size
            for s in scheduler.running:
                if not s.computed % ps:
                    return None
        h = _first_tried(scheduler)
        req = h.request
        if not refused(h.id, req.tokens if scheduler._ids else None, h.prefill_target,
                       scheduler.max_num_batched_tokens - d):
            return None
    elif need != 0:
        return None
    return _new_tuple(Quiet, (d, held, len(waiting), scheduler.num_preemptions, states, ()))


def fast_forward(run: QuietRun, engine: Engine, rec: Recorder, now: float, until: float,
                 intake: Callable[[float], list[float]] | None = None) -> float:
    """The quiet steps of `run` (none if it has none), stopping before a step that would start
    at or after `until` (an arrival); returns the clock after them. Priced in chunks: step j
    reads d more K/V positions than step j - 1, and starts where j - 1 ended (a sequential sum,
    as stepping adds them); chunks of 32 steps first, 4x longer each time, a chunk that is done
    growing by the next while the same requests run (recorded once, as one DecodeRun). A step that moved
    pages to host (a host tier's evictions) takes the copy time longer and the chunk's later steps
    start that much later, as stepping gives them. After a step in which requests emitted their
    last token they leave (`run.retire`) and the chunk goes on, its rest priced again for the
    others (with nobody taken in: its steps up to the leave are a segment of the chunk's
    DecodeRun, `_Chunk.segs`, recorded with it). The caller
    ends the run (`end_run`) unless it is `paused` at `until`: then the chunk in progress is kept
    (`run.chunk`: an arrival behind a refused head changes neither the steps nor their prices,
    only the waiting count of the rows) and recorded when it is done. Mutates (through `run`)
    the strategy, the scheduler's running requests and their progress, and the recorder.

    `intake` (with `until` infinite: requests wait, fcfs): before a chunk is recorded, the
    arrivals up to its end are taken in (`intake(t)` returns the arrival times of those that
    joined the queue); a step counts those that arrived at or before its start as waiting, as
    pausing at each arrival (`until`) would count them."""
    c = run.chunk
    prices = getattr(engine, "decode_cost_list", None)  # (the same floats as decode_costs, as a list)
    while True:
        if c is None:
            left = run.left
            if left <= 0:
                break
            d, kv_read = len(run.live), run.kv_read  # every decode reads one position more each step
            dts = _next_prices(run, engine, prices, left, d, kv_read, until - now)
            c = _Chunk(list(accumulate(dts, initial=now)), dts, kv_read, d)  # starts [k + 1]: a sequential sum
        starts, k, over = c.starts, len(c.dts), False
        while c.i < k:
            i0 = c.i
            want = bisect_left(starts, until, i0, k)  # the steps that start before `until`
            if want == i0:
                break
            got = run.run(want - i0, c.cols, c.stretches)
            if intake is None and got:
                c.wait(run.waiting, got)
            c.i = i = i0 + got
            if run.moved is not None:
                # step i - 1 moved pages to host: it takes the copy time longer, as stepping charges
                # it, and every later step of the chunk starts that much later (then `until` again)
                dts = c.dts
                dts[i - 1] += engine.move_time(*run.moved)
                if c.moved is None:
                    c.moved = [0, 0]
                c.moved[0] += run.moved[0]
                c.moved[1] += run.moved[1]
                t = starts[i - 1] + dts[i - 1]
                for x in range(i, k):
                    starts[x] = t
                    t += dts[x]
                starts[k] = t
                if run.finishing is None:
                    continue
            if run.finishing is not None or i < want:  # some leave, or the next step's pages are not free
                over = True
                break
        now = starts[c.i]
        if not over:
            if c.i < k:
                break  # paused at `until`, the chunk kept
            left = run.left
            if left > 0:  # the chunk is done and the run goes on with the same requests: it grows
                dts = _next_prices(run, engine, prices, left, c.d, run.kv_read, until - now)  # (one DecodeRun for the run up to its next leave)
                c.dts += dts
                starts.pop()  # (the end of the last step: the first start of the sum that follows)
                starts += accumulate(dts, initial=now)
                continue
        if intake is None and run.finishing is not None and run.j < run.limit and now < until:
            # they leave (`run.retire`) and the others go on in the same chunk, a segment of its
            # DecodeRun each (recorded with it), its steps from now priced again for the others
            c.leave(run)
            run.retire()
            left = run.left
            if left <= 0:  # (the head is no longer refused: the run ends here)
                break
            d, kv_read = len(run.live), run.kv_read
            dts = _next_prices(run, engine, prices, left, d, kv_read, until - now)
            i = c.i
            del c.dts[i:], starts[i:]  # (the steps priced for those who left; starts[i] is now)
            c.dts += dts
            starts += accumulate(dts, initial=now)
            c.kv_read, c.d = kv_read, d
            continue
        if intake is None:
            _record(run, c, rec, c.waiting)
        elif c.i:
            joined = intake(now)
            _record(run, c, rec, _waiting_rows(run.waiting, joined, starts, c.i))
            run.waiting += len(joined)
        c = run.chunk = None
        if run.finishing is not None and run.j < run.limit and now < until:
            run.retire()  # they leave; the others go on (nobody waits)
            continue
        if over:
            break
    run.chunk = c
    return now


def _next_prices(run: QuietRun, engine: Engine, prices, left: int, d: int, kv_read: int,
                 horizon: float = float("inf")) -> list[float]:
    """The step times of the next chunk of `run`: min(left, its chunk size) steps of d decodes, the
    first reading kv_read positions, each d more (`prices`: the engine's decode_cost_list, or None:
    decode_costs). The chunk size grows 4x a chunk, up to _CHUNK. Past the first chunk, no more
    steps than may start within `horizon` seconds (the arrival that pauses the run): a step
    reads more than the one before, so it takes no less time than the first, and at most
    horizon / first + 1 steps start within it (+ 1 for rounding; a chunk that falls short grows
    by the next one, as a chunk does). Any chunking prices every step the same. Mutates
    run.chunk_size."""
    size = run.chunk_size
    k = left if left < size else size
    if size < _CHUNK:
        run.chunk_size = 4 * size if 4 * size < _CHUNK else _CHUNK
    if size > _FIRST_CHUNK and horizon < _INF and k > _FIRST_CHUNK:
        first = prices(d, kv_read, 1)[0] if prices is not None else float(engine.decode_costs(d, np.array([kv_read]))[0])
        if first > 0 and horizon / first + 2 < k:
            k = max(int(horizon / first) + 2, 1)
    if prices is not None:
        return prices(d, kv_read, k)
    return engine.decode_costs(d, np.arange(kv_read, kv_read + d * k, d, dtype=np.int64)).tolist()


def _step_zero(run: QuietRun, engine: Engine, rec: Recorder, now: float,
               intake: Callable[[float], list[float]] | None) -> float:
    """`fast_forward` of a run that is its planned step 0 only (`limit` 1): that step, priced and
    recorded as fast_forward prices and records it (a chunk of one step), without a chunk;
    returns the clock after it. The caller's arrivals are all later than `now`, so the step
    runs. Mutates as fast_forward does."""
    d, kv_read = len(run.live), run.kv_read
    prices = getattr(engine, "decode_cost_list", None)
    dts = prices(d, kv_read, 1) if prices is not None else \
        engine.decode_costs(d, np.arange(kv_read, kv_read + d, d, dtype=np.int64)).tolist()
    end = now + dts[0]  # (accumulate's sum)
    stretches: list[tuple] = []
    run.run(1, [[], [], [], [], [], []], stretches)  # (step 0's grows are made: it appends one stretch)
    waiting = run.waiting
    if intake is not None:
        joined = intake(end)
        waiting = _waiting_rows(waiting, joined, [now, end], 1)
        run.waiting += len(joined)
    done = [run.seqs[x].request for x in run.finishing] if run.finishing is not None else ()
    rec.quiet_steps(run.requests, [now], dts, 1, kv_read, d, waiting, run.preemptions, _NO_ROWS, None, done, stretches)
    return end


def _mixes(run: QuietRun, req: Request) -> bool:
    """Whether the next step of `run` (paused at the arrival of `req`, nobody waiting) may be
    taken inside it with `req`'s admission (`admit_step`): the run may go on (nobody waits, no
    host moves, its step 0 run) and `req` emits more than one token. Pure."""
    return (run.waiting == 0 and run._guard is None and run._moves is None and not run.grown
            and run.left > 0 and req.output_len > 1)


def admit_step(run: QuietRun, seq: Seq, scheduler: Scheduler, engine: Engine, rec: Recorder,
               now: float) -> tuple[float, bool | None] | None:
    """Step j of `run` with the arrival `seq` admitted in it, as `Scheduler.schedule` plans it
    (nobody waits: every running request decodes, in running order, then fcfs admission tries
    `seq` with the budget they leave): the run's step j (its page takes, in running order; the
    other decodes stay deferred: they move slots from reserved to token, registering nothing
    admission could see, except where a decode fills a page, which a strategy that caches
    prefixes may register at that grow: those are made first), then the admission, priced and
    recorded as the step (`Recorder.mixed_step`: the same row, first token and gaps as
    `Recorder.step`, which records a step that moves pages or copies them). Admitted with its
    whole prompt, `seq` joins the run (`QuietRun.join`), which goes on (returns (clock, None));
    else (refused, or its prompt chunked) the run ends after the step (returns (clock, whether
    every running request emitted in it)), and the next step is planned. None where step j is
    not quiet (its takes need pages that are not free: nothing done but the chunk recorded).
    Mutates the run, the strategy, the scheduler's queue and running requests, the recorder."""
    c = run.chunk
    if c is not None:
        _record(run, c, rec, c.waiting)
        run.chunk = None
    st, j, d, kv_read = run.st, run.j, len(run.live), run.kv_read
    if not run.run(1, [[], [], [], [], [], []], []):
        return None
    seqs, ps = run.seqs, st.page_size
    if ps > 1 and st.caches_prefixes:  # decodes that filled a page in step j: grown (as stepping grows them)
        held, e = run.held, j + 1
        for i in run.live:
            s = seqs[i]
            pos = s.computed + e
            if not pos % ps:
                if held is None:
                    g0 = run.g0
                    held = run.held = [x.computed + g0 for x in seqs]
                if held[i] < pos:
                    run._grow(s, pos - held[i])
                    run.deferred -= pos - held[i]
                    held[i] = pos
    scheduler.add(seq)
    scheduler._admitted = []
    planned: list[tuple[Seq, int]] = []
    scheduler._admit(planned, scheduler.max_num_batched_tokens - d)
    tokens, decode, pairs, first = d, d, 0, None
    if planned:
        _, n = planned[0]
        c0, t = seq.computed, seq.prefill_target
        tokens += n
        kv_read += c0 + n
        if c0 >= t:
            decode += 1
        else:
            pairs = n * c0 + n * (n + 1) // 2
        if c0 + n >= t:
            first = seq.request
    d2h, h2d = st.take_host_moves()
    copies = st.take_copies()
    waiting = scheduler.waiting
    token, reserved, internal, external, cached, free = st.slot_states(waiting[0].request.kv_len if waiting else None)
    dfr = run.deferred
    run.states = states = _new_tuple(SlotStates, (token + dfr, reserved - dfr, internal, external, cached, free))
    if d2h or h2d or copies or decode > d:  # (moves, copies: recorded by `Recorder.step`, as stepping records them)
        batch = StepBatch.counted(RunSeqs(run.requests, j, planned), ps, st.num_pages, st.contiguous, copies, h2d, d2h, tokens, decode, kv_read,
                                  pairs)
        ev = _new_tuple(StepEvent, (batch, len(scheduler.running), len(waiting), scheduler.num_preemptions, states,
                                    scheduler._admitted, []))
        dt = engine.step(batch)
        rec.step(ev, now, dt)
    else:
        rows = RunSeqs(run.requests, j, planned)
        dt = engine.step(StepBatch.counted(rows, ps, st.num_pages, st.contiguous, copies, 0, 0, tokens, decode, kv_read,
                                           pairs))
        rows.seal()  # (the run's progress moves on)
        rec.mixed_step(now, dt, run.requests, [seqs[i] for i in run.finishing] if run.finishing is not None else (),
                       len(scheduler.running), len(waiting), tokens - decode, decode, kv_read,
                       scheduler.num_preemptions, pairs, states, scheduler._admitted, first)
    now += dt
    if planned:
        seq.computed += planned[0][1]
        if seq.computed >= seq.prefill_target:  # its prompt is done: it emitted its first token
            seq.emitted += 1
            if run.finishing is not None:
                run.retire()
            run.join(seq)
            return now, None
    end_run(run, rec)
    return now, not planned


def end_run(run: QuietRun, rec: Recorder) -> None:
    """Record the chunk in progress, then end the run (`QuietRun.end`)."""
    c = run.chunk
    if c is not None:
        _record(run, c, rec, c.waiting)
        run.chunk = None
    run.end()


class _Chunk:
    """Up to k quiet steps of one `QuietRun` priced at once (the same live requests), those run
    so far (`i`) not yet recorded."""

    __slots__ = ("starts", "dts", "kv_read", "d", "i", "cols", "stretches", "waiting", "moved", "segs", "i0")

    def __init__(self, starts: list[float], dts: list[float], kv_read: int, d: int) -> None:
        self.starts, self.dts, self.kv_read, self.d = starts, dts, kv_read, d  # [k + 1], [k]: of the live requests
        self.i, self.waiting, self.moved = 0, None, None  # moved: [d2h, h2d] once a step moved pages
        # segs: (steps, kv_read, requests, those that left after its last step) of each segment that
        # ended where requests left (None: none did), the steps before i0 (the last one's first)
        self.segs, self.i0 = None, 0
        cols = self.cols = StateColumns(([], [], [], [], [], []))  # slot states: rows and stretches (QuietRun.run)
        cols.stretches = self.stretches = []

    def leave(self, run: QuietRun) -> None:
        """The `finishing` requests of `run` leave after step i - 1: the segment up to it ends."""
        done = [run.seqs[x].request for x in run.finishing]
        seg = (self.i - self.i0, self.kv_read, run.requests, done)
        if self.segs is None:
            self.segs = [seg]
        else:
            self.segs.append(seg)
        self.i0 = self.i

    def wait(self, waiting: int, n: int) -> None:
        """n more steps run with `waiting` requests waiting: `waiting` stays the one count of every
        step run so far (None before the first), or becomes a list of each step's where it
        changes (an arrival joined a refused head's queue while the run was paused)."""
        w = self.waiting
        if w is None or w.__class__ is int and w == waiting:
            self.waiting = waiting
        else:
            if w.__class__ is int:
                w = self.waiting = [w] * (self.i)
            w += [waiting] * n


def _record(run: QuietRun, c: _Chunk, rec: Recorder, waiting: int | list[int]) -> None:
    """The chunk's steps run so far, as one `DecodeRun` (`Recorder.quiet_steps`: its requests
    that finished in the last one leave; its segments before, `c.segs`, where some left before);
    `waiting`: the requests waiting in every step, or in each."""
    i = c.i
    if not i:
        return
    segs = c.segs or ()
    if i > c.i0:
        seqs, kv_read, d = run.requests, c.kv_read, c.d
        done = [run.seqs[x].request for x in run.finishing] if run.finishing is not None else ()
    else:  # (no step after the last leave: its segment is the last)
        segs, (_, kv_read, seqs, done) = segs[:-1], segs[-1]
        d = len(seqs)
    rec.quiet_steps(seqs, c.starts, c.dts, i, kv_read, d, waiting, run.preemptions, c.cols, c.moved,
                    done, c.stretches, run.j > i, segs)  # (follows: the run's steps before the chunk's were recorded)


def _waiting_rows(base: int, joined: list[float], starts: list[float], i: int) -> int | list[int]:
    """The requests waiting in each of the first i steps starting at `starts`: `base`, plus those
    of `joined` (sorted arrival times) at or before the step's start; an int where all are equal."""
    if not joined or joined[0] > starts[i - 1]:
        return base
    w: list[int] = []
    x = 0
    for n, a in enumerate(joined):
        y = bisect_left(starts, a, x, i)  # the first step that starts at or after the arrival
        if y > x:
            w += [base + n] * (y - x)
            x = y
    w += [base + len(joined)] * (i - x)
    return w


_CHUNK = 4096  # quiet steps priced at once, at most
_FIRST_CHUNK = 32  # quiet steps priced first (QuietRun.chunk_size: most runs end at an arrival within a few dozen)
_INF = float("inf")
_NO_ROWS = ((), (), (), (), (), ())  # a DecodeRun's states where no step took a page (read, never appended to)
_new_tuple = tuple.__new__  # (a NamedTuple without its Python __new__)
