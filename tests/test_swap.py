"""Preemption by swap (issue 14): the exact K/V token slots and bytes a scripted preemption moves
and what the sim charges for them; a swapped request holds no pool page while it waits (and every
strategy's invariants hold after every step); every request ends finished; the summary's move
keys; config errors; and on the torch engine (tiny model) swapped requests generate exactly the
greedy tokens recomputed ones do, and would not without the copy back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as hs
from omegaconf import OmegaConf

from kvbench.engines.sim import SimEngine
from kvbench.engines.torch_engine import TorchEngine
from kvbench.replay import replay
from kvbench.request import Request
from kvbench.scheduler import Scheduler, Seq
from kvbench.schema import ConfigError, register, validate
from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy
from kvbench.strategies.slab import SlabStrategy
from kvbench.traces import Fixed, shared_prefix

REPO = Path(__file__).resolve().parents[1]
BPT = 1000  # K/V bytes per token slot (a round number: the byte counts below are exact)
COSTS = dict(overhead_s=0.01, prefill_token_s=1e-4, decode_token_s=1e-3, kv_read_token_s=0.0)


def engine(**kw) -> SimEngine:
    return SimEngine(**COSTS, h2d_bytes_per_s=1e6, d2h_bytes_per_s=2e6, kv_bytes_per_token=BPT, **kw)


def req(rid: int, prompt: int, output: int, seed: int | None = None) -> Request:
    rng = np.random.default_rng(rid if seed is None else seed)
    return Request(rid, 0.0, rng.integers(100, 30000, prompt, dtype=np.int32),
                   rng.integers(100, 30000, output, dtype=np.int32))


def drive(sched: Scheduler, eng, reqs: list[Request]) -> list:
    """Step to the end by hand; after every step: the strategy's invariants hold, and a request
    waiting with K/V in host memory holds no page of the pool. Returns the batches."""
    st = sched.strategy
    for r in reqs:
        sched.add(Seq(r))
    batches = []
    while sched.has_work():
        planned = sched.schedule()
        assert planned, "no progress"
        ev = sched.event(planned, eng.needs_layout)
        eng.step(ev.batch)
        batches.append(ev.batch)
        sched.complete(planned)
        st.check_invariants()
        for s in sched.waiting:
            if s.swapped:
                with pytest.raises(KeyError):
                    st.page_table(s.id)  # released: no page is both in the pool and swapped
    return batches


# ---- the scripted preemption ----------------------------------------------------------------------
# 16 pages of 4; A and B (prompt 20, output 20) decode in lockstep until both hold 8 pages
# (32 positions); A's next token needs a 9th page: B is preempted with 32 positions computed
# (13 outputs emitted). When A finishes, B comes back: prompt + emitted = 33 positions, 32 copied
# back, 1 computed (its last output token), then it decodes to the end.
def scripted(preemption: str):
    st = PagedStrategy(64, 64, page_size=4, prefix_caching=False)
    sched = Scheduler(st, max_num_seqs=4, max_num_batched_tokens=64, preemption=preemption)
    eng = engine()
    return sched, eng, drive(sched, eng, [req(0, 20, 20), req(1, 20, 20)])


def test_a_scripted_swap_moves_exact_token_slots_and_the_sim_charges_their_bytes():
    sched, eng, batches = scripted("swap")
    moves = [(k, b.d2h_tokens, b.h2d_tokens) for k, b in enumerate(batches) if b.moves]
    assert moves == [(13, 32, 0), (20, 0, 32)]
    out, back = batches[13], batches[20]
    assert [(o.rid, o.tokens, len(o.pages)) for o in out.swap_out] == [(1, 32, 8)]
    assert [(i.rid, i.start, i.tokens, len(i.pages)) for i in back.swap_in] == [(1, 0, 32, 8)]
    assert [(s.request.id, s.start, s.num_new) for s in back.seqs] == [(1, 32, 1)]  # only the last output
    assert back.prefill_tokens == 1 and back.decode_tokens == 0
    # the step time: the modelled step, then the copies (serialized): 32 x 1000 B at 2e6 / 1e6 B/s
    base = eng.cost(out.prefill_tokens, out.decode_tokens, out.kv_read_tokens)
    assert eng.step(out) == base + 32 * BPT / 2e6
    assert eng.step(back) == eng.cost(1, 0, 33) + 32 * BPT / 1e6
    assert (sched.swap_out_tokens, sched.swap_in_tokens, sched.num_preemptions) == (32, 32, 1)
    assert sched.peak_host_tokens == 32 and sched.host_tokens == 0


def test_recompute_moves_nothing_and_computes_the_victims_positions_again():
    sched, _, batches = scripted("recompute")
    assert not any(b.moves or b.swap_out or b.swap_in for b in batches)
    back = batches[20]
    assert [(s.request.id, s.start, s.num_new) for s in back.seqs] == [(1, 0, 33)]
    assert sched.num_preemptions == 1 and sched.swap_out_tokens == 0


def test_a_swap_in_restores_only_what_the_prefix_cache_does_not_hold():
    """With prefix caching, B's released full pages stay cached; what A's growth evicted of them
    is copied back, the rest is a hit: hits + copied = the positions swapped out."""
    st = PagedStrategy(64, 64, page_size=4)
    sched = Scheduler(st, max_num_seqs=4, max_num_batched_tokens=64, preemption="swap")
    batches = drive(sched, engine(), [req(0, 20, 20), req(1, 20, 20)])
    (back,) = [b for b in batches if b.swap_in]
    (i,) = back.swap_in
    assert i.start == sched.recomputed_hits and i.start % 4 == 0 and 0 < i.start < 32
    assert i.start + i.tokens == 32 == sched.swap_out_tokens
    assert [(s.start, s.num_new) for s in back.seqs] == [(32, 1)]


def test_an_engine_without_kv_bytes_per_token_refuses_to_price_moves():
    _, _, batches = scripted("swap")
    with pytest.raises(RuntimeError, match="kv_bytes_per_token"):
        SimEngine(**COSTS).step(batches[13])
    assert SimEngine(**COSTS).step(batches[12]) > 0  # a step without moves needs no size


STRATEGIES = {"paged": lambda: PagedStrategy(96, 96, page_size=4),
              "paged_nocache": lambda: PagedStrategy(96, 96, page_size=4, prefix_caching=False),
              "radix": lambda: RadixStrategy(96, 96, page_size=1),
              "radix4": lambda: RadixStrategy(96, 96, page_size=4),
              "slab": lambda: SlabStrategy(96, 96)}


@settings(max_examples=30, deadline=None)
@given(stem=hs.sampled_from(sorted(STRATEGIES)), budget=hs.integers(4, 64),
       shapes=hs.lists(hs.tuples(hs.integers(1, 40), hs.integers(1, 30), hs.integers(0, 2)), min_size=1, max_size=7),
       policy=hs.sampled_from(["fcfs", "lpm", "dfs_weight"]), dedup=hs.booleans(), chunked=hs.booleans())
def test_every_request_finishes_under_swap_and_host_memory_returns_to_zero(stem, budget, shapes, policy, dedup,
                                                                           chunked):
    """Requests of random lengths (some sharing a prefix: the third field picks one of 3 seeds
    for their first ids) in a pool small enough to preempt, under any admission order, with or
    without dedup_prefix and chunked prefill: every request finishes with all its
    tokens, the invariants hold after every step, swapped requests hold no page, and what went
    to the host came back or was served from cache."""
    reqs = []
    for rid, (p, o, group) in enumerate(shapes):
        r = req(rid, p, o)
        r.tokens[:p // 2] = np.random.default_rng(group).integers(100, 30000, p // 2, dtype=np.int32)
        reqs.append(r)
    sched = Scheduler(STRATEGIES[stem](), max_num_seqs=8, max_num_batched_tokens=budget, preemption="swap",
                      policy=policy, dedup_prefix=dedup, dedup_min_prefix=4, chunked_prefill=chunked)
    eng = engine()
    reqs = [r for r in reqs if sched.rejection(r) is None]
    batches = drive(sched, eng, reqs)
    assert not sched.running and sched.host_tokens == 0
    out: dict[int, int] = {}  # request -> positions its last swap-out sent to the host
    for b in batches:
        for o in b.swap_out:
            assert o.rid not in out and len(o.pages) == -(-o.tokens // sched.strategy.page_size)
            out[o.rid] = o.tokens
        for i in b.swap_in:  # what comes back = what went out, less the cached prefix
            assert i.tokens == max(out.pop(i.rid) - i.start, 0)
    assert not out
    assert sum(b.d2h_tokens for b in batches) == sched.swap_out_tokens
    assert sum(b.h2d_tokens for b in batches) == sched.swap_in_tokens <= sched.swap_out_tokens
    assert (sched.swap_out_tokens > 0) == (sched.num_preemptions > 0 and any(
        o.tokens for b in batches for o in b.swap_out))


def test_replay_with_swap_is_identical_with_and_without_fast_forward():
    reqs = shared_prefix(num_groups=2, questions_per_group=6, system_len=Fixed(60), question_len=Fixed(20),
                         output_len=Fixed(40), rate=50.0, seed=1)
    out = []
    for ff in (True, False):
        st = PagedStrategy(320, 256, page_size=4)
        sched = Scheduler(st, 8, 128, preemption="swap")
        res = replay([Request(r.id, r.arrival_s, r.prompt, r.output.copy()) for r in reqs], sched,
                     engine(fast_forward=ff), progress=False)
        assert len(res.finished) == len(reqs) and sched.num_preemptions > 0 and sched.swap_in_tokens > 0
        out.append((res.recorder.timeline(), res.recorder.moves(BPT)))
    assert out[0][1] == out[1][1]
    assert out[0][0].equals(out[1][0])


# ---- through the config path ------------------------------------------------------------------------
def cfg_of(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


def test_a_swap_run_reports_its_moves_in_summary_json(tmp_path):
    from kvbench.run import run
    from kvbench.sizes import kv_bytes_per_token

    over = ("trace=shared_prefix", "trace.num_groups=2", "trace.questions_per_group=8", "trace.rate=inf",
            "kv_capacity_tokens=4096", "max_model_len=4096", "model=llama3_2_1b")
    swap = run(cfg_of(*over, "scheduler.preemption=swap"), tmp_path / "swap")
    rec = run(cfg_of(*over), tmp_path / "recompute")
    bpt = kv_bytes_per_token(cfg_of(*over).model)
    assert swap["finished"] == rec["finished"] == 16 and swap["preemptions"] > 0
    assert swap["swap_out_tokens"] > 0 and swap["d2h_bytes"] == swap["swap_out_tokens"] * bpt
    assert 0 < swap["swap_in_tokens"] <= swap["swap_out_tokens"] and swap["h2d_bytes"] == swap["swap_in_tokens"] * bpt
    assert (rec["swap_out_tokens"], rec["swap_in_tokens"], rec["d2h_bytes"], rec["h2d_bytes"]) == (0, 0, 0, 0)


@pytest.mark.parametrize("override, message", [
    ("scheduler.preemption=swapp", "scheduler.preemption='swapp': must be one of recompute, swap"),
    ("engine.h2d_bytes_per_s=0", "engine.h2d_bytes_per_s=0: must be a finite number > 0"),
    ("engine.d2h_bytes_per_s=-1.0", "engine.d2h_bytes_per_s=-1.0: must be a finite number > 0"),
    ("+engine.kv_bytes_per_token=0", "engine.kv_bytes_per_token=0: must be an integer >= 1"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        validate(cfg_of(override))
    assert str(err.value).startswith(message)


# ---- the torch engine: real copies ------------------------------------------------------------------
TINY = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"), {"tie_embeddings": False, "vocab_size": 1024})


def generate(strategy, preemption: str, patch=None):
    # 2 system prompts x 3 questions at t=0 in a pool of 192 slots: preemptions on both strategies
    reqs = shared_prefix(num_groups=2, questions_per_group=3, system_len=Fixed(40), question_len=Fixed(12),
                         output_len=Fixed(12), rate=float("inf"), seed=3, vocab_size=TINY.vocab_size)
    eng = TorchEngine(model=TINY, sample=True)
    if patch is not None:
        patch(eng)
    eng.bind(strategy.page_size, strategy.num_pages)
    sched = Scheduler(strategy, max_num_seqs=8, max_num_batched_tokens=64, preemption=preemption)
    result = replay(reqs, sched, eng, progress=False)
    assert len(result.finished) == len(reqs)
    strategy.check_invariants()
    assert not eng._swapped  # every host copy came back (or was dropped)
    sched.moved = result.recorder.moved  # swap-outs, swap-ins, all d2h, all h2d (token slots)
    return {r.id: r.output.copy() for r in reqs}, sched


@pytest.fixture(scope="module")
def recomputed():
    """The reference: paged, preemption by recompute (every strategy generates the same tokens:
    tests/test_model_e2e.py)."""
    out, sched = generate(PagedStrategy(192, 128, page_size=4), "recompute")
    assert sched.num_preemptions > 0
    return out


@pytest.mark.parametrize("make", [lambda: PagedStrategy(192, 128, page_size=4),
                                  lambda: RadixStrategy(192, 128, page_size=1),
                                  lambda: PagedStrategy(192, 128, page_size=4, host_tier_tokens=256)],
                         ids=["paged", "radix", "paged-host-tier"])
def test_swapped_requests_generate_the_tokens_recomputed_ones_do(recomputed, make):
    """... and with a host tier, whose evicted pages come back through real host copies too."""
    st = make()
    got, sched = generate(st, "swap")
    assert sched.num_preemptions > 0 and sched.swap_in_tokens > 0
    if getattr(st, "host_tier_tokens", 0):
        out, back, d2h, h2d = sched.moved
        assert h2d > back and d2h > out  # host-tier hits were loaded back, evicted pages copied out
    for rid in recomputed:
        np.testing.assert_array_equal(got[rid], recomputed[rid], err_msg=f"request {rid}")


def test_the_tokens_depend_on_the_copy_back(recomputed):
    """Zero the pages a swap-in should fill instead: some request's tokens change (so the test
    above compares K/V that really went through host memory)."""
    def zero_instead(eng):
        def swap_in(ins):
            for i in ins:
                eng._swapped.pop(i.rid)
                ps = eng.page_size
                for page in i.pages[i.start // ps:]:
                    eng.kv_pool[:, :, page * ps:(page + 1) * ps] = 0
        eng._swap_in = swap_in

    bad, sched = generate(PagedStrategy(192, 128, page_size=4), "swap", patch=zero_instead)
    assert sched.swap_in_tokens > 0
    assert any(not np.array_equal(bad[rid], recomputed[rid]) for rid in recomputed)


def test_quiet_steps_of_a_host_tier_strategy_move_nothing_uncharged():
    """A paged pool with a host tier under a decode-heavy load: cached pages are evicted to the
    host while requests decode. Fast-forward gives the same timeline and the same bytes moved as
    stepping (quiet steps never evict such a strategy's pages: the evicting step is stepped)."""
    reqs = shared_prefix(num_groups=6, questions_per_group=4, system_len=Fixed(48), question_len=Fixed(8),
                         output_len=Fixed(60), rate=4.0, seed=5)
    out = []
    for ff in (True, False):
        st = PagedStrategy(384, 256, page_size=4, host_tier_tokens=512)
        sched = Scheduler(st, 8, 128)
        res = replay([Request(r.id, r.arrival_s, r.prompt, r.output.copy()) for r in reqs], sched,
                     engine(fast_forward=ff), progress=False)
        assert len(res.finished) == len(reqs)
        st.check_invariants()
        out.append((res.recorder.timeline(), res.recorder.moves(BPT)))
    assert out[0][1]["d2h_bytes"] > 0 and out[0][1] == out[1][1]
    assert out[0][0].equals(out[1][0])
