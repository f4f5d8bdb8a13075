"""Design 1 (hybrid_separate) sizes a sliding / chunked pool by its real peak, not by the whole
prompt: a step from `length` to `length + C` (C <= the scheduler's max_num_batched_tokens) holds
only the pages of [first_needed(length), length + C) (hits.peak_pages). Checked here:

- hits.peak_pages against a brute force over every (length, step) a request can take: an upper
  bound always, and the exact maximum once the request is long enough to reach it;
- the regression: an 8k-token prompt on the gpt-oss-like shape (window 128) in a pool of 16384
  token-equivalents with max_model_len 32768 (results/hybrid_memory's setting) was rejected
  (the TensorRT-LLM split gave the sliding pool 7 pages); with the scheduler's step it is
  admitted, runs through a real Scheduler in chunks, and finishes; after every step its sliding
  table holds at most the computed peak, and every request finishes;
- hypothesis: random requests, steps and small pools on sliding, chunked and mixed shapes,
  driven through the real Scheduler: after every schedule() (the peak of a step) each running
  request's sliding/chunked pages <= its peak, invariants hold, no request is lost or stuck;
- the yaml reads the scheduler's max_num_batched_tokens and preemption (swap: windows whole),
  and bad values stop at config time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from kvbench.request import Request
from kvbench.run import strategy_sizes
from kvbench.scheduler import Scheduler, Seq
from kvbench.schema import ConfigError, register, validate
from kvbench.sizes import LayerGroup, PoolGeometry
from kvbench.strategies.hybrid import hits
from kvbench.strategies.hybrid.base import NULL_PAGE
from kvbench.strategies.hybrid.separate import SeparatePools
from strategy_cases import hybrid_geometry

REPO = Path(__file__).resolve().parents[1]
GPT_OSS = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "gpt_oss_like.yaml"))


def group(kind: str, span: int) -> LayerGroup:
    return LayerGroup(kind, 2, 1, 2, "float32", window=span if kind == "sliding" else 0,
                      chunk=span if kind == "chunked" else 0)


def brute_peak(g: LayerGroup, kv_len: int, ps: int, step: int) -> int:
    """Most pages held after any admit/grow from `length` to `length + c` (c <= step), the table
    keeping the pages from first_needed(length) on (as GroupPaged trims); for each length the
    largest c holds the most."""
    return max(-(-(n + min(step, kv_len - n)) // ps) - hits.first_needed(g, n) // ps for n in range(kv_len))


@pytest.mark.parametrize("kind", ["sliding", "chunked"])
@pytest.mark.parametrize("span,ps,step", [(7, 4, 1), (7, 4, 5), (5, 2, 3), (6, 3, 6), (6, 4, 3), (128, 16, 512),
                                          (9, 1, 4)])
def test_peak_pages_bounds_every_step_and_is_reached(kind, span, ps, step):
    g = group(kind, span)
    # long enough for the worst alignment: a window starts anywhere; a chunk at multiples of itself
    tight = span + step + 2 * ps + (0 if kind == "sliding" else ps * span)
    for kv_len in range(1, tight + 2 * ps):
        peak, brute = hits.peak_pages(g, kv_len, ps, step), brute_peak(g, kv_len, ps, step)
        assert brute <= peak <= -(-kv_len // ps)
        if kv_len >= tight:
            assert peak == brute, kv_len
    assert hits.peak_pages(g, 10_000, ps, None) == -(-10_000 // ps)  # no step bound: counted whole


def test_full_groups_are_counted_whole():
    assert hits.peak_pages(LayerGroup("full", 2, 1, 2, "float32"), 1000, 16, 8) == 63
    assert hits.peak_pages(LayerGroup("state", 2, 1, 2, "float32", state_bytes=8), 1000, 16, 8) == 63


def gpt_oss(step: int | None, preemption: str = "recompute") -> SeparatePools:
    geo = PoolGeometry.of(GPT_OSS, 16, 16384 // 16)
    return SeparatePools(16384, 32768, page_size=16, geometry=geo, max_num_batched_tokens=step, preemption=preemption)


def request(rid: int, prompt: int, output: int, rng: np.random.Generator) -> Request:
    return Request(rid, 0.0, rng.integers(0, 201088, prompt, dtype=np.int32),
                   rng.integers(0, 201088, output, dtype=np.int32))


def drive(strategy, requests: list[Request], step: int, check, max_num_seqs: int = 8) -> tuple[set, set]:
    """Every request through a real Scheduler (all arrived at 0); `check(scheduler)` after every
    schedule() (the step's pages are held) and after every complete(). Returns (finished ids,
    rejected ids); fails if the scheduler makes no progress."""
    sch = Scheduler(strategy, max_num_seqs=max_num_seqs, max_num_batched_tokens=step)
    rejected = {r.id for r in requests if sch.rejection(r) is not None}
    for r in requests:
        if r.id not in rejected:
            sch.add(Seq(r))
    finished: set[int] = set()
    steps, limit = 0, 4 * sum(r.prompt_len + r.output_len for r in requests) + 100
    while sch.has_work():
        planned = sch.schedule()
        assert planned, "no progress"
        check(sch)
        finished |= {s.id for s in sch.complete(planned)}
        check(sch)
        steps += 1
        assert steps < limit, "stuck"
    return finished, rejected


def window_tables(strategy) -> list[int]:
    return [t for t, spec in enumerate(strategy.tables) if strategy.groups[spec.group].kind in ("sliding", "chunked")]


def held(strategy, rid: int, t: int) -> int:
    return int((strategy.table(rid, t) != NULL_PAGE).sum())


def check_peaks(sch: Scheduler, seen: dict | None = None) -> None:
    s = sch.strategy
    for seq in sch.running:
        peak = s._peak_pages(seq.request.kv_len)
        for t in window_tables(s):
            n = held(s, seq.id, t)
            assert n <= peak[s.tables[t].space], (seq.id, t, n, peak)
            if seen is not None:
                seen[seq.id] = max(seen.get(seq.id, 0), n)
    s.check_invariants()


def test_gpt_oss_8k_prompt_was_rejected_and_now_runs_within_its_peak():
    prompt, output, step = 8000, 64, 512
    whole = gpt_oss(None)  # windows counted whole: the TensorRT-LLM split leaves the sliding pool 7 pages
    assert [sp.num_pages for sp in whole._spaces] == [7, 2040]
    assert whole.never_fits(prompt + output - 1).startswith("pool: needs 8063 KV slots (504 pages of space 0")
    s = gpt_oss(step)
    sliding_pages = hits.peak_pages(s.groups[0], 32768, 16, step)  # the floor: ceil((15 + 127 + 512) / 16)
    assert s.groups[0].kind == "sliding" and sliding_pages == 41
    assert [sp.num_pages for sp in s._spaces] == [41, (16384 * 49152 - 41 * 16 * 24576) // (16 * 24576)]
    assert s.never_fits(prompt + output - 1) is None and s._peak_pages(prompt + output - 1) == {0: 41, 1: 504}
    rng = np.random.default_rng(0)
    reqs = [request(0, prompt, output, rng)] + [request(i, 300 + 97 * i, 20 + i, rng) for i in range(1, 6)]
    seen: dict[int, int] = {}
    finished, rejected = drive(s, reqs, step, lambda sch: check_peaks(sch, seen))
    assert rejected == set() and finished == {r.id for r in reqs}  # no request lost
    # its prefill chunks of 512 start on page boundaries, so its window starts 1 position into a
    # page: ceil((1 + 127 + 512) / 16) = 40 pages, one under the worst alignment's 41
    assert seen[0] == 40
    assert all(sp.available() == sp.num_pages for sp in s._spaces)  # all memory back (free or cached)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(["sliding", "chunked", "mixed"]), ps=st.sampled_from([1, 2, 3, 4]),
       step=st.integers(1, 24), capacity=st.integers(24, 120), max_len=st.integers(24, 96),
       lens=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 12)), min_size=1, max_size=8),
       shared=st.booleans(), seed=st.integers(0, 2**16))
def test_random_runs_stay_under_the_peak_and_lose_no_request(model, ps, step, capacity, max_len, lens, shared, seed):
    capacity = max(capacity, ps)
    s = SeparatePools(capacity, max_len, page_size=ps, geometry=hybrid_geometry(model, ps, capacity),
                      max_num_batched_tokens=step)
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, 5, 64, dtype=np.int32)
    reqs = []
    for i, (p, o) in enumerate(lens):
        r = request(i, p, o, rng)
        if shared:  # prefix hits: a common head of ids
            r.tokens[:min(p, 64)] = prefix[:min(p, 64)]
        reqs.append(r)
    finished, rejected = drive(s, reqs, step, check_peaks, max_num_seqs=4)
    assert finished | rejected == {r.id for r in reqs} and not finished & rejected
    for r in reqs:  # rejected only what can never run here, for its length
        assert (r.id in rejected) == (s.never_fits(r.kv_len) is not None or r.kv_len + 1 > max_len)


def test_a_state_pool_gets_its_state_when_not_every_floor_fits():
    # hybrid_like (results/hybrid_prefix's 16k pool): the full floor (16384 tokens) is the whole
    # pool, so the floors do not all fit; the state group's (one state) is granted first, where
    # before the split left it no state and every request was rejected
    model = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "hybrid_like.yaml"))
    geo = PoolGeometry.of(model, 16, 16384 // 16)
    s = SeparatePools(16384, 16384, page_size=16, geometry=geo, max_num_batched_tokens=8192)
    full = next(g for g in s.groups if g.kind == "full")
    assert [sp.num_pages for sp in s._spaces] == [1, (16384 * geo.bytes_per_token - sum(s.floors()[:1])) //
                                                  (16 * full.bytes_per_token)]
    assert s.never_fits(8000) is None and "the pool holds" in s.never_fits(15000)


def composed(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["progress=false", "strategy=hybrid_separate", "model=gpt_oss_like",
                                            "kv_capacity_tokens=16384", "max_model_len=32768", *overrides])


@pytest.mark.parametrize("overrides,pages", [
    (["scheduler.max_num_batched_tokens=512"], 41),
    ([], 521),  # the default step, 8192: ceil((15 + 127 + 8192) / 16)
    (["scheduler.max_num_batched_tokens=512", "scheduler.preemption=swap"], 7)])  # swap: windows whole
def test_the_yaml_reads_the_schedulers_step_and_preemption(overrides, pages):
    cfg = composed(*overrides)
    validate(cfg)
    s = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=16384, max_model_len=32768,
                                                  **strategy_sizes(cfg, 16384))
    assert s.max_num_batched_tokens == cfg.scheduler.max_num_batched_tokens
    assert s.preemption == cfg.scheduler.preemption and s._spaces[0].num_pages == pages


def test_bad_values_stop_at_config_time():
    with pytest.raises(ConfigError, match="strategy.max_num_batched_tokens=0"):
        validate(composed("strategy.max_num_batched_tokens=0"))
    with pytest.raises(ValueError, match="preemption='drop' must be recompute or swap"):
        gpt_oss(512, "drop")
    with pytest.raises(ValueError, match="max_num_batched_tokens=0 must be an int >= 1"):
        gpt_oss(0)
