"""radix's bulk decode into `events.StateColumns` (free-slope stretches, the replay's chunks)
against the same calls into plain lists (a row per step): the same rows once the stretches are
expanded as `events.DecodeRun` and `Recorder._settle_states` read them, the same strategy after
each call; and the recorder's rows of free-slope stretches equal those of the same rows given
explicitly."""
from __future__ import annotations

import pytest

from kvbench.events import DecodeRun, StateColumns
from kvbench.metrics import Recorder
from test_radix_bulk import CASES, build, same


def expand(cols: list[list[int]], stretches: list[tuple]) -> list[tuple]:
    """The rows that explicit rows `cols` and `stretches` stand for (events.DecodeRun)."""
    explicit = list(zip(*cols))
    rows, e = [], 0
    for s in stretches:
        at, m, token, reserved, d, internal, external, cached, free = s
        rows += explicit[e:at]
        e = at
        if m < 0:  # free-slope
            rows += [(token + i * d, reserved, internal, external, cached, free - i * d) for i in range(-m)]
        else:
            rows += [(token + i * d, reserved - i * d, internal, external, cached, free) for i in range(m)]
    return rows + explicit[e:]


@pytest.mark.parametrize("seed, capacity, eviction, host, running", CASES)
def test_decode_steps_stretches_equal_rows(seed, capacity, eviction, host, running):
    kw = {"eviction": eviction, "host_tier_tokens": host, "running": running}
    a, rids = build(seed, capacity, **kw)
    b, _ = build(seed, capacity, **kw)
    k = min(a._seqs[r].kv_len - a._seqs[r].length for r in rids)
    sloped = 0
    while k > 0:  # in chunks, as a quiet run asks
        stretches: list[tuple] = []
        cols = StateColumns(([], [], [], [], [], []))
        cols.stretches = stretches
        plain = [[] for _ in range(6)]
        n = a.decode_steps(rids, min(k, 9), cols)
        assert b.decode_steps(rids, min(k, 9), plain) == n
        assert expand(cols, stretches) == list(zip(*plain))
        assert all(c[-1] == p[-1] for c, p in zip(cols, plain)) if n else True  # the last row is a row
        sloped += sum(s[1] < 0 for s in stretches)
        same(a, b, rids)
        a.check_invariants()
        if not n:
            break
        k -= n
    if capacity == 2000:
        assert sloped, "free pages only: the bulk steps go as free-slope stretches"


def test_recorder_rows_of_free_slope_stretches():
    """A DecodeRun whose states are free-slope stretches and rows gives the recorder the rows
    that the same states as explicit rows give."""

    class Req:
        def __init__(self, i):
            self.id, self.prompt_len, self.output_len, self.arrival_s = i, 5, 50, 0.0

    reqs = [Req(i) for i in range(3)]
    stretches = [(0, -4, 100, 7, 3, 1, 0, 9, 500), (1, 2, 112, 7, 3, 1, 0, 9, 488), (2, -3, 118, 1, 3, 1, 0, 9, 480)]
    cols = [[110, 120], [7, 1], [1, 1], [0, 0], [9, 9], [488, 470]]
    rows = expand(cols, stretches)
    k = len(rows)
    t = [float(j) for j in range(k)]
    recs = []
    for states, st in ((cols, stretches), ([list(c) for c in zip(*rows)], [])):
        rec = Recorder(10_000)
        for r in reqs:
            from kvbench.metrics import _Times
            rec._times[r.id] = _Times(r, 0)
        rec.decode_run(DecodeRun(reqs, t, [1.0] * k, 40, 3, 0, 0, states, (0, 0), (), st))
        recs.append(rec.timeline())
    assert recs[0].equals(recs[1])
    assert recs[0]["free"].tolist() == [r[5] for r in rows] and recs[0]["reserved"].tolist() == [r[1] for r in rows]
