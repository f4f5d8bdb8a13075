"""Arrivals inside a quiet run (kvbench/replay.py `admit_step`, kvbench/quiet.py `QuietRun.join`):
with nobody waiting, the step that admits an arrival is taken inside the run (its decodes the
run's step, the admission the scheduler's), and the admitted request joins the run; refused or
chunked, the run ends after that step. The tables stay those of stepping, on every strategy,
with prompts that hit pages the running requests' decodes filled (a page filled in the very
step of the admission too), prompts over the step's budget, one-token answers, arrivals at the
same time and pools too small for some arrivals."""
from __future__ import annotations

import numpy as np
import pytest

import kvbench.replay

from kvbench.engines.sim import SimEngine
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy
from kvbench.strategies.slab import SlabStrategy

MAKERS = {
    "paged": lambda cap: PagedStrategy(cap, 1024, page_size=4, prefix_caching=True),
    "paged_16": lambda cap: PagedStrategy(cap, 1024, page_size=16, prefix_caching=True),
    "paged_sched": lambda cap: PagedStrategy(cap, 1024, page_size=4, prefix_caching=True,
                                             prefix_visibility="scheduled"),
    "paged_nocache": lambda cap: PagedStrategy(cap, 1024, page_size=16, prefix_caching=False),
    "radix": lambda cap: RadixStrategy(cap, 1024),
    "radix_4": lambda cap: RadixStrategy(cap, 1024, page_size=4),
    "radix_sched": lambda cap: RadixStrategy(cap, 1024, page_size=4, prefix_visibility="scheduled"),
    "slab": lambda cap: SlabStrategy(5 * cap, 1024),  # (a max_model_len slab each: 40 of them, or 12)
}


def _requests(seed: int, n: int = 60) -> list[Request]:
    """Three long requests at 0 s, then n arrivals over ~2 s: most continue a running request's
    prompt and output (they hit the pages its decodes filled, as far as they are registered),
    some are fresh, some over the step's budget (chunked), some answer one token, some arrive
    together."""
    rng = np.random.default_rng(seed)
    draw = lambda k: rng.integers(0, 30000, k, dtype=np.int32)  # noqa: E731
    reqs = [Request(i, 0.0, draw(int(rng.integers(20, 60))), draw(300)) for i in range(3)]
    t = 0.0
    for i in range(3, 3 + n):
        if rng.random() > 0.15:
            t += float(rng.exponential(0.12))
        kind = rng.random()
        if kind < 0.6:  # a continuation of an earlier request (up to its whole answer)
            src = reqs[int(rng.integers(0, len(reqs)))]
            prompt = np.concatenate([src.prompt, src.output[:int(rng.integers(1, src.output_len + 1))]])[:900]
        elif kind < 0.75:
            prompt = draw(int(rng.integers(1100, 1500)))  # over the budget of 1024: chunked
        else:
            prompt = draw(int(rng.integers(5, 80)))
        out = 1 if rng.random() < 0.1 else int(rng.integers(2, 120))
        reqs.append(Request(i, t, prompt, draw(out)))
    return reqs


def _replay(strategy: str, cap: int, seed: int, fast: bool, **options):
    engine = SimEngine(overhead_s=0.01, prefill_token_s=1e-5, decode_token_s=1e-4, kv_read_token_s=1e-6,
                       fast_forward=fast, kv_bytes_per_token=4096)
    st = MAKERS[strategy](cap)
    sched = Scheduler(st, **{"max_num_seqs": 32, "max_num_batched_tokens": 1024, **options})
    planned = [0]
    plan = sched.schedule
    sched.schedule = lambda: planned.__setitem__(0, planned[0] + 1) or plan()
    result = replay(_requests(seed), sched, engine, progress=False)
    st.check_invariants()
    return result.recorder.timeline(), result.recorder.requests(), result.itl, planned[0]


@pytest.mark.parametrize("strategy", list(MAKERS))
@pytest.mark.parametrize("cap", [8192, 2500])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arrivals_admitted_inside_runs_are_stepping(strategy, cap, seed, monkeypatch):
    t0, r0, itl0, planned0 = _replay(strategy, cap, seed, fast=False)
    steps = []
    admit = kvbench.replay.admit_step
    monkeypatch.setattr(kvbench.replay, "admit_step", lambda run, seq, *a: steps.append(seq.id) or admit(run, seq, *a))
    t1, r1, itl1, planned1 = _replay(strategy, cap, seed, fast=True)
    assert t1.equals(t0) and r1.equals(r0) and np.array_equal(itl1, itl0)
    assert len(steps) >= 5  # arrivals were admitted inside runs, not planned
    if cap == 8192:  # (nobody waits: every arrival with a run going was taken inside it, or chunked)
        assert (t0.waiting.max(), t0.preemptions.max()) == (0, 0)
        assert planned1 < planned0 / 5


@pytest.mark.parametrize("strategy", ["paged", "paged_nocache", "radix", "slab"])
@pytest.mark.parametrize("options", [dict(max_num_seqs=8), dict(chunked_prefill=False),
                                     dict(preemption="swap"), dict(max_num_batched_tokens=40)])
def test_admissions_inside_runs_under_scheduler_limits_are_stepping(strategy, options, monkeypatch):
    # a full batch (arrivals refused for max_num_seqs), whole prompts only (those over the budget
    # rejected), preemption by swap in the small pool, and a budget the decodes nearly use up
    # (prompts chunked): steps that admit nobody, or a prompt in part, end the run after them
    ends = []
    admit = kvbench.replay.admit_step

    def counted(*args):
        got = admit(*args)
        ends.append(got is not None and got[1] is not None)
        return got

    monkeypatch.setattr(kvbench.replay, "admit_step", counted)
    for cap in (8192, 2500):
        t0, r0, itl0, _ = _replay(strategy, cap, 3, fast=False, **options)
        t1, r1, itl1, _ = _replay(strategy, cap, 3, fast=True, **options)
        assert t1.equals(t0) and r1.equals(r0) and np.array_equal(itl1, itl0)
    if "max_num_seqs" in options or "max_num_batched_tokens" in options:
        assert any(ends)
