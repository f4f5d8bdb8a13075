"""CUDA graphs of the gpu engine.

CPU (the graph path with an eager stand-in for the graph, as in test_hybrid_engine: buckets,
shared staging buffers, the packed page table of steps with prefill, padding):
  - the warm-up's key set (`graph_keys`) is exactly the set of keys the steps within the limits
    map to (every composition of decode rows and prefill chunks, enumerated apart), per mode;
  - a replay after the warm-up ("all") captures nothing; without it ("none") it captures;
  - a replay's logits are identical with and without the warm-up, and match the eager path;
  - the sizing subtracts the graphs' memory (`kv_budget_bytes`).
GPU: a graph replay of a mixed step (prefill chunks beside decodes, padded to its token bucket)
computes what the eager step computes. ~5 s of CPU time."""
from __future__ import annotations

import contextlib
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvbench.batch import ScheduledSeq, StepBatch
from kvbench.engines.gpu_engine import (DECODE_BUCKETS, GRAPH_BATCH_SIZES, GPUEngine, batch_bucket, context_pages,
                                        graph_keys, token_bucket)
from kvbench.engines.torch_engine import TorchEngine
from kvbench.request import Request

TINY = dict(name="tiny-bf16", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
            head_dim=64, vocab_size=32000, rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=True,
            attention_bias=False, attention_out_bias=False, dtype="bfloat16", checkpoint=None)
CPU_MODEL = dict(TINY, name="tiny-f32", hidden_size=64, intermediate_size=128, head_dim=16, vocab_size=512,
                 tie_embeddings=False, dtype="float32")
PS, SEQS, TOKENS, MAX_LEN = 16, 4, 64, 160  # page size, max_num_seqs, max_num_batched_tokens, max_model_len


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def _drive(eng, reqs, chunk, graphs, seqs=None, tokens=None):
    """Toy schedule: request i joins at step i (at most `seqs` requests and `tokens` tokens a
    step), prefill chunks of up to `chunk` tokens, then decodes; returns every emitted row of
    logits (fp32)."""
    eng.cuda_graphs = graphs
    ps, pos, got, step = 16, {r.id: 0 for r in reqs}, [], 0
    tables = {r.id: np.arange(r.id * 64, r.id * 64 + 64, dtype=np.int32)[::-1].copy() for r in reqs}
    while any(pos[r.id] < r.kv_len for r in reqs):
        batch, left = [], tokens or 1 << 30
        for i, r in enumerate(reqs):
            s = pos[r.id]
            if step < i or s >= r.kv_len or (seqs is not None and len(batch) == seqs) or not left:
                continue
            n = min(chunk, r.prompt_len - s, left) if s < r.prompt_len else 1
            left -= n
            batch.append(ScheduledSeq(r, s, n, tables[r.id][:-(-(s + n) // ps)]))
        eng.step(StepBatch(batch, ps, eng.kv_pool.shape[2] // ps, False, []))
        got += [eng.last_logits[s.request.id].float().cpu() for s in batch if s.emits_token]
        for s in batch:
            pos[s.request.id] += s.num_new
        step += 1
    return got


# ---- CPU: the stand-in -------------------------------------------------------------------------
class StandIn(GPUEngine):
    """The gpu engine's graph path on the CPU: `_capture` builds the static inputs and replays by
    running the graph body eagerly over them (no CUDA here)."""

    def __init__(self, graph_warmup: str):
        TorchEngine.__init__(self, CPU_MODEL, keep_logits=True)
        self.cuda_graphs, self.graph_max_tokens, self.warmup, self.graph_warmup = True, TOKENS, False, graph_warmup
        self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len = SEQS, TOKENS, MAX_LEN
        self._graphs, self._graph_pool, self.graph_capture_s = {}, None, 0.0

    step = TorchEngine.step
    forwards = replays = launches = 0

    def _forward(self, h):
        self.forwards += 1
        return super()._forward(h)

    def _replay(self, g):
        self.replays += 1
        self._graph_body(g)

    def _capture(self, key, page_size, launch=False):
        g = self._graph_inputs(key, page_size)
        g.graph = SimpleNamespace(replay=lambda: self._replay(g))
        self._graphs[key] = g
        if launch:  # (GPUEngine's launch on the capture inputs: the graph-vs-eager tests check it writes nothing)
            self.launches += 1
            self._graph_body(g)
        return g


def _requests():
    rng = np.random.default_rng(0)
    # 25 = 24 + 1: a prompt's last chunk of one token (a one-token row that is not a decode)
    return [Request(i, 0.0, rng.integers(0, 512, n).astype(np.int32), np.zeros(4, np.int32))
            for i, n in enumerate([70, 5, 33, 140, 25, 2])]


def _step_keys(mode_pages: int, page_size: int, max_context: int, seqs: int, tokens: int, graph_max: int) -> set:
    """Every key `GPUEngine._forward` maps a step within the limits to, from the step's rows: nd
    one-token rows (decodes, or prompts' last tokens), npf prefill chunks of >= 2 tokens each (tp
    in all), the longest request's length (any, up to max_context); decode-only steps too.
    Enumerated from the compositions, apart from `graph_keys`."""
    keys = set()
    widths = {context_pages(n, page_size) for n in range(1, max_context + 1)}
    for b in range(1, seqs + 1):  # decode-only: b requests
        keys |= {(batch_bucket(b), batch_bucket(b), w, False, True, batch_bucket(b)) for w in widths}
    for nd, npf in itertools.product(range(seqs + 1), range(seqs + 1)):
        if not 0 < nd + npf <= seqs:
            continue
        for tp in range(2 * npf, min(tokens - nd, graph_max) + 1):
            if npf == 0 and tp:
                break
            if npf == 0 and nd == 0:
                continue
            dp = next(x for x in (0, *GRAPH_BATCH_SIZES) if x >= nd)
            keys.add((dp + token_bucket(tp), dp + batch_bucket(npf), mode_pages, False, False, dp))
    return keys


def test_graph_keys_are_the_keys_of_the_steps_within_the_limits():
    """"all": exactly the keys of every step composition (decode-only: every batch bucket x every
    context bucket; with prefill: one table width); "decode": the decode-only ones; "none": none.
    Largest first. And the sizes the report gives for the experiments' configs."""
    lim = dict(max_num_seqs=SEQS, max_num_batched_tokens=TOKENS, graph_max_tokens=TOKENS, max_context=MAX_LEN,
               page_size=PS, contiguous=False)
    width = context_pages(MAX_LEN, PS)
    assert width == 16
    want = _step_keys(width, PS, MAX_LEN, SEQS, TOKENS, TOKENS)
    got = graph_keys("all", **lim)
    assert set(got) == want and len(got) == len(want) == 42
    assert got == sorted(got, key=lambda k: (k[0], k[1], k[2], k[4]), reverse=True)
    decode = {k for k in want if k[4]}
    assert set(graph_keys("decode", **lim)) == decode == {(b, b, 16, False, True, b) for b in (1, 2, 4)}
    assert graph_keys("none", **lim) == []
    # context buckets of decode keys: a page size of 4 gives 40 pages -> 16, 32, 64
    small = dict(lim, page_size=4)
    assert {k[2] for k in graph_keys("decode", **small)} == {16, 32, 64}
    assert set(graph_keys("all", **small)) == _step_keys(64, 4, MAX_LEN, SEQS, TOKENS, TOKENS)
    # graph_max_tokens bounds the prefill tokens (steps past it run eagerly), not the decode rows
    capped = graph_keys("all", **dict(lim, graph_max_tokens=32))
    assert set(capped) == _step_keys(width, PS, MAX_LEN, SEQS, TOKENS, 32)
    # limits off the buckets' edges (3 and 1 requests, 40 tokens): the buckets' fullest steps too
    for seqs in (1, 3):
        odd = dict(lim, max_num_seqs=seqs, max_num_batched_tokens=40, graph_max_tokens=40)
        assert set(graph_keys("all", **odd)) == _step_keys(width, PS, MAX_LEN, seqs, 40, 40)
    # the experiments' configs (1B and 8B alike: max_num_seqs 256, 8,192 tokens, max_model_len 16,384)
    exp = dict(max_num_seqs=256, max_num_batched_tokens=8192, graph_max_tokens=8192, max_context=16384,
               contiguous=False)
    assert len(graph_keys("decode", page_size=16, **exp)) == 9 * 7
    assert len(graph_keys("decode", page_size=1, **exp)) == 9 * 11
    assert len(graph_keys("all", page_size=16, **exp)) == 4762
    with pytest.raises(ValueError, match="graph_warmup='some'"):
        graph_keys("some", **lim)


def _run(mode: str, graphs: bool = True):
    eng = StandIn(mode)
    eng.bind(PS, 512)
    warm = dict(eng._graphs)
    got = _drive(eng, _requests(), chunk=24, graphs=graphs, seqs=SEQS, tokens=TOKENS)
    return eng, warm, got


def test_a_replay_after_the_warm_up_captures_nothing():
    """After bind with graph_warmup=all, a replay whose steps stay within the limits (mixed,
    prefill-only, decode-only and one-token-rows steps) finds every graph; with "none" the same
    replay captures on first use, and each capture is counted."""
    eng, warm, _ = _run("all")
    assert eng.graph_warmup_captures == len(warm) == 42
    assert eng.graph_captures_in_replay == 0 and eng._graphs.keys() == warm.keys()
    assert eng.graph_summary()["cuda_graph_captures_in_replay"] == 0
    assert eng.replays == eng.forwards > 10  # every step went through a graph: none ran eagerly
    used = set(_run("none")[0]._graphs)  # the keys the replay met
    assert {(k[4], k[5] > 0) for k in used} == {(True, True), (False, True), (False, False)}  # decode, mixed, prefill
    lazy, warm_none, _ = _run("none")
    assert not warm_none and lazy.graph_warmup_captures == 0
    assert lazy.graph_captures_in_replay == len(lazy._graphs) == lazy.launches > 5  # each launched once on capture
    assert eng.launches == len(warm)  # (the warm-up's too: a graph's first launch uploads it)
    assert set(lazy._graphs) <= set(warm)  # what the replay met is in the warm-up's set
    decode, _, _ = _run("decode")
    assert 0 < decode.graph_captures_in_replay == len({k for k in lazy._graphs if not k[4]})


def test_outputs_are_identical_with_and_without_the_warm_up():
    """The same replay through warmed-up graphs, graphs captured on first use (and launched once
    on their capture inputs: that launch writes nothing), and eagerly: the graph paths give
    identical logits, the eager path the same within fp32 rounding."""
    _, _, warmed = _run("all")
    _, _, lazy = _run("none")
    _, _, eager = _run("none", graphs=False)
    assert len(warmed) == len(lazy) == len(eager) == sum(r.output_len for r in _requests())
    for a, b, c in zip(warmed, lazy, eager):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_steps_with_prefill_copy_their_tables_whole_in_part_or_packed_with_the_same_outputs(monkeypatch):
    """gpu_engine.PREFILL_COPY_IN_BYTES: a graph of a step with prefill whose staging buffer is at
    most that takes its page-table block in its own copy (no wide table); a larger one copies the
    first columns that fit in that many bytes and spreads them into its wide table, and a step whose
    tables are wider packs the rest and spreads it before the replay; with 0 every step packs all
    its columns. Every path is taken (1,100 bytes: graphs of each kind, some with 7 and 13 columns in
    their copy for tables of up to 10 pages), and the logits are identical."""
    from kvbench.engines import gpu_engine
    default = gpu_engine.PREFILL_COPY_IN_BYTES
    got, kinds, packed = {}, {}, {}
    for limit in (default, 1100, 0):
        monkeypatch.setattr(gpu_engine, "PREFILL_COPY_IN_BYTES", limit)
        eng, _, got[limit] = _run("none")
        prefill = [g for k, g in eng._graphs.items() if not k[4]]
        assert all(g.copy_in for g in prefill)
        kinds[limit] = {"whole" if g.table is None else g.wb for g in prefill}
        packed[limit] = eng.packed_fills
    assert kinds == {default: {"whole"}, 1100: {"whole", 0, 7, 13}, 0: {0}}
    assert packed[default] == 0 and packed[0] > packed[1100] > 0
    assert len(got[0]) == sum(r.output_len for r in _requests())
    for limit in (1100, 0):
        for a, b in zip(got[limit], got[default]):
            assert torch.equal(a, b)


def test_fine_decode_buckets_pad_decode_graphs_less_with_the_same_outputs():
    """decode_buckets="fine": decode-only keys for every fine size up to max_num_seqs' bucket, the
    keys of steps with prefill unchanged; a replay whose decode steps have 17-20 rows replays
    24-row graphs where "pow2" replays 32-row ones, and every emitted row's logits match."""
    exp = dict(max_num_seqs=256, max_num_batched_tokens=8192, graph_max_tokens=8192, max_context=16384,
               page_size=16, contiguous=False)
    fine = DECODE_BUCKETS["fine"]
    pow2 = graph_keys("all", **exp)
    keys = graph_keys("all", decode_sizes=fine, **exp)
    assert {k for k in keys if not k[4]} == {k for k in pow2 if not k[4]}
    assert sorted({k[1] for k in keys if k[4]}) == [b for b in fine if b <= 256] and len(fine[:fine.index(256) + 1]) == 19
    assert len([k for k in keys if k[4]]) == 19 * 7
    rng = np.random.default_rng(3)
    reqs = [Request(i, 0.0, rng.integers(0, 512, 3).astype(np.int32), np.zeros(30, np.int32)) for i in range(20)]
    got, rows = {}, {}
    for name in ("pow2", "fine"):
        eng = StandIn("none")
        eng.decode_sizes = DECODE_BUCKETS[name]
        eng.bind(PS, 20 * 64)
        got[name] = _drive(eng, reqs, chunk=24, graphs=True)
        rows[name] = {k[1] for k in eng._graphs if k[4]}
    assert max(rows["pow2"]) == 32 and max(rows["fine"]) == 24
    assert len(got["fine"]) == len(got["pow2"]) == 20 * 30
    for a, b in zip(got["fine"], got["pow2"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_steady_decode_rewrites_only_its_rows(monkeypatch):
    """A decode step with the graph and batch size of the last fill writes only its rows' ids,
    positions, slots, lengths and page tables into the shared staging buffer: the same logits as
    writing the whole layout every step, also where mixed steps of other graphs rewrote the
    buffer in between (the replay below alternates them), and the short path is taken."""
    import kvbench.engines.torch_engine as te

    got, short = {}, {}
    for fast in (False, True):
        monkeypatch.setattr(te, "FAST_DECODE_HOST", fast)
        eng = StandIn("all")
        eng.bind(PS, 512)
        rng = np.random.default_rng(1)  # a long prompt joins late: its chunks interleave with decodes
        reqs = [Request(i, 0.0, rng.integers(0, 512, n).astype(np.int32), np.zeros(20, np.int32))
                for i, n in enumerate([9, 30, 3, 100])]
        got[fast] = _drive(eng, reqs, chunk=24, graphs=True, seqs=SEQS, tokens=TOKENS)
        short[fast] = eng.short_fills
    assert short[False] == 0 and 10 <= short[True] < eng.replays
    assert len(got[True]) == len(got[False]) == 80
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)


def test_a_step_with_prefill_keeps_the_decode_fill(monkeypatch):
    """Decode graphs and graphs of steps with prefill have staging buffers of their own: a decode
    step after a mixed step of another graph takes the short fill when its graph and batch size
    are the last decode fill's, and its logits are those of a whole fill."""
    import kvbench.engines.torch_engine as te

    rng = np.random.default_rng(3)
    reqs = [Request(i, 0.0, rng.integers(0, 512, 20).astype(np.int32), np.zeros(8, np.int32)) for i in range(2)]
    newcomer = Request(2, 0.0, rng.integers(0, 512, 5).astype(np.int32), np.zeros(2, np.int32))
    tables = {r.id: np.arange(r.id * 8, r.id * 8 + 8, dtype=np.int32) for r in (*reqs, newcomer)}

    def decode(pos):
        return StepBatch([ScheduledSeq(r, pos, 1, tables[r.id][:-(-(pos + 1) // PS)]) for r in reqs], PS, 64, False, [])
    got, short = {}, {}
    for fast in (False, True):
        monkeypatch.setattr(te, "FAST_DECODE_HOST", fast)
        eng = StandIn("all")
        eng.bind(PS, 64)
        eng.step(StepBatch([ScheduledSeq(r, 0, 20, tables[r.id][:2]) for r in reqs], PS, 64, False, []))
        eng.step(decode(20))
        before = eng.short_fills
        # a mixed step (another graph): both decodes and the newcomer's whole prompt
        eng.step(StepBatch([ScheduledSeq(r, 21, 1, tables[r.id][:2]) for r in reqs]
                           + [ScheduledSeq(newcomer, 0, 5, tables[2][:1])], PS, 64, False, []))
        eng.step(decode(22))
        short[fast] = eng.short_fills - before
        got[fast] = [eng.last_logits[r.id].float() for r in reqs]
    assert short == {False: 0, True: 1}
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)


def test_a_decode_batch_flattens_to_its_rows():
    """`_flatten_decode`: ids, positions, slots, lengths and tables of a decode batch, rows in the
    batch's order, page tables of different lengths padded with page 0."""
    eng = StandIn("none")
    eng.bind(PS, 512)
    reqs = [Request(i, 0.0, np.zeros(n, np.int32), np.zeros(8, np.int32)) for i, n in enumerate([40, 10, 30])]
    tables = [np.array([7, 3, 9], np.int32), np.array([5, 2], np.int32), np.array([11, 4, 6], np.int32)]
    starts = [40, 17, 33]  # positions: page 2 slot 8, page 1 slot 1, page 2 slot 1
    batch = StepBatch([ScheduledSeq(r, p, 1, t) for r, p, t in zip(reqs, starts, tables)], PS, 32, False, [])
    for r in reqs:  # (the engine's copy of each request's ids: position p holds 1000 * id + p)
        ids = eng._token_ids(r)
        ids[:] = np.arange(len(ids)) + 1000 * r.id
    h = eng._flatten(batch)
    assert h.decode_only and h.num_decode == 0
    assert h.ids.tolist() == [40, 1017, 2033] and h.positions.tolist() == starts
    assert h.slot_mapping.tolist() == [9 * PS + 8, 2 * PS + 1, 6 * PS + 1]
    assert h.seq_lens.tolist() == [41, 18, 34] and h.query_start_loc.tolist() == [0, 1, 2, 3]
    assert h.logits_idx.tolist() == [0, 1, 2]
    assert h.page_table.tolist() == [[7, 3, 9], [5, 2, 0], [11, 4, 6]]


def test_the_sizing_subtracts_the_graphs_memory(monkeypatch):
    """kv_budget = total x utilization - weights - activation peak - graph memory - outside torch."""
    gib = 1 << 30
    eng = SimpleNamespace(device="cuda:0", utilization=0.9, activation_peak=2 * gib, graph_pool_bytes=3 * gib,
                          model=SimpleNamespace(weight_bytes=lambda: 16 * gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    budget = GPUEngine.kv_budget_bytes(eng)
    assert budget == int(140 * gib * 0.9) - 16 * gib - 2 * gib - 3 * gib - (140 - 100 - 30) * gib
    eng.graph_pool_bytes = 0
    assert GPUEngine.kv_budget_bytes(eng) - budget == 3 * gib


class FakeCuda:
    """torch.cuda's calls in the engine's capture and sizing paths, on the CPU: streams and graphs
    that run their body eagerly, free memory that drops by `per_capture(n)` at the n-th capture,
    and a count of the caching allocator's releases."""

    def __init__(self, per_capture):
        self.free, self.per_capture, self.captures, self.resets, self.emptied = 100 << 30, per_capture, [], 0, 0

    def install(self, mp):
        cuda = self
        stream = SimpleNamespace(wait_stream=lambda other: None)

        class Graph:
            def replay(self):
                pass

            def reset(self):
                cuda.resets += 1

        class capture:  # torch.cuda.graph(g, pool=, stream=)
            def __init__(self, graph, pool=None, stream=None):
                self.pool = pool

            def __enter__(self):
                torch.cuda.empty_cache()  # (as torch's does)

            def __exit__(self, *exc):
                cuda.captures.append(self.pool)
                cuda.free -= cuda.per_capture(len(cuda.captures))

        def empty_cache():
            cuda.emptied += 1

        for name, value in dict(Stream=lambda *a: stream, stream=lambda s: contextlib.nullcontext(),
                                current_stream=lambda *a: stream, graph_pool_handle=lambda: (0, 7),
                                CUDAGraph=Graph, graph=capture, synchronize=lambda *a: None, empty_cache=empty_cache,
                                mem_get_info=lambda *a: (cuda.free, 140 << 30)).items():
            mp.setattr(torch.cuda, name, value)


def test_graph_memory_profile_through_a_fake_cuda(monkeypatch):
    """The sizing's probe (`_profile_graphs`, through GPUEngine's own `_capture`) on a fake CUDA:
    the two largest graphs take 150 MiB of pool + 2 MiB each, the 7 small decode ones 2 MiB each,
    the 8 graphs with prefill spread over their keys 5 MiB each -> graph_pool_bytes = 304 MiB +
    2 MiB x (the warm-up's decode keys - 1) + 5 MiB x (its keys with prefill - 1) + the staging
    bytes; every probe graph is reset and the scratch pool dropped; no capture emptied the caching
    allocator (only the cleanup, once). With graph_warmup=decode, no graph with prefill is probed
    but the largest."""
    mib = 1 << 20
    fake = FakeCuda(lambda n: (150 if n <= 2 else 0) * mib + (5 if n > 9 else 2) * mib)
    fake.install(monkeypatch)
    monkeypatch.setattr(StandIn, "_capture", GPUEngine._capture)
    for mode in ("all", "decode"):
        eng = StandIn(mode)
        fake.resets, fake.captures = 0, []
        got = GPUEngine._profile_graphs(eng)
        keys = graph_keys(mode, max_num_seqs=SEQS, max_num_batched_tokens=TOKENS, graph_max_tokens=TOKENS,
                          max_context=MAX_LEN, page_size=1, contiguous=False)
        n_prefill = sum(not k[4] for k in keys)
        probe = eng.graph_profile
        assert fake.resets == (17 if mode == "all" else 9)  # (one small decode key is the largest's)
        assert fake.captures == [(0, 7)] * fake.resets
        assert not eng._graphs and eng.kv_pool is None and eng._stage is None and eng.graph_capture_s == 0
        assert probe["pool_and_largest_bytes"] == 304 * mib and probe["per_graph_bytes"] == 2 * mib
        assert probe["per_prefill_graph_bytes"] == (5 * mib if mode == "all" else 0)
        assert probe["keys"] == len(keys) and probe["prefill_keys"] == n_prefill and (n_prefill > 0) == (mode == "all")
        widest = graph_keys("all", max_num_seqs=SEQS, max_num_batched_tokens=TOKENS, graph_max_tokens=TOKENS,
                            max_context=MAX_LEN, page_size=16, contiguous=False)  # (the probes' page size)
        big = [max((k for k in widest if not k[4]), key=lambda k: (k[0], k[1])),
               max((k for k in widest if k[4]), key=lambda k: (k[1], k[2]))]
        assert probe["staging_bytes"] == eng._staging_bytes(keys + big)
        assert (probe["staging_bytes"] > eng._staging_bytes(keys)) == (mode == "decode")  # (+ the prefill buffer)
        assert got == (304 * mib + 2 * mib * (len(keys) - n_prefill - 1) + 5 * mib * max(n_prefill - 1, 0)
                       + probe["staging_bytes"])
    assert fake.emptied == 2


# ---- GPU --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("warmup", ["none", "all"])
def test_mixed_step_graphs_match_eager(warmup):
    eng = GPUEngine(TINY, kv_cache_gb=0.05, keep_logits=True, warmup=False, profile_tokens=256,
                    cuda_graphs=warmup != "none", graph_warmup=warmup, max_num_seqs=4,
                    max_num_batched_tokens=256, max_model_len=512)
    eng.bind(16, eng.kv_capacity_tokens(None) // 16)
    rng = np.random.default_rng(0)
    reqs = [Request(i, 0.0, rng.integers(0, 32000, n).astype(np.int32), np.zeros(4, np.int32))
            for i, n in enumerate([70, 5, 33, 140])]
    eager = _drive(eng, reqs, chunk=24, graphs=False)
    graphed = _drive(eng, reqs, chunk=24, graphs=True)
    mixed = [k for k in eng._graphs if not k[4]]
    assert mixed, "no mixed-step graph was captured"
    if warmup == "all":
        assert eng.graph_captures_in_replay == 0 and eng.graph_pool_bytes > 0
        # what the warm-up's graphs took is covered by what the sizing set aside for them
        info = eng.graph_summary()
        assert info["graph_mem_measured_bytes"] <= info["graph_pool_bytes"] + (64 << 20), info
    assert len(eager) == len(graphed)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, atol=3e-2, rtol=3e-2)
        assert a.argmax() == b.argmax()



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_steps_on_parallel_branches_give_the_serial_graphs_logits(monkeypatch):
    """kvbench.model.PARALLEL_MIXED: a captured mixed step forks its decode attention onto a side
    stream beside the extend attention; the same kernels on the same inputs, writing disjoint
    rows, so every logit equals the serial graph's exactly."""
    from kvbench import model
    eng = GPUEngine(TINY, kv_cache_gb=0.05, keep_logits=True, warmup=False, profile_tokens=256,
                    cuda_graphs=True, graph_warmup="none", max_num_seqs=4, max_num_batched_tokens=256,
                    max_model_len=512)
    eng.bind(16, eng.kv_capacity_tokens(None) // 16)
    rng = np.random.default_rng(1)
    reqs = [Request(i, 0.0, rng.integers(0, 32000, n).astype(np.int32), np.zeros(4, np.int32))
            for i, n in enumerate([70, 5, 33, 140])]
    got = {}
    for parallel in (False, True):
        monkeypatch.setattr(model, "PARALLEL_MIXED", parallel)
        eng.drop_graphs()
        got[parallel] = _drive(eng, reqs, chunk=24, graphs=True)
        assert any(k[5] > 0 and not k[4] for k in eng._graphs), "no mixed-step graph was captured"
    assert len(got[False]) == len(got[True])
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spin", [True, False])
def test_sampled_tokens_are_the_argmax_of_the_kept_logits(monkeypatch, spin):
    """Greedy sampling on the GPU engine (graph replays; the step's waits polled or blocking):
    each emitted token, written into the request's output, is the argmax of the logits kept for
    that request at that step."""
    import kvbench.engines.gpu_engine as ge

    monkeypatch.setattr(ge, "SPIN_WAIT", spin)
    eng = GPUEngine(TINY, kv_cache_gb=0.05, keep_logits=True, sample=True, warmup=False, profile_tokens=256,
                    cuda_graphs=True, graph_warmup="decode", max_num_seqs=4, max_num_batched_tokens=256,
                    max_model_len=512)
    eng.bind(16, eng.kv_capacity_tokens(None) // 16)
    rng = np.random.default_rng(2)
    reqs = [Request(i, 0.0, rng.integers(0, 32000, n).astype(np.int32), np.zeros(5, np.int32))
            for i, n in enumerate([70, 5, 33])]
    emit, checked = eng._emit, []

    def checked_emit(batch, logits):
        emit(batch, logits)
        for s in batch.seqs:
            if s.emits_token:
                r, end = s.request, s.start + s.num_new
                assert int(r.output[end - r.prompt_len]) == int(eng.last_logits[r.id].argmax())
                checked.append(r.id)

    eng._emit = checked_emit
    _drive(eng, reqs, chunk=24, graphs=True)
    assert sorted(checked) == sorted(r.id for r in reqs for _ in range(r.output_len))
