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

Host moves: swaps happen only in steps that preempt or admit (never quiet). A strategy with a
host tier copies a page to host when it evicts one: a quiet step that takes pages asks the
strategy for its moves (`take_host_moves`, as `Scheduler.batch` would) and, where it moved any,
the run stops after that step and reports them (`moved`): the caller prices the step with the
copy time, as stepping charges it, and starts the next run from there.

Windows (issue 16): a step of a model with sliding-window or chunked layers reads, per request,
min(context, window) positions in those layers, so quiet steps do not read d more positions each
(the closed form `kv_read0 + j * d` of kvbench.replay / events.DecodeRun): such a model's runs
never fast-forward (limit 0 when the scheduler has `kv_read_groups`; kvbench.run also turns the
engine's fast_forward off), exactly as a hybrid pool's.

Costs: O(d) `room` calls at the start; per step O(1) plus O(requests taking a page there),
plus one `slot_states` where a page is taken.
"""
from __future__ import annotations

from kvbench.scheduler import Scheduler
from kvbench.strategies.base import SlotStates, Strategy


class QuietRun:
    """Up to `limit` quiet steps after a steady step that ran with `states` (see module doc).
    Mutates the strategy (grows) and, at `end`, the running requests' progress.

    `fresh` (only with nobody waiting): requests (indices in running order) whose last step was
    not a decode; their first quiet grow is made at step 0 in running order, as a page-taking
    one (with the strategy's own states read after it), whatever their `room`."""

    def __init__(self, scheduler: Scheduler, states: SlotStates, fresh: tuple[int, ...] = ()) -> None:
        self.sched, self.st = scheduler, scheduler.strategy
        self.seqs = list(scheduler.running)
        self.states = states
        self.may_take_pages = not scheduler.waiting
        st = self.st  # a strategy that may move pages to host when it evicts: moves asked after each take
        moves = getattr(getattr(st, "take_host_moves", None), "__func__", Strategy.take_host_moves)
        self._moves = None if moves is Strategy.take_host_moves or getattr(st, "host_tier_tokens", 1) == 0 \
            else st.take_host_moves
        self.moved: tuple[int, int] | None = None  # (d2h, h2d) of the last step run, where it moved any
        self.j = 0  # steps run
        self.held = [s.computed for s in self.seqs]  # positions each holds in the strategy
        self.deferred = 0  # decoded positions not yet grown in the strategy
        self.pages_at: dict[int, list[int]] = {}  # step → requests (indices) taking a page in it
        limit = 1 << 62
        if len(self.seqs) > scheduler.max_num_batched_tokens or not getattr(self.st, "fast_forward", True) \
                or getattr(scheduler, "kv_read_groups", None) is not None:
            limit = 0  # (fast_forward False: a strategy whose decodes may free pages, e.g. a hybrid pool;
            # kv_read_groups: a windowed model, whose decode steps do not read d more positions each)
        for i, s in enumerate(self.seqs):
            limit = min(limit, s.request.output_len - s.emitted - 1)  # none finishes
            if limit <= 0:
                break
            room = 0 if i in fresh else self.st.room(s.id, s.computed)
            if self.may_take_pages:
                self.pages_at.setdefault(room, []).append(i)
            else:
                limit = min(limit, room)
        self.limit = max(limit, 0)

    def run(self, k: int) -> list[tuple[int, ...]]:
        """Make the grows of up to k next quiet steps; the slot states of each step that ran
        (fewer than k where the run ends, where requests would need pages that are not free, or
        after a step that moved pages to host: `moved` says so)."""
        st, seqs, held, pages_at = self.st, self.seqs, self.held, self.pages_at
        j, d, stop, deferred = self.j, len(seqs), min(self.j + k, self.limit), self.deferred
        token, reserved, internal, external, cached, free = self.states
        rows = []
        self.moved = None
        while j < stop:
            takers = pages_at.pop(j, None)
            if takers is None:  # nobody takes a page: d slots move from reserved to token
                token, reserved, deferred = token + d, reserved - d, deferred + d
                rows.append((token, reserved, internal, external, cached, free))
                j += 1
                continue
            if free + cached < len(takers) * st.page_size:
                pages_at[j] = takers
                break
            for i in sorted(takers):  # running order
                s, was = seqs[i], held[i]
                pos = s.computed + j  # the position this step writes: it needs a page
                if pos > was:
                    self._grow(s, pos - was)  # its deferred decodes, inside its room
                self._grow(s, 1)
                held[i] = pos + 1
                deferred -= pos - was
                pages_at.setdefault(j + 1 + st.room(s.id, pos + 1), []).append(i)
            deferred += d - len(takers)
            token, reserved, internal, external, cached, free = st.slot_states(self.sched.waiting_kv_len())
            token, reserved = token + deferred, reserved - deferred
            rows.append((token, reserved, internal, external, cached, free))
            j += 1
            if self._moves is not None:
                moved = self._moves()
                if moved != (0, 0):
                    self.moved = moved
                    break
        self.states = SlotStates(token, reserved, internal, external, cached, free)
        self.j, self.deferred = j, deferred
        return rows

    def end(self) -> int:
        """Make the deferred grows, advance every request by the steps run, and check the
        strategy's slot states against the last step's. Returns the steps run."""
        k = self.j
        if k == 0:
            return 0
        for s, held in zip(self.seqs, self.held):
            if s.computed + k > held:
                self._grow(s, s.computed + k - held)
            s.computed += k
            s.emitted += k
        now = self.st.slot_states(self.sched.waiting_kv_len())
        if now != self.states:
            raise RuntimeError(f"fast-forward: strategy '{self.st.label}' reports {now} after {k} quiet "
                               f"decode steps of {len(self.seqs)} requests, but {self.states} was expected "
                               f"(a decode inside a request's `room` moves one slot from reserved to token)")
        return k

    def _grow(self, s, n: int) -> None:
        if not self.st.grow(s.id, n):
            raise RuntimeError(f"fast-forward: request {s.id}: grow({n}) failed in a quiet step (the "
                               f"strategy's `room`, or its free + cached slots, promised more than it holds)")
