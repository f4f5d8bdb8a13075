"""A quiet run may start right after a step that was not steady while requests wait
(`kvbench.replay._quiet_behind`: after a step that preempted, or one whose requests all emitted
and have only decodes left), where the strategy shows the head is refused in the next step
(paged: `still_refused`, with and without prefix caching; with it, where that step takes no
page) or nobody is tried. Compared with
stepping every step (no fast-forward): the pool (page ids, free stack, LRU order, hash table,
lazy owners, the waiting match) and the scheduler's decisions after every step the fast path
plans, at the same step of stepping, and the same tables (tests/test_paged_refused_head.py's check);
and the path is taken: runs start there, and fewer steps are planned than without it."""
from __future__ import annotations

import pytest

import kvbench.replay as R
from tests.test_paged_refused_head import CASES, _compare, _requests


def _counting(monkeypatch):
    started = [0]
    behind = R._quiet_behind

    def counted(*a):
        got = behind(*a)
        started[0] += got is not None
        return got
    monkeypatch.setattr(R, "_quiet_behind", counted)
    return started


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("case", ["ps16", "ps16-small-budget", "ps4", "ps1", "lpm-urgent", "dedup"])
def test_runs_behind_after_unsteady_steps_equal_stepping(case, caching, monkeypatch):
    kw, sched_kw = CASES[case]
    kw = {**kw, "max_model_len": 4096, "prefix_caching": caching}
    ps = kw["page_size"]
    total = [0, 0]
    for seed in (0, 1, 2):
        requests = _requests(60, seed, max(ps, 4))
        started = _counting(monkeypatch)
        _, planned = _compare(kw, sched_kw, requests, check_guard=False)
        monkeypatch.setattr(R, "_quiet_behind", lambda *a: None)  # (the step-by-step path after such steps)
        _, before = _compare(kw, sched_kw, requests, check_guard=False)
        monkeypatch.undo()
        assert planned <= before
        total[0] += started[0]
        total[1] += before - planned
    if case != "lpm-urgent" and not (caching and ps == 1):  # (page size 1: every decode takes a page)
        assert total[0] > 0 and total[1] > 0  # (runs started there, and planned steps went)
