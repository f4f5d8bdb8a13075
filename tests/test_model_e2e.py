"""The real model under the real scheduler: every strategy yaml in configs/strategy/ generates the
same greedy tokens, through prefix-cache hits and preemptions (a wrong hit or a page handed to
two requests changes the K/V the model reads, so the tokens), and replay mode changes no token."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from kvbench.engines.torch_engine import TorchEngine
from kvbench.replay import replay
from kvbench.scheduler import Scheduler
from kvbench.strategies.paged import PagedStrategy
from kvbench.traces import Fixed, LogNormal, shared_prefix
from strategy_cases import STRATEGY_YAMLS, build

# untied embeddings: a tied random model just repeats its input token, which would prove little
TINY = OmegaConf.merge(OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"),
                       {"tie_embeddings": False})
CAPACITY, MAX_LEN = 256, 128


def trace():
    # 2 system prompts x 3 questions, all at t=0: hits on the shared 40 tokens, and a pool of
    # 256 slots for 6 x ~70 tokens forces preemptions for the strategies that admit eagerly
    return shared_prefix(num_groups=2, questions_per_group=3, system_len=Fixed(40), question_len=Fixed(12),
                         output_len=Fixed(20), rate=float("inf"), seed=3, vocab_size=TINY.vocab_size)


def generate(strategy, sample=True):
    reqs = trace()
    engine = TorchEngine(model=TINY, sample=sample)
    engine.bind(strategy.page_size, strategy.num_pages)
    sched = Scheduler(strategy, max_num_seqs=8, max_num_batched_tokens=64)
    result = replay(reqs, sched, engine, progress=False)
    assert len(result.finished) == len(reqs)
    strategy.check_invariants()
    hits = sum(s.cached_tokens for s in result.finished) + sched.recomputed_hits
    return {r.id: r.output.copy() for r in reqs}, sched.num_preemptions, hits


@pytest.fixture(scope="module")
def outputs():
    return {stem: generate(build(stem, CAPACITY, MAX_LEN, model=TINY)) for stem in STRATEGY_YAMLS}


def test_greedy_outputs_are_identical_across_strategies(outputs):
    ref_name = STRATEGY_YAMLS[0]
    ref, _, _ = outputs[ref_name]
    for name in STRATEGY_YAMLS[1:]:
        got, _, _ = outputs[name]
        for rid in ref:
            np.testing.assert_array_equal(got[rid], ref[rid], err_msg=f"{name} against {ref_name}, request {rid}")


def test_the_comparison_went_through_hits_and_preemptions(outputs):
    """Every prefix-caching strategy served hits; every strategy that grows page by page (not a
    slab, which reserves a request's whole length at admission) was preempted."""
    for name in STRATEGY_YAMLS:
        strategy = build(name, CAPACITY, MAX_LEN, model=TINY)
        _, preemptions, hits = outputs[name]
        assert (hits > 0) == strategy.caches_prefixes, f"{name}: {hits} positions served from cache"
        if not strategy.contiguous:
            assert preemptions > 0, f"{name} was never preempted"


def test_replay_mode_feeds_the_trace_tokens_unchanged():
    before = {r.id: r.output.copy() for r in trace()}
    got, _, _ = generate(PagedStrategy(CAPACITY, MAX_LEN, page_size=4), sample=False)
    for rid in before:
        np.testing.assert_array_equal(got[rid], before[rid])


def test_gpu_engine_warmup_batches_are_well_formed():
    """The gpu engine's warm-up shapes run through the model (here on CPU, reference attention)."""
    from kvbench.engines.gpu_engine import GPUEngine

    engine = TorchEngine(model=TINY)
    engine.bind(page_size=4, num_pages=70)
    engine.warmup_s = None
    engine.profile_tokens = 1000  # the long eager prefill: capped at the pool's 280 slots
    seen = []
    forward = engine.model.forward
    engine.model.forward = lambda ids, *a, **k: seen.append(len(ids)) or forward(ids, *a, **k)
    GPUEngine._warm_up(engine, page_size=4, num_pages=70)  # batches of 1 … 33 requests
    assert engine.warmup_s > 0
    assert seen[-1] == 280 and seen.count(280) == 1


def test_gpu_engine_warmup_launches_every_kernel_variant_a_replay_meets(monkeypatch):
    """Each Triton kernel variant (kernel and compile-time arguments) that a prefix-caching replay
    launches was launched by the gpu engine's warm-up first, so no just-in-time compile lands in a
    timed step (before prefill and extend chunks were warmed up, a paged run's first six steps on
    an H200 spent 14 s compiling). Here on CPU, tiny model: the launches are recorded, not run."""
    import importlib

    import torch

    from kvbench.engines.gpu_engine import GPUEngine

    seen: set = set()

    def recording():
        def kernel_for(jitfn, device):
            name = getattr(jitfn, "__name__", None) or repr(jitfn)
            opts = getattr(jitfn, "kwargs", None) or {}
            dns, dnsa = set(opts.get("do_not_specialize") or ()), set(opts.get("do_not_specialize_on_alignment") or ())

            class Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):   # recorded, not run (the interpreter is slow)
                        # what Triton specializes a compiled kernel on: the constexprs, each
                        # tensor's dtype and 16-byte alignment, each int's == 1 and % 16 == 0
                        # (but not what the kernel's do_not_specialize[_on_alignment] lists)
                        spec = tuple((str(a.dtype), n in dnsa or a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else
                                     "int" if n in dns and isinstance(a, int) else
                                     (a == 1, a % 16 == 0) if isinstance(a, int) and not isinstance(a, bool) else
                                     type(a).__name__ for n, a in zip(jitfn.arg_names, args))
                        seen.add((name, tuple(sorted(kwargs.items())), spec))
                    return launch
            return Grid()
        return kernel_for

    for mod in ("decode_attention", "extend_attention", "kv_write", "rope_kv_write", "rms_norm", "silu_mul",
                "linear", "page_copy"):
        m = importlib.import_module(f"kvbench.kernels.{mod}")
        monkeypatch.setattr(m, "kernel_for", recording())
        if hasattr(m, "num_sms"):   # the H200's 132 SMs: its split-KV and prefix-split choices
            monkeypatch.setattr(m, "num_sms", lambda device: 132)
    strategy = PagedStrategy(4096, 512, page_size=16)
    # the Llama-3.2-1B attention shape (32 x 64 query heads, 8 KV heads): launch configs of its own
    engine = TorchEngine(model=OmegaConf.merge(TINY, {"head_dim": 64, "num_heads": 32, "num_kv_heads": 8}), attention="triton")
    engine.bind(strategy.page_size, strategy.num_pages)
    GPUEngine._warm_up(engine, strategy.page_size, strategy.num_pages)
    warmed, seen = seen, set()
    sched = Scheduler(strategy, max_num_seqs=6, max_num_batched_tokens=512)
    # prompts of 300 tokens (chunks past the short-extend config), 250 of them shared (extends
    # over a cached prefix), all at t = 0, outputs of 2-40 tokens: mixed steps of 1, 3, 4 and 5
    # decode rows beside prefill chunks (a sliced page table at any alignment)
    reqs = shared_prefix(num_groups=3, questions_per_group=4, system_len=Fixed(250), question_len=Fixed(50),
                         output_len=LogNormal(mean=12, sigma=0.6, min=2, max=40), rate=float("inf"), seed=3,
                         vocab_size=TINY.vocab_size)
    result = replay(reqs, sched, engine, progress=False)
    assert len(result.finished) == len(reqs) and sum(s.cached_tokens for s in result.finished) > 0
    kernels = {name for name, *_ in seen}
    assert {"_extend_kernel", "_decode_kernel"} <= kernels, kernels
    assert seen <= warmed, f"compiled first inside the replay: {sorted(seen - warmed)}"
