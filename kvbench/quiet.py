"""Quiet steps: the strategy's side of the sim's fast-forward (kvbench/replay.py drives the clock).

After a steady step (every running request decoded one token; nobody came, left or was
preempted) the next steps repeat it until a request would finish or, with requests waiting,
take a new page (so none can be preempted, and the waiting head, refused in the steady step,
stays refused). With nobody waiting, steps may take pages while free + cached slots could give
each request that needs one a page.

What the strategy sees is exactly what stepping gives it. A decode inside a request's `room`
(no page taken) only moves one of its slots from reserved to token; those grows are deferred
and made as one `grow` per request, just before the request takes its next page and at the end
of the run. The grows that take pages are made at their own step, in running order, after the
request's deferred ones. A step's slot states are the strategy's own where a page was taken
(corrected by the deferred tokens), else the last step's with d more slots moved from reserved
to token; at the end the strategy's states must equal the last step's (`end` checks).

Costs: O(d) `room` calls at the start; per step O(1) plus O(requests taking a page there).
"""
from __future__ import annotations

from kvbench.scheduler import Scheduler
from kvbench.strategies.base import SlotStates


class QuietRun:
    """Up to `limit` quiet steps after a steady step that ran with `states` (see module doc).
    Mutates the strategy (grows) and, at `end`, the running requests' progress."""

    def __init__(self, scheduler: Scheduler, states: SlotStates) -> None:
        self.sched, self.st = scheduler, scheduler.strategy
        self.seqs = list(scheduler.running)
        self.states = states
        self.may_take_pages = not scheduler.waiting
        self.j = 0  # steps run
        self.held = [s.computed for s in self.seqs]  # positions each holds in the strategy
        self.deferred = 0  # decoded positions not yet grown in the strategy
        self.pages_at: dict[int, list[int]] = {}  # step → requests (indices) taking a page in it
        limit = 1 << 62
        if len(self.seqs) > scheduler.max_num_batched_tokens:
            limit = 0
        for i, s in enumerate(self.seqs):
            limit = min(limit, s.request.output_len - s.emitted - 1)  # none finishes
            if limit <= 0:
                break
            room = self.st.room(s.id, s.computed)
            if self.may_take_pages:
                self.pages_at.setdefault(room, []).append(i)
            else:
                limit = min(limit, room)
        self.limit = max(limit, 0)

    def step(self) -> SlotStates | None:
        """Run the next quiet step's grows; its slot states, or None if it cannot run quietly."""
        j, d = self.j, len(self.seqs)
        if j >= self.limit:
            return None
        takers = self.pages_at.pop(j, None)
        st, states = self.st, self.states
        if takers:
            if states.free + states.cached < len(takers) * st.page_size:
                self.pages_at[j] = takers
                return None
            for i in sorted(takers):  # running order
                s, held = self.seqs[i], self.held[i]
                pos = s.computed + j  # the position this step writes: it needs a page
                if pos > held:
                    self._grow(s, pos - held)  # its deferred decodes, inside its room
                self._grow(s, 1)
                self.held[i] = pos + 1
                self.deferred -= pos - held
                self.pages_at.setdefault(j + 1 + st.room(s.id, pos + 1), []).append(i)
            self.deferred += d - len(takers)
            now = st.slot_states(self.sched.waiting_kv_len())
            states = now._replace(token=now.token + self.deferred, reserved=now.reserved - self.deferred)
        else:
            self.deferred += d
            states = states._replace(token=states.token + d, reserved=states.reserved - d)
        self.states, self.j = states, j + 1
        return states

    def end(self) -> int:
        """Make the deferred grows, advance every request by the steps run, and check the
        strategy's slot states against the last step's. Returns the steps run."""
        k = self.j
        for s, held in zip(self.seqs, self.held):
            if s.computed + k > held:
                self._grow(s, s.computed + k - held)
            s.computed += k
            s.emitted += k
        now = self.st.slot_states(self.sched.waiting_kv_len())
        if k and now != self.states:
            raise RuntimeError(f"fast-forward: strategy '{self.st.label}' reports {now} after {k} quiet "
                               f"decode steps of {len(self.seqs)} requests, but {self.states} was expected "
                               f"(a decode inside a request's `room` moves one slot from reserved to token)")
        return k

    def _grow(self, s, n: int) -> None:
        if not self.st.grow(s.id, n):
            raise RuntimeError(f"fast-forward: request {s.id}: grow({n}) failed in a quiet step (the "
                               f"strategy's `room`, or its free + cached slots, promised more than it holds)")
