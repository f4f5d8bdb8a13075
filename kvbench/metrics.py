"""One event stream per run → the requests table, the timeline table and summary.json.

Definitions are in docs/metrics.md; the key names are DESIGN.md's and stay stable.
"""
from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np
import pandas as pd

from kvbench.batch import PlannedSeqs
from kvbench.events import DecodeRun, StepEvent
from kvbench.request import Request
from kvbench.runstats import runs_mean, runs_percentiles
from kvbench.strategies.base import SlotStates
from kvbench.timeline_file import TimelineFile

STATES = SlotStates._fields  # token, reserved, internal, external, cached, free
_STATE_KEY = {"token": "token_states", "reserved": "reserved", "internal": "internal_frag",
              "external": "external_frag", "cached": "cached", "free": "free"}
TIMELINE_COLUMNS = ["t_s", "dt_s", "running", "waiting", "prefill_tokens", "decode_tokens",
                    "kv_read_tokens", "preemptions", *STATES, "prefill_pairs"]
_INT_COLUMNS = len(TIMELINE_COLUMNS) - 3  # the int32 ones: running .. the states (prefill_pairs apart, int64)
_INT_NAMES = TIMELINE_COLUMNS[2:-1]
TIMELINE_DTYPES = {c: np.float64 if c in ("t_s", "dt_s") else np.int64 for c in TIMELINE_COLUMNS}
REQUEST_COLUMNS = ["id", "arrival_s", "prompt_len", "output_len", "status", "reason", "cached_tokens",
                   "preemptions", "first_token_s", "finish_s", "ttft_s", "e2e_s", "tpot_s"]
_FIN_INTS = 5  # a finished request's id, prompt_len, output_len, cached_tokens, preemptions (int64)
_FIN_FLOATS = 3  # its arrival_s, first_token_s, finish_s (float64)
_BUFFER_ROWS = 1 << 14  # rows held as lists and segments before `Recorder._settle` moves them to the arrays
_I32_MAX = (1 << 31) - 1


@dataclass(slots=True, eq=False)
class _Times:
    """What the events said of one admitted request, while it runs (then: `Recorder._finish`)."""

    request: Request
    cached_tokens: int  # prompt positions served from cache at its first admission
    preemptions: int = 0
    first_token_s: float = np.nan
    last_token_s: float = 0.0
    finish_s: float = np.nan


class Recorder:
    """Consumes the scheduler's events, step by step; turns them into tables at the end.

    Storage per step: one timeline row in three flat arrays (2 float64 + 12 int32 + the step's
    prefill query-key pairs in one int64 = 72 bytes; they overflow int32 in long prefills);
    with a `sink` (a `TimelineFile`) the rows go to disk every `chunk_rows` steps, so only one
    chunk is held. The latest rows (up to `_BUFFER_ROWS`) wait as Python lists: a stepped step as
    its values, a `DecodeRun` as one segment with its times and its slot-state stretches, its
    gaps as a placeholder; `_settle` makes their rows and gaps in numpy (so a quiet step costs no
    Python work of its own here). Per request: one `_Times` while it runs; when it finishes, 64 bytes in two
    flat arrays (`_FIN_INTS`, `_FIN_FLOATS`), the `_Times` (and its Request) dropped.
    Inter-token latencies as runs of equal gaps (value, count), in the order the tokens were
    produced (a decode step's requests share one gap): about one run (16 bytes) per step.
    """

    def __init__(self, capacity: int, sink: TimelineFile | None = None, chunk_rows: int = 1 << 16) -> None:
        self.capacity = capacity
        self._floats = array("d")  # t_s, dt_s of every step (not yet in the sink)
        self._ints = array("i")  # the other timeline columns of every step (not yet in the sink)
        self._pairs = array("q")  # prefill_pairs of every step (not yet in the sink)
        self._sink, self._flushed, self._last_ints = sink, 0, None  # rows in the sink, the last one's ints
        self._flush_at = 2 * chunk_rows if sink is not None else 1 << 62  # len(self._floats) that flushes
        # the latest rows, not yet in the arrays above (`_settle` moves them there in numpy, a block at a time):
        self._bt, self._bdt = [], []  # t_s, dt_s of each row
        self._bs = ([], [], [], [], [], [])  # the slot states' columns of the rows no stretch gives (runs')
        self._bst: list[tuple] = []  # the other rows' states as stretches (events.DecodeRun), in row order
        self._bgrp: list[tuple[int, int]] = []  # (stretches, rows of _bs before them) per run or step: the
        # stretches' first fields count the rows of _bs from there
        self._seg: list[tuple] = []  # (k, running, waiting, prefill, decode, kv_read0, preemptions, pairs) per
        # stepped step (k = 1) or DecodeRun (k steps; step j reads kv_read0 + j * decode)
        self._bwait: list[tuple[int, list[int]]] = []  # (first row, waiting per step) of runs whose waiting varies
        self._gfill: list[tuple[int, int, int, int]] = []  # (gaps before, first row, k - 1, d): a run's first k - 1 gaps
        self._settle_at = min(_BUFFER_ROWS, self._flush_at)
        self._times: dict[int, _Times] = {}  # requests admitted and not finished
        # (requests, time) per quiet run (`quiet_steps`) whose requests' last token time is not yet
        # in their `_Times` (`_write_held`: before `step` reads them); a run's next segment replaces
        # its last one (`follows`)
        self._held: list[tuple] = []
        self._fin_ints, self._fin_floats = array("q"), array("d")  # finished requests, in finish order
        self._gaps, self._gap_counts = array("d"), array("q")  # closed runs of equal ITL gaps
        self._bg, self._bc = [], []  # the latest closed runs of gaps, not yet in the arrays (but runs': _gfill)
        self._gap, self._gap_count = 0.0, 0  # the open run
        self.rejected: list[tuple[Request, str]] = []
        self.moved = [0, 0, 0, 0]  # token slots moved: swap-outs, swap-ins, all d2h, all h2d (issue 14)

    # ---- events -----------------------------------------------------------------------------
    def _row(self, t: float, dt: float, states) -> None:
        """A step's start, length and slot states (the timeline row's first columns)."""
        self._bt.append(t)
        self._bdt.append(dt)
        for col, x in zip(self._bs, states):
            col.append(x)

    def step(self, ev: StepEvent, t: float, dt: float) -> None:
        """One step [t, t + dt): its timeline row, and the output tokens it produced at t + dt."""
        b = ev.batch
        if self._held:
            self._write_held()
        self._row(t, dt, ev.states)
        self._seg.append((1, ev.running, ev.waiting, b.prefill_tokens, b.decode_tokens, b.kv_read_tokens,
                          ev.preemptions, b.prefill_pairs))
        times = self._times
        for req, cached in ev.admitted:
            times[req.id] = _Times(req, cached)
        for rid in ev.preempted:
            times[rid].preemptions += 1
        if b.d2h_tokens or b.h2d_tokens:
            m = self.moved
            m[0] += sum(o.tokens for o in b.swap_out)
            m[1] += sum(i.tokens for i in b.swap_in)
            m[2] += b.d2h_tokens
            m[3] += b.h2d_tokens
        end = t + dt
        gap, count = self._gap, self._gap_count
        seqs = b.seqs
        if seqs.__class__ is PlannedSeqs and seqs.made is None:  # (the scheduler's plan, read as it stands)
            emitted = [(q.request, pos) for q, n in seqs.rows if (pos := q.computed + n) >= q.prefill_target]
        else:
            emitted = [(s.request, s.start + s.num_new) for s in seqs if s.emits]
        for r, pos in emitted:  # output token number pos - prompt_len is out
            tm = times[r.id]
            if pos == r.prompt_len:
                tm.first_token_s = end
            else:
                g = end - tm.last_token_s
                if g == gap:
                    count += 1
                else:
                    if count:
                        self._bg.append(gap)
                        self._bc.append(count)
                    gap, count = g, 1
            tm.last_token_s = end
            if pos == r.kv_len:
                self._finish(tm, end)
        self._gap, self._gap_count = gap, count
        if len(self._bt) >= self._settle_at:
            self._settle()

    def mixed_step(self, t: float, dt: float, seqs, done, running: int, waiting: int, prefill: int, decode: int,
                   kv_read: int, preemptions: int, pairs: int, states, admitted: list, first) -> None:
        """`step` of a step a quiet run takes with an arrival's admission (kvbench.replay
        `admit_step`), without its event: `seqs` (a run's requests, each decoding one token, all
        of whose last tokens came out at t: every live request of a run emits in every step) and
        `done` (those of them that emitted their last token), `admitted` (the (request, cached)
        first admitted in it) and `first` (the admitted request that emitted its first token, or
        None). The same row, gaps, first token and finishes as `step`; the requests' last token
        time is held with `seqs` (as `quiet_steps` holds it)."""
        self._row(t, dt, states)
        self._seg.append((1, running, waiting, prefill, decode, kv_read, preemptions, pairs))
        times = self._times
        for req, hit in admitted:
            times[req.id] = _Times(req, hit)
        end = t + dt
        g = end - t  # (each request's gap: its last token came out at t)
        if g == self._gap:
            self._gap_count += len(seqs)
        else:
            if self._gap_count:
                self._bg.append(self._gap)
                self._bc.append(self._gap_count)
            self._gap, self._gap_count = g, len(seqs)
        self._held.append((seqs, end))
        for r in done:
            self._finish(times[r.id], end)
        if first is not None:
            tm = times[first.id]
            tm.first_token_s = tm.last_token_s = end
        if len(self._bt) >= self._settle_at:
            self._settle()

    def _write_held(self) -> None:
        """The last token times held from quiet runs into the `_Times` of their requests still in
        flight, in the runs' order."""
        times = self._times
        for seqs, last in self._held:
            for r in seqs:
                tm = times.get(r.id)
                if tm is not None:
                    tm.last_token_s = last
        self._held = []

    def _finish(self, tm: _Times, end: float) -> None:
        """Its last token came out at `end`: its numbers into the flat arrays, its `_Times` dropped."""
        r = tm.request
        self._fin_ints.extend((r.id, r.prompt_len, r.output_len, tm.cached_tokens, tm.preemptions))
        self._fin_floats.extend((r.arrival_s, tm.first_token_s, end))
        del self._times[r.id]

    def decode_run(self, run: DecodeRun) -> None:
        """k quiet decode steps at once: the same rows and token times as k calls of `step`
        (`quiet_steps` of its fields)."""
        t, dt = run.t, run.dt
        if isinstance(t, np.ndarray):
            t, dt = t.tolist(), dt.tolist()
        self.quiet_steps(run.seqs, t, dt, len(t), run.kv_read0, run.running, run.waiting, run.preemptions,
                         run.states, run.moved if run.moved != (0, 0) else None, run.done, run.stretches)
        self._write_held()  # (the caller's seqs may change after)

    def quiet_steps(self, seqs, t: list[float], dt: list[float], k: int, kv_read0: int, running: int,
                    waiting: int | list[int], preemptions: int, states: list[list[int]],
                    moved: tuple[int, int] | list[int] | None, done, stretches, follows: bool = False,
                    before: tuple | list = ()) -> None:
        """`decode_run` of `DecodeRun(seqs, t[:k], dt[:k], kv_read0, running, waiting, preemptions,
        states, moved or (0, 0), done, stretches)` without the event (the replay's chunks: t and dt
        may hold more than k; k >= 1). Held as one segment (its times and states as lists); its rows
        and its first k - 1 gaps are made with the rest of the block, in numpy (`_settle`: the same
        floats, one IEEE add or subtract each); its last gap, the open run, here. The requests' last
        token time is held with `seqs` (not changed after) until a `step` reads it; `follows`: no
        `step` came since the previous call, whose `seqs` less its `done` are these (a quiet run's
        next segment): its held time is superseded, so this call's replaces it.

        `before`: the run's segments that came first in these k steps, each (m, kv_read0, seqs, done)
        (m >= 1 steps of len(seqs) decodes, its `done` leaving after its last): the same rows,
        gaps, finishes and held time as a call per segment (the first with `follows`, each next
        one following it), and the states, `waiting` and `moved` of all k steps given here once."""
        bt, bdt = self._bt, self._bdt
        row = len(bt)
        bt += t
        bdt += dt
        if len(t) > k:
            del bt[row + k:]
        if len(dt) > k:
            del bdt[row + k:]
        s0, s1, s2, s3, s4, s5 = self._bs
        if stretches:
            self._bgrp.append((len(stretches), len(s0)))
            self._bst += stretches
        c0, c1, c2, c3, c4, c5 = states
        if c0:
            s0 += c0
            s1 += c1
            s2 += c2
            s3 += c3
            s4 += c4
            s5 += c5
        if not isinstance(waiting, int):
            self._bwait.append((row, waiting))
            waiting = 0
        d = len(seqs)
        if moved:  # a host tier's evictions in the run's page-taking steps
            self.moved[2] += moved[0]
            self.moved[3] += moved[1]
        if before:
            row, k = self._segments(before, row, k, waiting, preemptions)
        self._seg.append((k, running, waiting, 0, d, kv_read0, preemptions, 0))
        if self._gap_count:
            self._bg.append(self._gap)
            self._bc.append(self._gap_count)
        # every request's token j comes out at t[j] + dt[j], the one before at the end of step j - 1
        # (t[0] for j = 0): gap j = end j - end j - 1; the first k - 1 are filled in by `_settle`
        last = bt[-1] + bdt[-1]
        if k > 1:
            self._gfill.append((len(self._bg), row, k - 1, d))
            self._gap = last - (bt[-2] + bdt[-2])
        else:
            self._gap = last - bt[-1]
        self._gap_count = d
        held = self._held
        if follows and held:
            held[-1] = (seqs, last)
        else:
            held.append((seqs, last))
        times = self._times
        for r in done:
            self._finish(times[r.id], last)
        if len(bt) >= self._settle_at:
            self._settle()

    def _segments(self, before, row: int, k: int, waiting: int, preemptions: int) -> tuple[int, int]:
        """`quiet_steps`' segments `before`, from `row` (their rows are held): each its segment, its
        gaps (as `quiet_steps` makes them) and its finishes; returns the last segment's first row
        and steps."""
        bt, bdt, times = self._bt, self._bdt, self._times
        for m, kv_read0, seqs, done in before:
            d = len(seqs)
            self._seg.append((m, d, waiting, 0, d, kv_read0, preemptions, 0))
            if self._gap_count:
                self._bg.append(self._gap)
                self._bc.append(self._gap_count)
            e = row + m - 1  # its last step
            last = bt[e] + bdt[e]
            if m > 1:
                self._gfill.append((len(self._bg), row, m - 1, d))
                self._gap = last - (bt[e - 1] + bdt[e - 1])
            else:
                self._gap = last - bt[e]
            self._gap_count = d
            for r in done:
                self._finish(times[r.id], last)
            row += m
            k -= m
        return row, k

    def _settle(self) -> None:
        """The rows and gaps held as lists and segments into the flat arrays, in numpy (then, at
        `_flush_at` rows, into the sink)."""
        n = len(self._bt)
        if n:
            seg = _ints_of(self._seg, 8)  # [S, 8]
            k = seg[:, 0]
            rep = np.repeat(seg[:, 1:], k, axis=0)  # [n, 7]: running, waiting, prefill, decode, kv_read0, preemptions, pairs
            j = np.arange(n, dtype=np.int64)
            j -= np.repeat(np.cumsum(k) - k, k)  # each row's step in its segment
            rep[:, 4] += rep[:, 3] * j  # kv_read: kv_read0 + j * decode
            for row, waiting in self._bwait:
                rep[row:row + len(waiting), 1] = waiting
            ints = np.empty((n, _INT_COLUMNS), np.int64)
            ints[:, :6] = rep[:, :6]
            self._settle_states(ints[:, 6:])
            if len(ints) and (ints.max() > _I32_MAX or ints.min() < -_I32_MAX - 1):
                raise OverflowError("a timeline value does not fit the recorder's int32 columns")
            self._ints.frombytes(ints.astype(np.int32).tobytes())
            self._pairs.frombytes(rep[:, 6].tobytes())
            f = np.empty((2, n))
            f[0], f[1] = np.fromiter(self._bt, np.float64, n), np.fromiter(self._bdt, np.float64, n)
            self._floats.frombytes(f.T.tobytes())  # (row by row: t, dt interleaved)
            if self._gfill:  # a run's gaps j = end j - end j - 1 (end -1: t[0]), j < k - 1, among the others
                fill = _ints_of(self._gfill, 4)  # [R, 4]: gaps before, first row, k - 1, d
                m = fill[:, 2]
                before = np.cumsum(m) - m  # run gaps before each
                step = np.arange(int(m.sum()), dtype=np.int64) - np.repeat(before, m)
                rows = np.repeat(fill[:, 1], m) + step
                ends = f[0] + f[1]
                prev = np.empty(n)
                prev[1:] = ends[:-1]
                prev[fill[:, 1]] = f[0, fill[:, 1]]
                at = np.repeat(fill[:, 0] + before, m) + step  # their places among all gaps
                g = np.empty(len(self._bg) + len(at))
                c = np.empty(len(g), np.int64)
                g[at] = ends[rows] - prev[rows]
                c[at] = np.repeat(fill[:, 3], m)
                others = np.ones(len(g), bool)
                others[at] = False
                g[others] = self._bg
                c[others] = self._bc
                self._gaps.frombytes(g.tobytes())
                self._gap_counts.frombytes(c.tobytes())
            else:
                self._gaps.fromlist(self._bg)
                self._gap_counts.fromlist(self._bc)
            self._bt, self._bdt, self._bs, self._bst, self._bgrp = [], [], ([], [], [], [], [], []), [], []
            self._seg, self._bwait, self._gfill, self._bg, self._bc = [], [], [], [], []
        elif self._bg:
            self._gaps.fromlist(self._bg)
            self._gap_counts.fromlist(self._bc)
            self._bg, self._bc = [], []
        if len(self._floats) >= self._flush_at:
            self._flush()

    def _settle_states(self, out: np.ndarray) -> None:
        """The slot states of the rows held, [n, 6], into `out`: the stretches' rows, then the others'."""
        st = _ints_of(self._bst, 9)
        grp = _ints_of(self._bgrp, 2)
        m = st[:, 1]
        slope = m < 0  # free-slope stretches (events.DecodeRun): free, not reserved, falls by d a row
        sloped = bool(slope.any())
        if sloped:
            m = np.abs(m)
        before = np.cumsum(m) - m  # stretch rows before each
        first = st[:, 0] + np.repeat(grp[:, 1], grp[:, 0]) + before  # each stretch's first row
        i = np.arange(int(m.sum()), dtype=np.int64) - np.repeat(before, m)  # each stretch row's place in it
        rows = np.repeat(first, m) + i
        d = np.repeat(st[:, 4], m) * i
        out[rows, 0] = np.repeat(st[:, 2], m) + d
        out[rows, 2:] = np.repeat(st[:, 5:], m, axis=0)
        if sloped:
            fs = np.repeat(slope, m)
            out[rows, 1] = np.repeat(st[:, 3], m) - np.where(fs, 0, d)
            out[rows, 5] -= np.where(fs, d, 0)
        else:
            out[rows, 1] = np.repeat(st[:, 3], m) - d
        if self._bs[0]:
            mask = np.ones(len(out), bool)
            mask[rows] = False
            e = len(self._bs[0])
            out[mask] = np.fromiter(chain.from_iterable(self._bs), np.int64, 6 * e).reshape(6, e).T

    def _flush(self) -> None:
        """The rows held so far into the sink (one row group), then forgotten."""
        if not self._floats:
            return
        f = np.frombuffer(self._floats).reshape(-1, 2)
        i = np.frombuffer(self._ints, np.int32).reshape(-1, _INT_COLUMNS)
        cols = {"t_s": f[:, 0], "dt_s": f[:, 1], **{c: i[:, k] for k, c in enumerate(_INT_NAMES)},
                "prefill_pairs": np.frombuffer(self._pairs, np.int64)}
        self._sink.append(cols)
        self._flushed += len(f)
        self._last_ints = tuple(i[-1].tolist())
        del cols, f, i  # (the views pin the arrays' buffers)
        self._floats, self._ints, self._pairs = array("d"), array("i"), array("q")

    def close(self) -> None:
        """No more steps: the rows still held go to the sink, which is closed (no-op without one)."""
        self._settle()
        if self._sink is not None:
            self._flush()
            self._sink.close()

    def moves(self, bytes_per_token: int) -> dict:
        """summary.json's host-move keys: K/V token slots swapped out / in (preemption by swap)
        and bytes copied device -> host / host -> device (swaps plus the strategy's host tier)."""
        out, back, d2h, h2d = self.moved
        return {"swap_out_tokens": out, "swap_in_tokens": back, "d2h_bytes": d2h * bytes_per_token,
                "h2d_bytes": h2d * bytes_per_token}

    def reject(self, request: Request, reason: str) -> None:
        self.rejected.append((request, reason))

    # ---- tables -----------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self._flushed + len(self._floats) // 2 + len(self._bt)

    def last_states(self) -> SlotStates | None:
        """The slot states of the last step recorded."""
        if self._bt:
            self._settle()
        if not self._floats:
            return None if self._last_ints is None else SlotStates(*self._last_ints[-len(STATES):])
        return SlotStates(*self._ints[len(self._ints) - len(STATES):])

    def itl_runs(self) -> ItlRuns:
        """The inter-token gaps as runs: `itl()` is np.repeat(values, counts). Views of the
        recorder's arrays, no copy (16 bytes a step: 2.7 GB for 10^7 requests): the open run is
        closed first (a later equal gap starts a new run; the gaps are the same). While the views
        live the arrays cannot grow: call it when the steps are over."""
        self._settle()
        if self._gap_count:
            self._gaps.append(self._gap)
            self._gap_counts.append(self._gap_count)
            self._gap, self._gap_count = 0.0, 0
        return ItlRuns(np.frombuffer(self._gaps), np.frombuffer(self._gap_counts, np.int64))

    def itl(self) -> np.ndarray:
        """Every gap between two consecutive output tokens of a request [s], in token order
        (one float per output token: the summary reads `itl_runs()` instead)."""
        runs = self.itl_runs()
        return np.repeat(runs.values, runs.counts)

    def timeline_columns(self) -> TimelineFile | _Columns:
        """The timeline as columns, for `summarize`: the sink's file (closed first), or the rows held."""
        if self._sink is not None:
            self.close()
            return self._sink
        return _Columns(self)

    def timeline(self) -> pd.DataFrame:
        """The whole timeline as one frame (with a sink: read back from its file)."""
        if self._sink is not None:
            self.close()
            return self._sink.frame()
        self._settle()
        f = np.frombuffer(self._floats).reshape(-1, 2)
        i = np.frombuffer(self._ints, np.int32).reshape(-1, _INT_COLUMNS)
        # one column at a time into one 2-D block per dtype: no int64 copy of all the rows at once
        ints = np.empty((_INT_COLUMNS, len(i)), np.int64)
        for c in range(_INT_COLUMNS):
            ints[c] = i[:, c]
        cols = {"t_s": f[:, 0].copy(), "dt_s": f[:, 1].copy()}
        cols.update(zip(_INT_NAMES, ints))
        cols["prefill_pairs"] = np.frombuffer(self._pairs, np.int64).copy()
        return pd.DataFrame(cols, columns=TIMELINE_COLUMNS, copy=False)

    def requests(self) -> pd.DataFrame:
        """One row per request, sorted by id: every number from the events (status "finished"
        for every admitted request, as a replay ends with all of them finished)."""
        if not self._fin_ints and not self._times and not self.rejected:
            return pd.DataFrame.from_records([], columns=REQUEST_COLUMNS).sort_values("id", ignore_index=True)
        i = np.frombuffer(self._fin_ints, np.int64).reshape(-1, _FIN_INTS)
        f = np.frombuffer(self._fin_floats).reshape(-1, _FIN_FLOATS)
        if self._times or self.rejected:  # requests still running (none after a replay), then rejected
            ints, floats = [], []
            for tm in self._times.values():
                r = tm.request
                ints.append((r.id, r.prompt_len, r.output_len, tm.cached_tokens, tm.preemptions))
                floats.append((r.arrival_s, tm.first_token_s, tm.finish_s))
            for r, _ in self.rejected:
                ints.append((r.id, r.prompt_len, r.output_len, 0, 0))
                floats.append((r.arrival_s, np.nan, np.nan))
            i = np.concatenate((i, np.array(ints, np.int64).reshape(-1, _FIN_INTS)))
            f = np.concatenate((f, np.array(floats, np.float64).reshape(-1, _FIN_FLOATS)))
        n, admitted = len(i), len(i) - len(self.rejected)
        status = np.array(["finished"] * admitted + ["rejected"] * len(self.rejected), dtype=object)
        reason = np.array([""] * admitted + [why for _, why in self.rejected], dtype=object)
        order = np.argsort(i[:, 0], kind="stable")  # ids are unique
        arrival, first, finish = f[order, 0], f[order, 1], f[order, 2]
        output_len = i[order, 2]
        ttft, e2e = first - arrival, finish - arrival
        tpot = np.full(n, np.nan)
        np.divide(e2e - ttft, output_len - 1, out=tpot, where=output_len > 1)  # (rejected rows: NaN times)
        return pd.DataFrame({"id": i[order, 0], "arrival_s": arrival, "prompt_len": i[order, 1],
                             "output_len": output_len, "status": status[order], "reason": reason[order],
                             "cached_tokens": i[order, 3], "preemptions": i[order, 4],
                             "first_token_s": first, "finish_s": finish, "ttft_s": ttft, "e2e_s": e2e,
                             "tpot_s": tpot}, columns=REQUEST_COLUMNS)


def _ints_of(rows: list[tuple], width: int) -> np.ndarray:
    """[len(rows), width] int64 of a list of int tuples (np.fromiter over them: 2x np.array's speed)."""
    return np.fromiter(chain.from_iterable(rows), np.int64, len(rows) * width).reshape(-1, width)


class ItlRuns(NamedTuple):
    """Inter-token gaps as runs: gap values[k] repeated counts[k] times, in token order."""

    values: np.ndarray  # [R] float64 s
    counts: np.ndarray  # [R] int64


class _Columns:
    """The rows a Recorder holds (no sink), column by column: what `summarize` reads."""

    def __init__(self, rec: Recorder) -> None:
        rec._settle()
        self._f = np.frombuffer(rec._floats).reshape(-1, 2)
        self._i = np.frombuffer(rec._ints, np.int32).reshape(-1, _INT_COLUMNS)
        self._p = np.frombuffer(rec._pairs, np.int64)

    def __len__(self) -> int:
        return len(self._f)

    def __getitem__(self, name: str) -> np.ndarray:
        if name == "prefill_pairs":
            return self._p.copy()
        k = TIMELINE_COLUMNS.index(name)
        return self._f[:, k].copy() if k < 2 else self._i[:, k - 2].astype(np.int64)


def _stats(prefix: str, values: pd.Series | np.ndarray | ItlRuns) -> dict:
    if isinstance(values, ItlRuns):  # the ITL gaps as runs (the largest input: never expanded)
        v, c = values
        if np.isnan(v).any() or not c.all():  # (copies only then)
            keep = ~np.isnan(v) & (c > 0)
            v, c = v[keep], c[keep]
        if not len(v):
            return {f"{prefix}_{k}_s": None for k in ("mean", "p50", "p90", "p99")}
        p50, p90, p99 = runs_percentiles(v, c, [50, 90, 99])  # numpy's, bit for bit (kvbench/runstats.py)
        return {f"{prefix}_mean_s": runs_mean(v, c), f"{prefix}_p50_s": float(p50),
                f"{prefix}_p90_s": float(p90), f"{prefix}_p99_s": float(p99)}
    if isinstance(values, pd.Series):
        v = values.dropna().to_numpy()
    else:  # an array: copied only if it holds a NaN
        v = values[~np.isnan(values)] if np.isnan(values).any() else values
    if len(v) == 0:
        return {f"{prefix}_{k}_s": None for k in ("mean", "p50", "p90", "p99")}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])  # one partition (a copy of v), not three
    return {f"{prefix}_mean_s": float(v.mean()), f"{prefix}_p50_s": float(p50),
            f"{prefix}_p90_s": float(p90), f"{prefix}_p99_s": float(p99)}


def summarize(requests: pd.DataFrame, timeline: pd.DataFrame | TimelineFile | _Columns, capacity: int,
              itl: np.ndarray | ItlRuns) -> dict:
    """The flat summary.json of one run (without run identity keys: strategy, engine, trace…).

    `timeline`: a frame, or anything with len() whose [column] is a whole column as an array
    (`Recorder.timeline_columns()`: a column at a time, from the file a streamed run wrote);
    `itl`: the gaps, or their runs (`Recorder.itl_runs()`). The numbers are the same either way.
    """
    fin = requests[requests.status == "finished"]
    rej = requests[requests.status == "rejected"]
    duration = float(fin.finish_s.max() - requests.arrival_s.min()) if len(fin) else 0.0
    per_s = (lambda x: float(x) / duration) if duration > 0 else (lambda x: 0.0)
    out = {
        "num_requests": int(len(requests)),
        "finished": int(len(fin)),
        "rejected": int(len(rej)),
        "rejected_reasons": dict(Counter(r.split(":", 1)[0] for r in rej.reason)),
        "preemptions": int(fin.preemptions.sum()),
        "duration_s": duration,
        "request_throughput": per_s(len(fin)),
        "output_throughput": per_s(fin.output_len.sum()),
        "total_token_throughput": per_s(fin.output_len.sum() + fin.prompt_len.sum()),
        **_stats("ttft", fin.ttft_s), **_stats("tpot", fin.tpot_s), **_stats("e2e", fin.e2e_s),
        **_stats("itl", itl if isinstance(itl, ItlRuns) else np.asarray(itl, dtype=float)),
        "kv_capacity_tokens": int(capacity),
        "prefix_hit_rate": float(fin.cached_tokens.sum() / fin.prompt_len.sum()) if len(fin) else 0.0,
        "num_steps": int(len(timeline)),
    }
    if len(timeline):
        w = np.asarray(timeline["dt_s"])
        wsum = w.sum()
        for state in STATES:  # one column at a time
            frac = np.asarray(timeline[state]) / capacity
            out[f"mem_{_STATE_KEY[state]}_frac"] = float((frac * w).sum() / wsum)
            out[f"mem_{_STATE_KEY[state]}_peak_frac"] = float(frac.max())
            del frac
        waste = sum(out[f"mem_{_STATE_KEY[s]}_frac"] for s in ("reserved", "internal", "external"))
        held = waste + out["mem_token_states_frac"]
        out["waste_frac"] = waste / held if held > 0 else 0.0
        running = np.asarray(timeline["running"])
        out["peak_running"] = int(running.max())
        out["mean_running"] = float((running * w).sum() / wsum)
    return out
