"""The model runner through the hybrid pool designs (issue 16): a Gemma-like tiny model (sliding
window 32 and full layers, page 16) runs a trace with shared prefixes and prompts longer than the
window through paged (one uniform pool, one table) and each of the four designs (their own K/V
memory, one page table per TableSpec, torch_engine.HybridKV), with greedy sampling: the tokens are
identical and each request's last logits equal paged's within the fp32 tolerance. A NULL_PAGE
(a page before a window that the design no longer holds) is never read: every page no table of
the step references is NaN while the step runs (also under preemptions, and through the gpu
engine's graph path with an eager stand-in for the graph), and the logits stay finite; a design
that drops pages the model still reads is caught by the engine's host check and by the NaN.
On a GPU, test_gpu_engine_generates_paged_tokens_in_every_design runs eager and graphed steps.
~16 s of CPU time (one thread: torch's pool spinning on a shared 2-core box costs ~40x)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kvbench.batch import KVReadGroups
from kvbench.engines.torch_engine import NULL_PAGE, HybridKV, TorchEngine
from kvbench.kernels.tolerances import tolerance
from kvbench.replay import replay
from kvbench.scheduler import Scheduler
from kvbench.sizes import layer_groups
from kvbench.traces import Fixed, shared_prefix
from strategy_cases import build

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"pattern": ["local", "local", "global"],  # 7 layers: 5 sliding (0 1 3 4 6), 2 full (2 5)
          "groups": {"local": {"kind": "sliding", "window": 32}, "global": {"kind": "full"}}}
# untied embeddings: a tied random model just repeats its input token
MODEL = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"), {
    "tie_embeddings": False, "num_layers": 7, "vocab_size": 512, "layers": LAYERS}))
DESIGNS = ("hybrid_separate", "hybrid_unified", "hybrid_jenga", "hybrid_radix")
CAPACITY, MAX_LEN = 1024, 128


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def trace(n_groups=2, per_group=3, system=48, question=12, output=10):
    # prompts of 60 > window 32; 3 running at most: later requests hit the shared 48 tokens
    return shared_prefix(num_groups=n_groups, questions_per_group=per_group, system_len=Fixed(system),
                         question_len=Fixed(question), output_len=Fixed(output), rate=float("inf"), seed=3,
                         vocab_size=MODEL["vocab_size"])


class Recording(TorchEngine):
    """Keeps each request's logits of its last emitted token; with `poison`, every page of a
    hybrid design's memory that no table of the step references is NaN while the step runs
    (restored after, so cached pages keep their K/V), and every step's logits must be finite."""

    def __init__(self, *a, poison: bool = False, **kw):
        super().__init__(*a, sample=True, **kw)
        self._recording(poison)

    def _recording(self, poison: bool) -> None:
        self.final: dict[int, torch.Tensor] = {}
        self.poison, self.poisoned_steps, self._batch = poison, 0, None

    def _flatten(self, batch):
        self._batch = batch
        return super()._flatten(batch)

    def _forward(self, h):
        if not (self.poison and self.hybrid is not None):
            return super()._forward(h)
        kv, st = self.hybrid, self.strategy
        held = {s: set() for s in kv.spaces}  # pages the step's tables reference, per space
        for t, spec in enumerate(kv.tables):
            for s in self._batch.seqs:
                row = st.table(s.request.id, t)
                held[spec.space].update(int(p) for p in row[row != NULL_PAGE])
        saved = [b.clone() for b in kv.buffers]
        for b in kv.buffers:
            b.fill_(float("nan"))
        dev = kv.buffers[0].device
        for s, pages in held.items():  # (aliased spaces: a page's own bytes only)
            idx = torch.tensor(sorted(pages), dtype=torch.int64, device=dev)
            kv.page_view(s)[idx] = kv.page_view(s, saved)[idx]
        logits = super()._forward(h)
        assert torch.isfinite(logits).all(), "a step read a page no table of it references"
        written = [b.clone() for b in kv.buffers]
        for b, old in zip(kv.buffers, saved):
            b.copy_(old)
        for s, pages in held.items():
            idx = torch.tensor(sorted(pages), dtype=torch.int64, device=dev)
            kv.page_view(s)[idx] = kv.page_view(s, written)[idx]
        self.poisoned_steps += 1
        return logits

    def _emit(self, batch, logits):
        super()._emit(batch, logits)
        for i, s in enumerate(x for x in batch.seqs if x.emits_token):
            self.final[s.request.id] = logits[i].detach().clone()


def generate(name: str, reqs=None, model=MODEL, strategy_model=None, page_size=16, engine_cls=None, max_num_seqs=3,
             capacity=CAPACITY, **engine_kw):
    """Replay `reqs` (default: trace()) through strategy `name` on the torch engine (or
    `engine_cls`), bound as kvbench.run binds it; returns (outputs, engine, strategy, scheduler)."""
    reqs = trace() if reqs is None else reqs
    st = build(name, capacity, MAX_LEN, model=strategy_model or model, page_size=page_size)
    eng = (engine_cls or Recording)(model=model, **engine_kw)
    eng.bind(st.page_size, st.num_pages, strategy=st if hasattr(st, "tables") else None)
    sched = Scheduler(st, max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                      kv_read_groups=KVReadGroups.of(layer_groups(model)))
    result = replay(reqs, sched, eng, progress=False)
    assert len(result.finished) == len(reqs)
    st.check_invariants()
    return {r.id: r.output.copy() for r in reqs}, eng, st, sched


@pytest.fixture(scope="module")
def runs():
    return {name: generate(name) for name in ("paged", *DESIGNS)}


@pytest.mark.parametrize("design", DESIGNS)
def test_greedy_tokens_and_last_logits_equal_paged(runs, design):
    ref, ref_eng, _, ref_sched = runs["paged"]
    got, eng, st, sched = runs[design]
    for rid in ref:
        np.testing.assert_array_equal(got[rid], ref[rid], err_msg=f"{design}, request {rid}")
        tol = tolerance(torch.float32)
        torch.testing.assert_close(eng.final[rid], ref_eng.final[rid], atol=tol.atol, rtol=tol.rtol)
    # the comparison went through windows (NULL entries, proven unread) and prefix hits
    assert eng.hybrid is not None and eng.hybrid.null_entries > 0
    assert ref_eng.hybrid is None and eng.kv_pool is None
    assert sum(r.output_len for r in trace()) == sum(len(o) for o in got.values())


def test_each_layer_reads_its_table_in_the_designs_memory(runs):
    """Layers dealt to tables in runs (unified: 5 sliding layers in tables of 2, 2, 1 and the 2
    full layers in one), and K/V memory equal to what the design lays out, within its pool."""
    expect = {"hybrid_unified": (0, 0, 3, 1, 1, 3, 2), "hybrid_separate": (0, 0, 1, 0, 0, 1, 0),
              "hybrid_jenga": (0, 0, 1, 0, 0, 1, 0), "hybrid_radix": (0, 0, 1, 0, 0, 1, 0)}
    for design, layer_table in expect.items():
        _, eng, st, _ = runs[design]
        kv = eng.hybrid
        assert kv.layer_table == layer_table, design
        spaces = {t.space: t.space_pages * t.page_bytes for t in st.tables}
        if design == "hybrid_jenga":  # every group's small pages tile the same large pages
            assert kv.aliased and kv.nbytes == st.num_large * st.large_bytes == max(spaces.values())
            k = kv.layers[0][0]  # layer 0's K: 5 layer slots per small page of the sliding group
            assert k.shape == (st.tables[0].space_pages * 16, 2, 16) and k.stride(0) == 5 * 2 * 2 * 16
        else:
            assert not kv.aliased and kv.nbytes == sum(spaces.values())
            assert all(k.is_contiguous() and v.is_contiguous() for k, v in kv.layers)
        assert kv.nbytes <= st.pool_bytes == CAPACITY * 7 * 2 * 2 * 16 * 4
        assert eng.summary()["kv_pool_bytes"] == kv.nbytes
    unified = runs["hybrid_unified"][1].hybrid  # pages of 2 layer slots; the 1-layer table uses slot 0
    assert unified.width == {0: 2} and unified.layer_slot == [0, 1, 0, 0, 1, 1, 0]
    assert runs["paged"][1].kv_pool.shape == (7, 2, CAPACITY, 2, 16)


@pytest.mark.parametrize("design", DESIGNS)
def test_no_step_reads_a_page_its_tables_do_not_reference(runs, design):
    """Under memory pressure (a pool of 256 token-equivalents, 6 requests at once: preemptions by
    recompute, pages freed and taken again), pages none of the step's tables reference (freed,
    cached, never used, and NULL entries' stand-in page 0) are NaN during each step: the logits
    stay finite and the tokens equal paged's."""
    got, eng, _, sched = generate(design, poison=True, capacity=256, max_num_seqs=6)
    assert eng.poisoned_steps > 10 and sched.num_preemptions > 0
    for rid, out in runs["paged"][0].items():
        np.testing.assert_array_equal(got[rid], out)


def _graph_stand_in():
    """The gpu engine's CUDA-graph path on the CPU: its buckets, static staging buffers (one slot
    row and page-table block per table), padding and per-table metadata views, with the graph
    replaced by an eager run of the same body over the same static inputs (no CUDA here)."""
    from types import SimpleNamespace

    from kvbench.engines.gpu_engine import GPUEngine

    class StandIn(Recording, GPUEngine):
        def __init__(self, model, poison: bool = False, **kw):
            TorchEngine.__init__(self, model, sample=True, **kw)
            self._recording(poison)
            self.cuda_graphs, self.graph_max_tokens, self.warmup = True, 512, False
            self._graphs, self._graph_pool, self.graph_capture_s = {}, None, 0.0

        step = TorchEngine.step

        def _capture(self, key, page_size, launch=False):
            g = self._graph_inputs(key, page_size)
            g.graph = SimpleNamespace(replay=lambda: self._graph_body(g))
            self._graphs[key] = g
            if launch:  # (GPUEngine's launch on the capture inputs: it must write nothing)
                self._graph_body(g)
            return g

    return StandIn


@pytest.mark.parametrize("design", DESIGNS)
def test_the_graph_path_generates_paged_tokens_in_every_design(runs, design):
    """Every step through the graph path's static buffers (decode-only, mixed and prefill
    shapes), unreferenced pages NaN: paged's tokens and last logits."""
    got, eng, _, _ = generate(design, poison=True, engine_cls=_graph_stand_in())
    shapes = {(k[4], k[5] > 0) for k in eng._graphs}  # (decode only, split into decode + extend rows)
    assert shapes == {(True, True), (False, True), (False, False)}, shapes  # decode, mixed, prefill
    ref, ref_eng = runs["paged"][0], runs["paged"][1]
    tol = tolerance(torch.float32)
    for rid in ref:
        np.testing.assert_array_equal(got[rid], ref[rid], err_msg=f"{design}, request {rid}")
        torch.testing.assert_close(eng.final[rid], ref_eng.final[rid], atol=tol.atol, rtol=tol.rtol)


def test_a_design_that_drops_pages_the_model_reads_is_caught():
    """The design thinks the window is 16, the model reads 32: the engine's host check names the
    NULL entry the step would read; with the check fooled, the NaN pages reach the logits."""
    narrow = {**MODEL, "layers": {**LAYERS, "groups": {**LAYERS["groups"], "local": {"kind": "sliding", "window": 16}}}}
    with pytest.raises(RuntimeError, match=r"has NULL_PAGE at page \d+, which the step reads"):
        generate("hybrid_unified", strategy_model=narrow)
    fooled = HybridKV.__init__

    def init(self, *a, **kw):
        fooled(self, *a, **kw)
        self.bounds = [(16, 0) if b[0] else b for b in self.bounds]  # the check now uses the design's window

    mp = pytest.MonkeyPatch()
    mp.setattr(HybridKV, "__init__", init)
    try:
        with pytest.raises(AssertionError, match="a step read a page no table of it references"):
            generate("hybrid_unified", strategy_model=narrow, poison=True)
    finally:
        mp.undo()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 before triton is imported "
                           "(on a GPU: test_gpu_engine_generates_paged_tokens_in_every_design)")
def test_triton_kernels_read_the_hybrid_tables_too():
    """Triton's interpreter, Jenga's strided (aliased) layer views: 2 layers (window 8, full),
    page 4, one request of 20 tokens and 2 outputs."""
    small = {**MODEL, "num_layers": 2, "layers": {**LAYERS, "pattern": ["local", "global"], "groups": {
        **LAYERS["groups"], "local": {"kind": "sliding", "window": 8}}}}
    reqs = lambda: trace(n_groups=1, per_group=1, system=16, question=4, output=2)  # noqa: E731
    ref, ref_eng, _, _ = generate("paged", reqs(), model=small, page_size=4)
    got, eng, _, _ = generate("hybrid_jenga", reqs(), model=small, page_size=4, attention="triton")
    assert eng.hybrid.aliased and eng.hybrid.null_entries > 0 and eng.model.ops.backend == "triton"
    for rid in ref:
        np.testing.assert_array_equal(got[rid], ref[rid])
        torch.testing.assert_close(eng.final[rid], ref_eng.final[rid], atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_gpu_engine_generates_paged_tokens_in_every_design(graphs):
    """On CUDA (Triton kernels, static per-table graph buffers): every design's tokens equal
    paged's on the same engine, with unreferenced pages NaN during every step."""
    from kvbench.engines.gpu_engine import GPUEngine

    class GPURecording(Recording, GPUEngine):
        pass

    kw = dict(engine_cls=GPURecording, kv_cache_gb=0.01, warmup=False, profile_tokens=64, cuda_graphs=graphs)
    ref, ref_eng, _, _ = generate("paged", **kw)
    assert graphs == bool(ref_eng._graphs)
    for design in DESIGNS:
        got, eng, _, _ = generate(design, poison=True, **kw)
        assert eng.poisoned_steps > 10 and graphs == bool(eng._graphs), design
        for rid in ref:
            np.testing.assert_array_equal(got[rid], ref[rid], err_msg=f"{design}, request {rid}")
            torch.testing.assert_close(eng.final[rid].cpu(), ref_eng.final[rid].cpu(), atol=1e-3, rtol=1e-3)


def test_a_hybrid_batch_with_page_copies_is_refused(runs):
    from kvbench.batch import StepBatch

    eng = runs["hybrid_unified"][1]
    with pytest.raises(RuntimeError, match="has no swap, host tier or copy-on-write"):
        eng.step(StepBatch([], 16, 64, False, [(1, 2)]))


@pytest.mark.parametrize("model", ["tiny_hybrid", "tiny_gemma3_1b", "tiny_gpt_oss"])
def test_experiment_smoke(tmp_path, model):
    """experiments/hybrid_gpu.py on the CPU: every design against paged, tokens identical (fp32),
    on a Llama with layer groups and on the Gemma-3 and gpt-oss architectures (sinks, MoE)."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import hybrid_gpu
    finally:
        sys.path.remove(str(REPO / "experiments"))
    hybrid_gpu.main(["--out", str(tmp_path), "--engine", "torch", "--model", model, "--limit", "6",
                     "--dtype", "float32"])
    import json

    res = json.loads((tmp_path / "hybrid_gpu.json").read_text())
    rows = {r["design"]: r for r in res["designs"]}
    assert set(rows) == {"paged", *DESIGNS}
    for r in rows.values():
        assert r["finished"] == 6 and r["identical_to_paged"] == 6, r
        assert r["kv_pool_bytes"] > 0 and r["output_throughput"] > 0
    assert (tmp_path / "hybrid_gpu.md").read_text().count("| hybrid_") == 4


def test_the_graph_path_takes_page_tables_longer_than_its_bucket():
    """A request's page table may hold pages past its length (here one more page at a power-of-two
    boundary: 256 tokens = 16 pages, the smallest page bucket, and a 17-page table); the graph path
    reads only the bucket's pages and computes what the eager path computes."""
    from kvbench.batch import ScheduledSeq, StepBatch
    from kvbench.request import Request

    model = {**MODEL, "layers": None}
    ids = np.random.default_rng(3).integers(0, 512, 256).astype(np.int32)
    logits = {}
    for name, cls in (("eager", TorchEngine), ("graph path", _graph_stand_in())):
        eng = cls(model) if name == "graph path" else TorchEngine(model, sample=True)
        eng.keep_logits = True
        eng.bind(16, 64)
        table = np.arange(17, dtype=np.int32)[::-1].copy()           # 17 pages for 256 tokens
        eng.step(StepBatch([ScheduledSeq(Request(0, 0.0, ids, np.zeros(2, np.int32)), 0, 256, table)],
                           16, 64, False, []))
        logits[name] = eng.last_logits[0].float()
    torch.testing.assert_close(logits["graph path"], logits["eager"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("design", ["hybrid_separate", "hybrid_jenga"])
def test_gpu_engine_warmup_stays_inside_the_designs_memory(design):
    """The gpu engine's warm-up batches on a hybrid design's memory (here on CPU, reference
    attention: a read past a space's last slot raises). Its longest context and prefix are
    bounded by the design's smallest page space, and it runs the paged layout only."""
    from kvbench.engines.gpu_engine import GPUEngine

    st = build(design, CAPACITY, MAX_LEN, model=MODEL, page_size=16)
    eng = TorchEngine(model=MODEL)
    eng.bind(st.page_size, st.num_pages, strategy=st)
    eng.warmup_s = None
    GPUEngine._warm_up(eng, st.page_size, st.num_pages)
    assert eng.warmup_s > 0
