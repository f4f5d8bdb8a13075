"""One event stream: the scheduler's events carry one is_decode flag; the timeline, the sim's
step cost and every latency derive from them (and nothing below the scheduler imports it)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from kvbench.engines.sim import SimEngine, step_time
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler, Seq
from kvbench.strategies.paged import PagedStrategy

REPO = Path(__file__).resolve().parents[1]
# every coefficient distinct, so a token counted on the wrong side changes the step's cost
COSTS = dict(overhead_s=0.01, prefill_token_s=3e-4, decode_token_s=5e-4, kv_read_token_s=1e-6,
             prefill_step_s=2e-3, eager_floor_s=0.0, eager_decode_token_s=7e-4, eager_kv_read_token_s=3e-6)


def req(rid: int, prompt: int, output: int) -> Request:
    rng = np.random.default_rng(rid)
    return Request(rid, 0.0, rng.integers(0, 30000, prompt, dtype=np.int32),
                   rng.integers(0, 30000, output, dtype=np.int32))


def three_in_four_pages() -> tuple[Scheduler, list[Request]]:
    # 4 pages of 16, steps of 16 tokens: request 2 is preempted after its first token and its
    # recompute of 15 + 1 positions ends in a 1-token chunk (step 11 of the replay)
    sched = Scheduler(PagedStrategy(64, 64, page_size=16, prefix_caching=False), max_num_seqs=8,
                      max_num_batched_tokens=16)
    return sched, [req(0, 15, 10), req(1, 15, 10), req(2, 15, 10)]


def test_the_last_token_of_a_recompute_emits_but_is_not_a_decode():
    sched, reqs = three_in_four_pages()
    for r in reqs:
        sched.add(Seq(r))
    events = []
    while sched.has_work():
        planned = sched.schedule()
        events.append(sched.event(planned, with_layout=False))
        sched.complete(planned)
    assert [ev.preempted for ev in events][3] == [2]
    recompute = [(s.start, s.num_new, s.emits, s.is_decode) for s in events[11].batch.seqs]
    assert recompute == [(15, 1, True, False)]  # position 15 is output 0: recomputed, then output 1 emitted
    assert (events[11].batch.prefill_tokens, events[11].batch.decode_tokens) == (1, 0)
    assert [(s.start, s.is_decode) for s in events[12].batch.seqs] == [(16, True)]
    assert [ev.steady for ev in events[4:10]] == [True] * 6  # two requests decode, nobody comes or goes
    assert not events[3].steady and not events[11].steady


def test_the_sim_charges_each_step_for_the_counts_its_timeline_row_records():
    sched, reqs = three_in_four_pages()
    engine = SimEngine(**COSTS, fast_forward=False)
    tl = replay(reqs, sched, engine, progress=False).recorder.timeline()
    expected = step_time(COSTS, tl.prefill_tokens.to_numpy(), tl.decode_tokens.to_numpy(),
                         tl.kv_read_tokens.to_numpy())
    np.testing.assert_array_equal(tl.dt_s.to_numpy(), expected)
    assert tl.loc[11, ["prefill_tokens", "decode_tokens", "kv_read_tokens"]].tolist() == [1, 0, 16]
    # the old sim counted that token as a decode: a different price, which the timeline did not say
    assert tl.dt_s[11] == step_time(COSTS, 1, 0, 16) != step_time(COSTS, 0, 1, 16)


def test_latencies_come_from_the_token_events():
    sched, reqs = three_in_four_pages()
    engine = SimEngine(overhead_s=0.25, prefill_token_s=0.0, decode_token_s=0.0, kv_read_token_s=0.0)
    result = replay(reqs, sched, engine, progress=False)  # every step takes 0.25 s: exact in binary
    table = result.recorder.requests()
    # request 0: output 0 after step 0, 9 more in steps 1..9; request 2: output 0 after step 2,
    # preempted in step 3, recomputed in 10-11 (output 1 after step 11), last output after step 19
    assert table.first_token_s.tolist() == [0.25, 0.5, 0.75]
    assert table.finish_s.tolist() == [2.5, 2.75, 5.0]
    assert table.preemptions.tolist() == [0, 0, 1] and table.cached_tokens.tolist() == [0, 0, 0]
    assert table.tpot_s.tolist() == [0.25, 0.25, (5.0 - 0.75) / 9]
    itl = result.itl
    assert len(itl) == 27 and sorted(itl) == [0.25] * 26 + [2.25]  # 0.75 → 3.0 across the recompute
    assert result.recorder.num_steps == 20


@pytest.mark.parametrize("module", ["metrics.py", "batch.py", "events.py", "engines"])
def test_nothing_below_the_scheduler_imports_it(module):
    files = [REPO / "kvbench" / module] if module.endswith(".py") else sorted((REPO / "kvbench" / module).glob("*.py"))
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("kvbench.scheduler", "kvbench.replay"), f"{f.name} imports {node.module}"
