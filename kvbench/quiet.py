"""Quiet steps: the strategy's side of the sim's fast-forward (kvbench/replay.py drives the clock).

After a steady step (every running request decoded one token; nobody came, left or was
preempted) the next steps repeat it until a request arrives or, with requests waiting, until a
request finishes or would take a new page (so none can be preempted, and the waiting head,
refused in the steady step, stays refused), except where the strategy and the queue make the
head's refusal last through a take (`head_need`: nobody is tried; or paged without prefix
caching and radix, no host tier, while the takes need no eviction: free pages only, so the
run's steps take pages with requests waiting too; or paged with prefix caching and plain LRU,
whose `quiet_pages` runs a take, evicting or not, only where it shows the head's refusal lasts
through it, and which, after some leave, says whether the head is still refused in the next
step: the run then goes on past the finish). With nobody waiting, steps may take pages while free
+ cached slots could give each request that needs one a page, and a request that emits its last
token leaves after that step (released, in running order, as `Scheduler.complete` releases it):
the run goes on with the others, as stepping would (with nobody waiting the next step admits
nobody and decodes every running request once).

What the strategy sees is exactly what stepping gives it. A decode inside a request's `room`
(no page taken) only moves one of its slots from reserved to token; those grows are deferred
and made as one `grow` per request, just before the request takes its next page, before it
leaves, and at the end of the run. The grows that take pages are made at their own step, in
running order, after the request's deferred ones (paged: a run's page-taking steps in one
call, `PagedStrategy.quiet_pages`: the same grows without a call each). A step's slot states
are the strategy's own where a page was taken or a request left (corrected by the deferred
tokens), else the last step's with d more slots moved from reserved to token; at the end the
strategy's states must equal the last step's (`end` checks).

Host moves: swaps happen only in steps that preempt or admit (never quiet). A strategy with a
host tier copies a page to host when it evicts one: a quiet step that takes pages asks the
strategy for its moves (`take_host_moves`, as `Scheduler.batch` would) and, where it moved any,
`run` stops after that step and reports them (`moved`): the caller prices the step with the
copy time, as stepping charges it, and goes on from there.

Windows (issue 16): a step of a model with sliding-window or chunked layers reads, per request,
min(context, window) positions in those layers, so quiet steps do not read d more positions each
(the closed form `kv_read0 + j * d` of kvbench.replay / events.DecodeRun): such a model's runs
never fast-forward (limit 0 when the scheduler has `kv_read_groups`; kvbench.run also turns the
engine's fast_forward off), exactly as a hybrid pool's.

Costs: O(d) `room` calls at the start (with requests waiting and no page-taking step, fewer: they
stop at the first request that takes a page right after step 0); per step O(1) plus O(requests
taking a page there), plus one `slot_states` where a page is taken or a request leaves. What a
run keeps per request is built once (`fin`), or at its first page-taking step or leave (`held`).
"""
from __future__ import annotations

from heapq import heappop, heappush
from typing import NamedTuple

from kvbench.events import StepEvent
from kvbench.scheduler import Scheduler, Seq
from kvbench.strategies.base import SlotStates, Strategy

_new_tuple = tuple.__new__


class Quiet(NamedTuple):
    """What fast-forward needs of the step before a quiet run (a steady `StepEvent` has it too)."""

    running: int
    kv_read: int  # K/V positions the step before read (as if it decoded all): the first quiet step reads `running` more
    waiting: int
    preemptions: int
    states: SlotStates
    fresh: tuple[int, ...] = ()  # requests (indices in running order) whose last step was not a decode

    @staticmethod
    def of(ev: StepEvent) -> Quiet:
        return Quiet(ev.running, ev.batch.kv_read_tokens, ev.waiting, ev.preemptions, ev.states)


class QuietRun:
    """Up to `limit` quiet steps after a steady step described by `steady` (see module doc).
    Mutates the strategy (grows, and releases of the requests that finish), the scheduler's
    `running` (they leave it) and the running requests' progress (a leaving one's when it
    leaves, the others' at `end`).

    `steady.fresh` (only with nobody waiting): requests (indices in running order) whose last
    step was not a decode; their first quiet grow is made at step 0 in running order, as a
    page-taking one (with the strategy's own states read after it), whatever their `room`.

    `grown`: step 0 is a step the scheduler planned (`Scheduler.schedule`: its grows made, the
    queue's head refused) and found steady (`Scheduler.steady_plan`): then `steady.states` are
    step 0's own (the strategy's, read after planning), `steady.kv_read` what the step before
    would read, and the run's steps from 1 on are quiet as after a steady step."""

    # (slots: over 29 attributes an instance's would sit in a plain dict, slower to read)
    __slots__ = ("sched", "st", "seqs", "live", "requests", "states", "kv_read", "waiting", "preemptions",
                 "head_need", "may_take_pages", "_moves", "_room", "_bulk", "_merge", "moved", "j", "grown",
                 "held", "deferred", "pages_at", "fin", "finishing", "done", "blocked", "chunk", "chunk_size",
                 "limit", "_takes", "_fin_steps", "_next_fin", "g0", "_pages", "_rids", "_comp", "_guard",
                 "_live_ids")

    def __init__(self, scheduler: Scheduler, steady: Quiet, grown: bool = False) -> None:
        self.sched = scheduler
        self.st = st = scheduler.strategy
        self.seqs = seqs = list(scheduler.running)
        n = len(seqs)
        self.live = range(n)  # indices of the requests still running, in running order (a list once some left)
        self.requests = seqs  # the live ones (the recorder reads their ids: `DecodeRun.seqs`)
        self.states = steady.states
        self.kv_read = steady.kv_read + n  # K/V positions step j reads (every live request decodes)
        self.waiting, self.preemptions = steady.waiting, steady.preemptions
        # with requests waiting, which page-taking steps may run (`head_need`): 0 any, 1 those
        # that take free pages only, None none; with nobody waiting 0
        waits = bool(scheduler.waiting)
        self.head_need = need = head_need(scheduler, n) if waits and n else 0
        self.may_take_pages = need is not None
        # (head_need 2: the request the scheduler tries first, whose refusal the strategy's
        # `quiet_pages` checks before each page-taking step; else None)
        if need == 2:  # (its id, num_prompt and the budget admission gives it while these n decode)
            h = _first_tried(scheduler)
            self._guard = (h.id, h.prefill_target, scheduler.max_num_batched_tokens - n)
        else:
            self._guard = None
        # (host moves asked after each take, `room`, bulk decode steps, whether no run may go on:
        # the strategy's and the scheduler's, looked up once)
        self._moves, room_of, self._bulk, never, whole, self._pages = scheduler.quiet_calls or _calls(scheduler)
        self._rids = self._comp = None  # (the requests' ids and computed positions, for `_pages`: made at its first call)
        self._live_ids = None  # (the live requests' ids, for `_bulk`: made at its first call, again after a leave)
        self._room = room_of
        # grow(a) then grow(b) leaves the strategy as grow(a + b) does (slab; paged without prefix
        # caching or forks): a taker's deferred grows and its page-taking one are one call (asked
        # where a step's takers grow one by one; None: not yet)
        self._merge = None
        self.moved: tuple[int, int] | None = None  # (d2h, h2d) of the last step run, where it moved any
        self.j = 0  # steps run
        self.grown = grown  # step 0's grows are made, its states are `states` (it is recorded first)
        self.g0 = g = 1 if grown else 0  # (the positions step 0 took)
        # positions each holds in the strategy (None: computed + g0 for all, until a grow in the run)
        self.held: list[int] | None = None
        self.deferred = 0  # decoded positions of live requests not yet grown in the strategy
        self.pages_at: dict[int, list[int]] = {}  # step → requests (indices) taking a page in it
        self.fin = fin = [s.request.output_len - s.emitted - 1 for s in seqs]  # the step in which each emits its last token
        self.finishing: list[int] | None = None  # requests (indices) that emitted their last token in step j - 1
        self.done: list[Seq] = []  # requests that left, in the order they left
        self.blocked = False  # a step's requests needed pages that were not free: the run is over
        self.chunk = None  # the caller's steps priced and not yet recorded (kvbench.replay)
        self.chunk_size = 32  # steps the caller prices next (most runs end at an arrival within a few dozen)
        first = min(fin) if n else 0  # (the first step in which some emit their last token)
        if not n or n > scheduler.max_num_batched_tokens or never:
            limit = 0  # (no fast-forward for the strategy: one whose decodes may free pages, e.g. a hybrid pool;
            # or a windowed model, whose decode steps do not read d more positions each)
        elif need is not None:
            fresh, pages_at, ps = steady.fresh, self.pages_at, st.page_size
            # the step in which each takes its next page: its `room`, or the rest of its last page
            # where the strategy has none; 0 for a fresh one (unless step 0 was planned)
            if whole:  # (a room that holds the final length: none but a fresh one takes a page)
                rooms = [0 if not g and i in fresh else 1 << 62 for i in range(n)] if fresh else ()
            elif room_of is not None:
                rooms = [0 if not g and i in fresh else g + room_of(s.id, s.computed + g) for i, s in enumerate(seqs)]
            elif ps == 1:  # (every room is 0: each takes a page in step g, a fresh one too)
                rooms = ()
                at = [i for i in range(n) if g <= fin[i]]
                if at:
                    pages_at[g] = at
            else:
                rooms = [g + -(s.computed + g) % ps for s in seqs]
                if fresh and not g:
                    for i in fresh:
                        rooms[i] = 0
            for i, room in enumerate(rooms):
                if room <= fin[i]:
                    at = pages_at.get(room)
                    if at is None:
                        pages_at[room] = [i]
                    else:
                        at.append(i)
            # nobody waiting: the run may go on until the last one leaves; else the first to
            # finish ends it (the next step admits), unless the strategy guards the head's refusal
            # (head_need 2: `retire` asks it whether the head is still refused after they leave)
            limit = first + 1 if waits and need != 2 else max(fin) + 1
        else:
            limit = first + 1  # the first to finish ends the run: the next step admits
            ps = st.page_size
            for s in () if whole else seqs:  # none takes a page (after step 0)
                room = g + (room_of(s.id, s.computed + g) if room_of is not None else -(s.computed + g) % ps)
                if room < limit:
                    limit = room
                    if limit <= g:  # (no lower: a room is >= 0)
                        break
        self.limit = limit if limit > 0 else 0
        if self.pages_at:
            self._takes = sorted(self.pages_at)  # the keys of pages_at, a heap
        else:
            self._takes = []
        if limit > first + 1:  # (the run may go on past the first to finish: nobody waits)
            # the steps in which requests finish, next last: sorted at the first finish (most runs end at an
            # arrival before it)
            self._fin_steps = None
            self._next_fin = first
        else:
            self._fin_steps = []
            self._next_fin = first if n else 1 << 62

    def run(self, k: int, cols: list[list[int]], stretches: list[tuple]) -> int:
        """Make the grows of up to k next quiet steps; the slot states of each step that ran are
        appended as stretches (events.DecodeRun: m steps whose token and reserved slots move by
        d a step) to `stretches` (a page-taking step's own states head the stretch of the steps
        after it), except those of the strategy's bulk steps (`decode_steps`), appended to `cols`
        as rows (6 lists: token, reserved, internal, external, cached, free; a stretch says how
        many of those come before it); returns how many ran (fewer than k where the run ends,
        where requests would need pages that are not free, after a step that moved pages to
        host: `moved` says so, or after a step in which requests emitted their last token:
        `finishing` says which; `retire` or `end` lets them leave). Steps where nobody takes a
        page go as one stretch, O(1) in Python."""
        st, seqs, held, pages_at, fin, takes = self.st, self.seqs, self.held, self.pages_at, self.fin, self._takes
        if takes is None:  # (sorted after `_pages`' last call, where the run went on)
            takes = self._takes = sorted(pages_at)
        if held is None and takes:
            g0 = self.g0
            held = self.held = [s.computed + g0 for s in seqs]
        grow, room, merge, moves = st.grow, self._room, self._merge, self._moves
        ps = st.page_size
        j0 = j = self.j
        d, stop, deferred = len(self.live), min(self.j + k, self.limit, self._next_fin + 1), self.deferred
        token, reserved, internal, external, cached, free = self.states
        explicit = cols[0]  # (len(explicit): rows in `cols`)
        self.moved = None
        bulk, free_only, pbulk, guard = self._bulk, self.head_need == 1, self._pages, self._guard
        if self.grown and j < stop:  # step 0, planned by the scheduler: its states are the strategy's own
            self.grown = False
            j += 1
            nxt = takes[0] if takes else stop
            if nxt > j < stop:  # it heads the stretch of the steps after it (as the loop below makes it)
                m = (nxt if nxt < stop else stop) - j
                stretches.append((len(explicit), m + 1, token, reserved, d, internal, external, cached, free))
                token, reserved, deferred = token + d * m, reserved - d * m, deferred + d * m
                j += m
            else:
                stretches.append((len(explicit), 1, token, reserved, 0, internal, external, cached, free))
        head = False  # the last step took pages: its states (the strategy's) head the stretch that follows
        while j < stop:
            nxt = takes[0] if takes else stop
            if nxt > j:  # nobody takes a page up to step nxt: each step moves d slots from reserved to token
                m = (nxt if nxt < stop else stop) - j
                if head:  # (the page-taking step and the m after it: one stretch)
                    stretches.append((len(explicit), m + 1, token, reserved, d, internal, external, cached, free))
                    head = False
                else:
                    stretches.append((len(explicit), m, token + d, reserved - d, d, internal, external, cached, free))
                token, reserved, deferred = token + d * m, reserved - d * m, deferred + d * m
                j += m
                continue
            if head:  # (a page-taking step right after another: a stretch of one)
                stretches.append((len(explicit), 1, token, reserved, 0, internal, external, cached, free))
                head = False
            if pbulk is not None:  # the strategy's page-taking steps in one call (paged)
                rids = self._rids
                if rids is None:
                    rids = self._rids = [s.id for s in seqs]
                    self._comp = [s.computed for s in seqs]
                got = pbulk(rids, self._comp, held, pages_at, j, stop, free_only, d, deferred, cols, stretches,
                            guard)
                if got is not None:
                    n, token, reserved, internal, cached, free, deferred = got
                    external = 0
                    j += n
                    # (takes past a request's last step go when it leaves: `retire`)
                    if j < stop:
                        takes[:] = sorted(pages_at)
                    else:  # (sorted at the next call, if the run goes on)
                        self._takes = None
                    continue
            takers = pages_at.pop(j)
            nt = len(takers)
            if free + cached < nt * ps or (free_only and free < nt * ps) or guard is not None:
                # (some would be preempted; or, with requests waiting, the head might fit after it;
                # or the strategy's guard, `pbulk`, did not show that it stays refused)
                pages_at[j] = takers  # (left as they were)
                self.blocked = True
                break
            heappop(takes)
            if bulk is not None and deferred == 0 and nt == d:  # every live request takes a page
                # (the takers are the live requests; each holds computed + j positions: deferred is 0)
                ids = self._live_ids
                if ids is None:
                    ids = self._live_ids = [s.id for s in self.requests]  # running order
                most = stop - j if not free_only else min(stop - j, free // (nt * ps))  # (free pages only)
                n = bulk(ids, most, cols)  # >= 1 step (free + cached suffice)
                j += n
                # each holds n more (the entries of requests that left are never read again)
                held = self.held = [h + n for h in held]
                # (nobody emits its last token before step _next_fin: up to it, every live one takes again)
                nxt = list(self.live) if j <= self._next_fin else [i for i in self.live if j <= fin[i]]
                if nxt:
                    pages_at[j] = nxt
                    heappush(takes, j)
                token, reserved, internal, external, cached, free = (cols[0][-1], cols[1][-1], cols[2][-1],
                                                                     cols[3][-1], cols[4][-1], cols[5][-1])
                if moves is not None:
                    moved = moves()
                    if moved != (0, 0):
                        self.moved = moved
                        break
                continue
            if nt > 1:
                takers.sort()  # running order
            if merge is None:
                merge = self._merge = getattr(st, "grows_merge", False)
            deferred += d - nt
            for i in takers:
                s = seqs[i]
                was, pos = held[i], s.computed + j  # (pos: the position this step writes: it needs a page)
                held[i] = nxt = pos + 1
                deferred -= pos - was
                if merge:  # its deferred decodes and this step's position in one grow
                    if not grow(s.id, nxt - was):
                        self._failed(s, nxt - was)
                else:
                    if pos > was and not grow(s.id, pos - was):  # its deferred decodes, inside its room
                        self._failed(s, pos - was)
                    if not grow(s.id, 1):
                        self._failed(s, 1)
                nxt = j + 1 + (room(s.id, nxt) if room is not None else -nxt % ps)
                if nxt <= fin[i]:
                    at = pages_at.get(nxt)
                    if at is None:
                        pages_at[nxt] = [i]
                        heappush(takes, nxt)
                    else:
                        at.append(i)
            token, reserved, internal, external, cached, free = st.slot_states(self.sched.waiting_kv_len())
            token, reserved = token + deferred, reserved - deferred
            head = True
            j += 1
            if moves is not None:
                moved = moves()
                if moved != (0, 0):
                    self.moved = moved
                    break
        if head:
            stretches.append((len(explicit), 1, token, reserved, 0, internal, external, cached, free))
        self.states = _new_tuple(SlotStates, (token, reserved, internal, external, cached, free))  # (no Python __new__)
        self.kv_read += (j - j0) * d
        self.j, self.deferred = j, deferred
        if j == self._next_fin + 1:
            self.finishing = [i for i in self.live if fin[i] == j - 1]
            steps = self._fin_steps
            if steps is None:
                steps = self._fin_steps = sorted(set(fin), reverse=True)
                steps.pop()  # (the first, just run)
            self._next_fin = steps.pop() if steps else 1 << 62
        return j - j0

    @property
    def left(self) -> int:
        """Steps the live requests may still run together: up to the end of the run, or to (and
        with) the next step in which some emit their last token."""
        end = self._next_fin + 1
        return (end if end < self.limit else self.limit) - self.j

    @property
    def paused(self) -> bool:
        """Whether the run may go on (it stopped only where its caller said: an arrival)."""
        return self.j < self.limit and not self.blocked and self.finishing is None

    def retire(self) -> None:
        """The `finishing` requests leave (their deferred grows made, their progress advanced,
        released in running order by the scheduler); the next step's states are the strategy's
        own (corrected by the others' deferred tokens)."""
        j, seqs, held = self.j, self.seqs, self.held
        if held is None:
            g0 = self.g0
            held = self.held = [s.computed + g0 for s in seqs]
        done = []
        for i in self.finishing:
            s = seqs[i]
            pos = s.computed + j
            was = held[i]
            if pos > was:
                self._grow(s, pos - was)
                self.deferred -= pos - was
            held[i] = pos
            s.computed, s.emitted = pos, s.emitted + j
            self.kv_read -= pos + 1  # what it would have read in step j
            done.append(s)
        if self._rids is not None:  # (`_pages` puts a taker's next take page_size steps on, past its last step too)
            self._drop_takes()
        self._leave(done)
        token, reserved, internal, external, cached, free = self.st.slot_states(self.sched.waiting_kv_len())
        self.states = _new_tuple(SlotStates, (token + self.deferred, reserved - self.deferred, internal, external,
                                              cached, free))
        if self._guard is not None:  # requests wait: the run goes on only while the head stays refused
            self._refused()

    def join(self, seq: Seq) -> None:
        """`seq`, whose prompt was computed whole in the step before step j (admitted there with
        nobody else waiting, `kvbench.replay.admit_step`; it emitted its first token there and has
        more to come), runs from step j on with the others. Its progress is kept as the run keeps
        every request's (s.computed + t: the position it writes in step t; emitted + k after k
        steps, set as offsets from the run's start); its first grow is made at step j as a fresh
        request's (a page-taking one, in running order: it joins last). Nobody waits (the run's
        limit is the last finish). Mutates the run and `seq`'s progress."""
        j, i = self.j, len(self.seqs)
        prompt = seq.computed
        seq.computed, seq.emitted = prompt - j, seq.emitted - j  # (offsets: position and count at step j)
        self.requests = [*self.requests, seq]  # (new lists: the recorder may hold the old ones)
        self.seqs = [*self.seqs, seq]
        self.live = [*self.live, i]
        held = self.held
        if held is None:
            g0 = self.g0
            held = self.held = [s.computed + g0 for s in self.seqs[:i]]
        held.append(prompt)
        f = seq.request.output_len - seq.emitted - 1  # the step in which it emits its last token
        self.fin.append(f)
        self.kv_read += prompt + 1
        at = self.pages_at.get(j)
        if at is None:
            self.pages_at[j] = [i]
            if self._takes is not None:
                heappush(self._takes, j)
        else:
            at.append(i)
        if self._rids is not None:
            self._rids.append(seq.id)
            self._comp.append(seq.computed)
        if self._live_ids is not None:
            self._live_ids.append(seq.id)
        if f >= self.limit:
            self.limit = f + 1
        nxt, steps = self._next_fin, self._fin_steps
        if f < nxt:
            if steps is not None and nxt < 1 << 62:
                steps.append(nxt)  # (the smallest of those left: the list is in descending order)
            self._next_fin = f
        elif f > nxt and steps is not None and f not in steps:
            steps.append(f)
            steps.sort(reverse=True)

    def _refused(self) -> None:
        """After some left (head_need 2): whether the scheduler would refuse the head in the next
        step j, asked of the strategy now (`still_refused`: admit's decision, its match retried
        as admit retries it); if not, or if the head is no longer one whose refusal the strategy
        guards, the run ends here (`limit`: step j is planned). Exact where step j takes no page:
        the pool admission sees after step j's grows is the one now (the others' decodes fill
        their own pages), and a retry finds what this one found. Where step j takes pages,
        `quiet_pages` guards them from this retry's match (the page it misses first, its cached
        hits), as it guards a step after a planned one. Mutates the strategy's waiting match only
        (as the scheduler's refused retry does)."""
        sched, n = self.sched, len(self.live)
        if not n or head_need(sched, n) != 2:
            self.limit = self.j
            self._guard = None
            return
        h = _first_tried(sched)
        budget = sched.max_num_batched_tokens - n
        req = h.request
        if self.st.still_refused(h.id, req.tokens, h.prefill_target, budget):
            self._guard = (h.id, h.prefill_target, budget)
        else:
            self.limit = self.j
            self._guard = None

    def _drop_takes(self) -> None:
        """The `finishing` requests' next takes leave `pages_at` (and `_takes`): each has at most
        one, at its next page start from step j on (the strategy's `room` is the contract's
        default: `_pages` and the run put every take at a page start, but a fresh request's
        step 0). Mutates."""
        j, pages_at, comp, ps = self.j, self.pages_at, self._comp, self.st.page_size
        keys = False  # (whether a step's takers are all gone)
        for i in self.finishing:
            at = j + -(comp[i] + j) % ps  # (comp[i] + t: the position it writes in step t)
            takers = pages_at.get(at)
            if takers is not None and i in takers:
                if len(takers) > 1:
                    takers.remove(i)
                else:
                    del pages_at[at]
                    keys = True
        if keys and self._takes is not None:  # (else sorted at the next `run`)
            self._takes[:] = sorted(pages_at)

    def _leave(self, done: list[Seq]) -> None:
        finishing, live = self.finishing, self.live
        if len(finishing) == 1:  # (most often one leaves: the lists less its place, new lists, as the
            x = live.index(finishing[0])  # recorder may hold the old `requests`)
            self.live = [*live[:x], *live[x + 1:]]  # (live may be a range)
            r = self.requests
            self.requests = r[:x] + r[x + 1:]
            ids = self._live_ids
            if ids is not None:
                self._live_ids = ids[:x] + ids[x + 1:]
        else:
            gone = set(finishing)
            self.live = [i for i in live if i not in gone]
            self.requests = [self.seqs[i] for i in self.live]
            self._live_ids = None
        self.finishing = None
        self.sched.retire(done)
        self.done += done

    def end(self) -> int:
        """Make the deferred grows, advance every request by the steps run, check the
        strategy's slot states against the last step's, then let the `finishing` requests
        leave. Returns the steps run."""
        k = self.j
        if k == 0:
            if self.grown:
                raise RuntimeError("fast-forward: a run whose step 0 was planned ended before it (its grows are made)")
            return 0
        seqs, held, grow = self.seqs, self.held, self.st.grow
        n = k - self.g0  # the deferred grows of a request that made none in the run
        if held is None and n > 0:
            for s in seqs if type(self.live) is range else [seqs[i] for i in self.live]:  # (range: nobody left)
                if not grow(s.id, n):
                    self._failed(s, n)
                s.computed += k
                s.emitted += k
        elif held is None or not self.deferred:  # nothing deferred (each holds computed + k): they only advance
            for s in seqs if type(self.live) is range else [seqs[i] for i in self.live]:
                s.computed += k
                s.emitted += k
        else:
            for i in self.live:
                s = seqs[i]
                m = s.computed + k - held[i]
                if m > 0 and not grow(s.id, m):
                    self._failed(s, m)
                s.computed += k
                s.emitted += k
        # (a run that is its planned step 0 only made no call since it read the strategy's states)
        now = self.states if n == 0 and held is None else self.st.slot_states(self.sched.waiting_kv_len())
        if now != self.states:
            raise RuntimeError(f"fast-forward: strategy '{self.st.label}' reports {now} after {k} quiet "
                               f"decode steps of {len(self.seqs)} requests, but {self.states} was expected "
                               f"(a decode inside a request's `room` moves one slot from reserved to token)")
        if self.finishing:  # they leave (`live` and `requests` stay: the run is over)
            done = [seqs[i] for i in self.finishing]
            self.finishing = None
            self.sched.retire(done)
            self.done += done
        return k

    def _grow(self, s, n: int) -> None:
        if not self.st.grow(s.id, n):
            self._failed(s, n)

    @staticmethod
    def _failed(s, n: int) -> None:
        raise RuntimeError(f"fast-forward: request {s.id}: grow({n}) failed in a quiet step (the "
                           f"strategy's `room`, or its free + cached slots, promised more than it holds)")


def head_need(scheduler: Scheduler, d: int) -> int | None:
    """With requests waiting and `d` requests running, all decoding (a quiet run: nobody is
    admitted, preempted or leaves before its end), which page-taking steps may be fast-forwarded
    (`QuietRun.run` checks each). Pure.

    0: any that leaves nobody short of a page: the scheduler tries nobody (`max_num_seqs`
    running, no token budget left, or a whole prompt over the budget without chunked prefill:
    all fixed while the same requests run).

    1: those whose requests take only free pages (none evicted), on a strategy whose refusal
    outlasts such takes (`Strategy.refusal_outlasts_free_takes`): then the first request the
    scheduler tries, refused in the step before the run, is refused after the step too. That
    request is fixed while the run lasts (fcfs: the queue's head, nobody joining in front; lpm,
    dfs_weight or dedup_prefix: the first urgent one, as passed-over counts change only when
    someone is admitted; with nobody in a prefill dedup_prefix defers nobody). Its refusal
    stays: a refused admission changes nothing (the contract); paged without prefix caching
    refuses while it needs more pages than are free, and taking free pages only lowers that;
    radix refuses while it needs more than free + evictable pages less the evictable ones on its
    own path, and a decode's grow inserts nothing (radix inserts at prefill and release) and,
    taking a free page, evicts nothing: its match and path stay, the free pages drop.

    2: those the strategy shows keep that request refused (`guards_refusal`: paged with prefix
    caching and plain LRU, where a take may evict one of its cached hits and a decode registers
    its full pages, which may extend its match): `QuietRun` passes the request (id, num_prompt,
    the budget admission gives it) to `quiet_pages`, which checks each page-taking step before
    it runs it (see there), and after a finish asks `still_refused` (`QuietRun.retire`).

    None: otherwise (the run stops before a page-taking step, as before): another strategy (slab
    takes no page in a decode; a hybrid pool or a windowed model never fast-forwards); a host
    tier; paged with prefix caching and another eviction policy (a decode registers its full
    pages, which may extend the head's match; a take may evict its hits); lpm or dfs_weight
    without an urgent request (the order is the cached prefixes'); a swapped head."""
    st = scheduler.strategy
    budget = scheduler.max_num_batched_tokens - d
    if budget <= 0 or d >= scheduler.max_num_seqs:
        return 0
    head = _first_tried(scheduler)
    if head is None:
        return None
    if not scheduler.chunked_prefill and budget < head.prefill_target - head.swapped <= scheduler.max_num_batched_tokens:
        return 0
    if head.swapped:
        return None
    if st.refusal_outlasts_free_takes:
        return 1
    return 2 if getattr(st, "guards_refusal", False) else None


def _first_tried(scheduler: Scheduler) -> Seq | None:
    """The waiting request that admission tries first while nobody is admitted (see
    `head_need`), or None where that is the policy's order of cached prefixes. Pure."""
    waiting = scheduler.waiting
    if scheduler.fifo_admission:
        return waiting[0]
    bound = scheduler.max_wait_steps
    head = next((s for s in waiting if s.passed >= bound or s.preemptions), None)
    if head is None and scheduler.policy == "fcfs":
        head = waiting[0]  # (fcfs with dedup_prefix, nobody urgent: queue order)
    return head


def _calls(scheduler: Scheduler) -> tuple:
    """The strategy's calls a quiet run makes, looked up once per scheduler (`quiet_calls`):
    - `take_host_moves` of a strategy that may move pages to host when it evicts (asked after
      each take), else None;
    - its `room`, or None where it is the contract's default (the rest of the last page: computed
      by the run, without a call per page-taking request and step);
    - `decode_steps` of a strategy whose every decode takes a page (radix, page_size 1: such
      steps in bulk; its class's method: a wrapper that forwards other names, e.g. a checker,
      grows per token), else None;
    - whether no run may fast-forward (a strategy whose decodes may free pages, e.g. a hybrid
      pool, `fast_forward` false; or a windowed model: the scheduler has `kv_read_groups`);
    - whether the strategy's class says its `room` holds every request's final length
      (`room_holds_final_length`: slab's reservation; room(rid, n) = kv_len - n, so a room
      never ends a run before its request's last step and is not asked);
    - `quiet_pages` of a strategy whose class has it (paged: a run's page-taking steps in one
      call; it answers None where its grows have more to do, then the run grows per taker),
      else None."""
    st = scheduler.strategy
    moves = getattr(getattr(st, "take_host_moves", None), "__func__", Strategy.take_host_moves)
    moves = None if moves is Strategy.take_host_moves or getattr(st, "host_tier_tokens", 1) == 0 else st.take_host_moves
    room = None if getattr(st.room, "__func__", None) is Strategy.room else st.room
    bulk = st.decode_steps if st.page_size == 1 and hasattr(type(st), "decode_steps") else None
    # (`quiet_pages` and the run's `_drop_takes` put every take at a page start: not with a room of the
    # strategy's own, e.g. paged with `scheduled` visibility)
    pages = st.quiet_pages if hasattr(type(st), "quiet_pages") and room is None else None
    never = not getattr(st, "fast_forward", True) or getattr(scheduler, "kv_read_groups", None) is not None
    whole = getattr(type(st), "room_holds_final_length", False) and room is not None
    scheduler.quiet_calls = calls = (moves, room, bulk, never, whole, pages)
    return calls
