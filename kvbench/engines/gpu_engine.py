"""`engine=gpu`: the model on CUDA with the Triton kernels; the KV pool takes what is left.

Sizing, as vLLM does it: load the weights, run one profiling forward of `profile_tokens`
tokens, and give the pool

    kv_budget = total_gpu_mem * gpu_memory_utilization
                - weights - activation peak (profiled) - CUDA graphs (profiled)
                - memory outside torch (CUDA context)

unless `kv_cache_gb` names the pool size. The graphs' share (`graph_pool_bytes`, cuda_graphs
with graph_warmup != none) is measured as vLLM V1's `profile_cudagraph_memory` does: capture the
largest graphs the run can meet on a scratch pool (free memory before and after), a per-graph
cost of each kind (decode, with prefill) from 8 small ones times the warm-up's keys of that kind,
plus the staging buffers; then release
them. (vLLM: `available_kv = requested - non_kv - cudagraph_memory_estimate`, its estimate from
the first captures' free-memory deltas plus a per-graph floor of 1 MiB, profiled into the pool the
real capture then uses.) Step time = CUDA events around the whole step
(host-side batch building included), minus the capture time of any CUDA graph made in it and
the time a hybrid design's `strategy.table()` calls take (a one-table strategy's page tables are
read by the scheduler, outside the step; `table_read_s` in the summary).

CUDA graphs (`cuda_graphs=true`): every step of at most 512 requests replays a full-model graph of
its (token bucket, batch bucket, context bucket, contiguous, decode-only, decode-row bucket) shape,
except steps with more than `graph_max_tokens` (8,192) tokens of prefill, which run eagerly. `bind`
captures the graphs a replay within the scheduler's limits can meet (`graph_warmup`: `graph_keys`
says which), largest first, into one shared pool (graph outputs are unowned, so later captures reuse
their blocks) with one staging buffer per kind (decode-only, with prefill); a key it missed is captured on first use, launched
once on its capture inputs (a graph's first launch also uploads it), both taken out of the step's
time, and counted in `cuda_graph_captures_in_replay`. Steps with prefill have one context bucket,
the widest (`max_model_len`): their page tables cross the bus in the graph's one copy where its
staging buffer is small (`PREFILL_COPY_IN_BYTES`); else the graph copies their first columns (as
many as fit in that many bytes) and spreads them into the wide block on the device, and only a step
whose requests' tables are wider packs the rest (used rows x columns) and copies and spreads it
before the replay, so the key space is (token bucket x prefill-request bucket x
decode-row bucket), 4,699 keys for max_num_seqs 256 and 8,192 tokens (plus 63 decode keys at page
16, 99 at page 1 with pow2 decode buckets; about twice as many with the default fine ones).
Measured on an H200 (results/gpu/step_overhead_h200_05c9e0e.json): from graphs, a 1B 1,024-token
prefill takes 1.04x its kernels' time, where eagerly (the limit was 512 before 05c9e0e) it took
2.3x; an 8B 2,048-token prefill 1.08x. Padded tokens write nowhere (slot -1), padded requests
have no tokens and attend to nothing (seq_len 0), padded logits rows are dropped.
Decode graphs size their split-KV for the context bucket (a power of two of pages), not the exact
max length. Steps with prefill are padded to a token bucket (`token_bucket`: under 1/8 of padding):
the extend kernel takes its request boundaries from `query_start_loc`, so one graph serves any mix
of chunks.

Hybrid pool designs (issue 16; `bind(..., strategy=)`, torch_engine.HybridKV): the pool is the
design's own memory, at most its `pool_bytes` (= kv_capacity_tokens x bytes per token, the
budget sized above: the engine never allocates more than the uniform pool would; bytes a design's
pages cannot use stay unallocated), each layer reading its table's slots. A graph then has one
slot-mapping row and one page-table block per table in its staging buffer (static, like the
rest), and every table's AttnMetadata views them; eager steps share the torch engine's path.

A mixed step's one-token rows go first (`HostBatch.num_decode`) and through the decode kernel;
only the prefill chunks go through extend, whose 128-query tiles would otherwise be spent on one
query each (measured, H200, 8B: a 512-token chunk beside 63 decodes took 42.3 ms, 28.8 of them
in extend; split, 19.6 ms). In a graph the decode rows are padded to a batch bucket of their own,
and the two attention kernels run as parallel branches (`kvbench.model.PARALLEL_MIXED`).
"""
from __future__ import annotations

import contextlib
import gc
import time
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch

from kvbench.engines import torch_engine
from kvbench.engines.torch_engine import HostBatch, TorchEngine, _plain, with_tables
from kvbench.model import DTYPES, AttnMetadata, ModelConfig, as_model_config, side_stream
from kvbench.sizes import GIB, dtype_bytes, kv_bytes_per_token, tokens_in_gib

PER_GRAPH_FLOOR = 1 << 20  # bytes the sizing gives each warm-up graph at least (`_profile_graphs`)
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# the batch buckets of decode-only graphs (`decode_buckets`): "pow2" those of every graph; "fine"
# pads a decode step by at most 8 rows up to 64, 16 up to 128, 32 up to 256 and 64 above (vLLM
# captures decode batch sizes in steps of 8). A 1B decode step of 129-256 rows replays the 256-row
# graph at 4.14 ms where 65-128 rows took 2.86 ms for the same K/V read (H200, 5444c26,
# results/gpu_strategies/README.md): at that shape 256 rows of projections are compute-bound.
# "fine" is the default since 7c1288a: 1B decode at ~900 positions, H200, interleaved A/B
# (results/gpu/decode_bucket_ab_h200_067e8ca.json): graph replay 3-6 % faster at 96, 150 and 192 rows
# (pages of 16 and 1), the same at 128 and 256 (the same graph). Steps with prefill keep
# GRAPH_BATCH_SIZES (their keys multiply with each bucket)
DECODE_BUCKETS = {"pow2": GRAPH_BATCH_SIZES,
                  "fine": (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                           320, 384, 448, 512)}


# A decode graph copies its inputs from the pinned staging buffer itself: the copy is a node of the
# graph, so a step makes one host call (the replay) instead of two (a copy_, then the replay; on an
# H200 the step's host part was 37 us shorter at batch 1 and 57 us at batch 64). False: `_forward`
# copies before the replay (an A/B of experiments/step_host_profile.py); graphs captured before a
# change keep what they were captured with
GRAPH_COPIES_INPUTS = True
# ... and so does a graph of a step with prefill whose whole staging buffer, its page-table block
# [nt, bs, pages] included, is at most this many bytes (a copy of 256 KiB is a few µs, about what
# a launch costs the host): its table goes in the one copy as a decode graph's, not packed and then
# spread by a second copy on the device. A larger one (long tables, many requests) copies this many
# bytes itself, its tables' first columns among them, and spreads those into its wide table; only
# a step with wider tables packs the rest and copies it before the replay (two more stream
# operations and host calls, as the small graphs' copy removed in 985786e; radix's tables of one
# token a page are 16,384 columns wide at max_model_len 16,384). 0: every step with prefill packs
# (an A/B of experiments/mixed_parallel_ab.py, --page-size 1 for radix's tables)
PREFILL_COPY_IN_BYTES = 256 << 10
# `step` waits for the GPU by polling its end event, not in a blocking cudaEventSynchronize: after a
# blocking wait the host built the next batch about 3x slower (H200, 8B decode at batch 64, 4
# interleaved rounds: host part 304 against 87 us, step 85.1 against 87.3 % of the roofline; batch 1
# unchanged; results/gpu/step_host_profile_h200_*_spin_ab.json). False: the blocking wait (the A/B)
SPIN_WAIT = True


def token_bucket(tokens: int) -> int:
    """Token count a step with prefill is padded to for its graph: a multiple of 16 up to 256
    tokens; above, a multiple of 1/8 of the power of two below it (32 from 256, 64 from 512, ...,
    512 from 4096), so padding stays under 1/8 with 8 buckets per doubling."""
    if tokens <= 256:
        return -(-tokens // 16) * 16
    step = 1 << ((tokens - 1).bit_length() - 4)
    return -(-tokens // step) * step


def batch_bucket(n: int) -> int:
    """Rows a graph pads `n` requests to (the first of GRAPH_BATCH_SIZES >= n)."""
    return next(x for x in GRAPH_BATCH_SIZES if x >= n)


def context_pages(seq_len: int, page_size: int) -> int:
    """Page-table width of a graph whose longest request holds `seq_len` tokens: a power of two
    of pages, at least 16."""
    return 1 << max(4, (-(-int(seq_len) // page_size) - 1).bit_length())


GRAPH_WARMUP = ("all", "decode", "none")
# the cuBLAS API of projections of more than 16 rows (F.linear; torch.backends.cuda.preferred_blas_library):
# an 8B batch-64 decode step replays in 8.55 ms with cuBLASLt against 8.76 ms with torch's default
# (cuBLAS) on an H200 (docs/model.md); "default" leaves torch's choice
BLAS_LIBRARIES = ("cublaslt", "cublas", "default")


def graph_keys(mode: str, *, max_num_seqs: int, max_num_batched_tokens: int, graph_max_tokens: int,
               max_context: int, page_size: int, contiguous: bool,
               decode_sizes: tuple[int, ...] = GRAPH_BATCH_SIZES) -> list[tuple]:
    """The graph keys (token bucket, batch bucket, pages, contiguous, decode_only, decode rows) a
    replay within these limits can meet, largest first (captures then reuse the shared pool's
    blocks). Pure.

    - decode-only steps ("decode" and "all"): every batch bucket of `decode_sizes` up to
      max_num_seqs' x every context bucket (16, 32, ... pages) up to `max_context` tokens' (one
      request's longest context). These keep the context bucket: their page table is copied whole at each replay,
      and a decode step's host time is what the roofline goal is about.
    - steps with prefill ("all"): (prefill token bucket `token_bucket`, prefill-request bucket,
      decode-row bucket: 0 or a batch bucket), every combination a step can have: at most
      max_num_seqs requests, max_num_batched_tokens tokens and graph_max_tokens prefill tokens,
      each prefill chunk at least 2 tokens (a 1-token chunk goes with the decode rows); plus the
      steps whose rows are all one token but not all decodes (a prompt's last token alone). No
      context bucket: the page-table block is `context_pages(max_context)` wide and only the
      step's used rows x columns cross the bus (`_forward`); the kernels size their split-KV
      pieces by the actual lengths, so the wide table costs empty splits only.
    """
    if mode not in GRAPH_WARMUP:
        raise ValueError(f"graph_warmup={mode!r}: must be one of {', '.join(GRAPH_WARMUP)}")
    if mode == "none":
        return []
    seqs = min(max_num_seqs, GRAPH_BATCH_SIZES[-1])
    batch = GRAPH_BATCH_SIZES[:GRAPH_BATCH_SIZES.index(batch_bucket(seqs)) + 1]
    width = context_pages(max_context, page_size)
    top = next(x for x in decode_sizes if x >= seqs)
    keys = [(b, b, p, contiguous, True, b) for b in decode_sizes if b <= top
            for p in (1 << k for k in range(4, width.bit_length()))]
    if mode == "all":
        budget = min(max_num_batched_tokens, graph_max_tokens)  # prefill tokens a graph step can hold
        tokens = sorted({token_bucket(t) for t in range(2, budget + 1)})
        lower = dict(zip(tokens, [0, *tokens[:-1]]))  # a bucket holds (lower, bucket] tokens
        rows = dict(zip(batch, [0, *batch[:-1]]))
        for dp in (0, *batch):
            nd = rows[dp] + 1 if dp else 0  # fewest decode rows in this bucket
            if 0 < dp and nd <= seqs:  # one-token rows only, one of them a prompt's last token
                keys.append((dp, dp + 1, width, contiguous, False, dp))
            for pb in batch:
                npf = rows[pb] + 1  # fewest prefill chunks in this bucket
                for ts in tokens:
                    lo = max(lower[ts] + 1, 2 * npf)  # fewest prefill tokens
                    if nd + npf <= seqs and lo <= min(ts, max_num_batched_tokens - nd, graph_max_tokens):
                        keys.append((dp + ts, dp + pb, width, contiguous, False, dp))
    return sorted(set(keys), key=lambda k: (k[0], k[1], k[2], k[4]), reverse=True)


def _unowned(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor viewing `t`'s memory without owning it (vLLM's weak_ref_tensor, through the
    CUDA array interface): once `t` is dropped, a graph output's block goes back to the graph
    pool, and later captures reuse it. The view is valid until the next replay of any graph of
    the pool (each step reads its logits before the next). CPU tensors come back as they are."""
    if t.device.type != "cuda":
        return t
    code = {1: "|i1", 2: "<i2", 4: "<i4", 8: "<i8"}[t.element_size()]
    mem = SimpleNamespace(__cuda_array_interface__={
        "shape": tuple(t.shape), "typestr": code, "data": (t.data_ptr(), False), "version": 2,
        "strides": tuple(s * t.element_size() for s in t.stride())})
    return torch.as_tensor(mem, device=t.device).view(t.dtype)


@contextlib.contextmanager
def _no_cache_release():
    """`torch.cuda.graph` synchronizes, may collect garbage and empties the caching allocator at
    each capture: in a loop of captures that releases and re-mallocs every capture's eager
    blocks, and in a replay it gives back the blocks the eager steps keep. vLLM's capture loop
    turns both off after its first graph; `_capture` turns them off for every graph."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("gc.collect", lambda *a: 0))
        stack.enter_context(mock.patch("torch.cuda.empty_cache", lambda: None))
        if hasattr(torch._C, "_host_emptyCache"):  # (newer torch also empties the pinned host cache)
            stack.enter_context(mock.patch("torch._C._host_emptyCache", lambda: None))
        yield


def _pool_bytes(pool) -> int | None:
    """Bytes of the caching allocator's segments in graph pool `pool` (memory snapshot), or None
    when this torch's snapshot does not name pools."""
    try:
        want = tuple(pool)
        segs = torch.cuda.memory._snapshot()["segments"]
        return int(sum(x["total_size"] for x in segs if tuple(x.get("segment_pool_id", ())) == want))
    except Exception:  # noqa: BLE001 (a measurement only)
        return None


def weight_bytes(cfg: ModelConfig) -> int:
    """Parameter bytes of the model `cfg` describes, without building it."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    bias = (cfg.num_heads + 2 * cfg.num_kv_heads) * d * cfg.attention_bias + h * cfg.attention_out_bias
    layer = qkv + cfg.num_heads * d * h + 3 * h * i + 2 * h + bias
    embed = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
    return (cfg.num_layers * layer + embed + h) * dtype_bytes(cfg.dtype)


def _gb(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


class GPUEngine(TorchEngine):
    """TorchEngine on CUDA + Triton, with the pool sized from GPU memory.

    Args (beyond TorchEngine's):
        gpu_memory_utilization: share of total GPU memory for weights + activations + pool.
        kv_cache_gb: explicit pool size in GiB (overrides gpu_memory_utilization for the pool).
        profile_tokens: tokens in the profiling forward; >= the scheduler's tokens per step.
        max_model_len: if set, the pool must hold at least this many tokens (one request).
        warmup: before the replay, run the mixed-batch shapes the Triton kernels specialize on
            (batch-size buckets, page size, contiguous or not), so that no step is timed with a
            just-in-time compile in it (each costs about a second, seen on an H200).
        blas: the cuBLAS API for projections of more than 16 rows, set for the process
            (`BLAS_LIBRARIES`): "cublaslt" (default: its heuristics pick faster kernels for a
            decode batch's skinny GEMMs), "cublas" (torch's own default), "default" (unchanged).
        graph_warmup: with cuda_graphs, which graphs `bind` captures before the replay
            (`graph_keys`): "all" (every key a step within the limits can meet), "decode"
            (decode-only steps), "none" (each on first use, as before). A key the warm-up missed
            is still captured on first use and counted (`cuda_graph_captures_in_replay`).
        max_num_seqs, max_num_batched_tokens: the scheduler's limits, which bound the warm-up's
            keys (default: 512 requests, `profile_tokens` tokens).
        decode_buckets: the batch buckets of decode-only graphs (`DECODE_BUCKETS`): "fine" (at
            most 8-64 rows of padding; the default) or "pow2" (powers of two, as every graph).
    """

    _staged: tuple | None = None  # (graph key, batch size) of the last decode fill of the staging buffer
    short_fills = 0  # decode steps whose staging fill wrote only their rows' values (`_forward`)
    packed_fills = 0  # steps with prefill whose tables were wider than their graph's head copy holds
    _tokens_host: torch.Tensor | None = None  # pinned: the sampled tokens' copy (`_host_list`)
    _tokens_ready: torch.cuda.Event | None = None  # recorded after that copy

    name = "gpu"
    binds_strategy = True  # kvbench.run passes every strategy to bind (slab's contiguous layout)
    # (class defaults: the CPU tests' stand-in builds the engine without __init__)
    graph_warmup = "none"
    decode_sizes = GRAPH_BATCH_SIZES
    blas = "default"
    max_model_len = None
    graph_captures_in_replay = 0
    graph_warmup_captures = 0
    graph_warmup_s = 0.0
    graph_pool_bytes = 0
    graph_mem_measured = None
    graph_profile = None
    _prefill_pages = 0
    _stage = None
    _side = None

    def __init__(self, model, attention: str = "triton", seed: int = 0, sample: bool = False,
                 device: str = "cuda", keep_logits: bool = False, cuda_graphs: bool = False,
                 gpu_memory_utilization: float = 0.9, kv_cache_gb: float | None = None,
                 profile_tokens: int = 8192, max_model_len: int | None = None, warmup: bool = True,
                 graph_max_tokens: int = 8192, graph_warmup: str = "none", max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, blas: str = "cublaslt", decode_buckets: str = "fine"):
        if blas not in BLAS_LIBRARIES:
            raise ValueError(f"blas={blas!r}: must be one of {', '.join(BLAS_LIBRARIES)}")
        if decode_buckets not in DECODE_BUCKETS:
            raise ValueError(f"decode_buckets={decode_buckets!r}: must be one of {', '.join(DECODE_BUCKETS)}")
        if not torch.cuda.is_available():
            raise ValueError("engine 'gpu' needs CUDA, and torch sees no GPU; use engine=torch")
        if blas != "default":
            torch.backends.cuda.preferred_blas_library(blas)
        self.blas = blas
        cfg = as_model_config(model if isinstance(model, ModelConfig) else _plain(model))
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        # A sweep's jobs share the process: an earlier run's engine may still sit in reference
        # cycles, and its freed blocks in the caching allocator. Collect and release both before
        # sizing: reserved blocks count as free below, but a graph capture cannot release them (a
        # release mid-capture invalidates it: radix-1 Mooncake after two paged runs, c438584).
        gc.collect()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        self.total_mem = torch.cuda.get_device_properties(dev).total_memory
        self.utilization, self.kv_cache_gb = gpu_memory_utilization, kv_cache_gb
        self.max_model_len = max_model_len
        limit, need = self.total_mem * gpu_memory_utilization, weight_bytes(cfg)
        if need > limit:
            raise ValueError(f"model '{cfg.name}' weights need {_gb(need)}, but "
                               f"gpu_memory_utilization={gpu_memory_utilization} of "
                               f"{_gb(self.total_mem)} allows {_gb(limit)}")
        super().__init__(cfg, attention, seed, sample, dev, keep_logits)
        self.cuda_graphs = cuda_graphs
        self.graph_max_tokens = graph_max_tokens
        self.warmup, self.warmup_s = warmup, 0.0
        self._graphs: dict[tuple[int, int, int, bool, bool, int], SimpleNamespace] = {}
        self._graph_pool = None
        self.graph_capture_s = 0.0
        if graph_warmup not in GRAPH_WARMUP:
            raise ValueError(f"graph_warmup={graph_warmup!r}: must be one of {', '.join(GRAPH_WARMUP)}")
        self.graph_warmup = graph_warmup
        self.decode_sizes = DECODE_BUCKETS[decode_buckets]
        self.max_num_seqs = max_num_seqs or GRAPH_BATCH_SIZES[-1]
        self.max_num_batched_tokens = max_num_batched_tokens or profile_tokens
        self.profile_tokens = profile_tokens
        self.activation_peak = self._profile(profile_tokens)
        # what the graphs will hold, measured now (before the pool is sized) on a scratch pool
        self.graph_pool_bytes = self._profile_graphs() if cuda_graphs and graph_warmup != "none" else 0
        torch.cuda.reset_peak_memory_stats(dev)

    # ---- sizing ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _profile(self, tokens: int) -> int:
        """Peak bytes above the weights of one forward of `tokens` tokens (min(256, T) requests)."""
        c, ps = self.cfg, 16
        b = max(1, min(256, tokens))
        lens = np.full(b, tokens // b, np.int64)
        lens[: tokens % b] += 1
        pages = -(-lens // ps)
        table = np.zeros((b, int(pages.max())), np.int32)
        first = np.concatenate([[0], np.cumsum(pages)[:-1]])
        for i in range(b):
            table[i, :pages[i]] = first[i] + np.arange(pages[i])
        pos = np.concatenate([np.arange(n) for n in lens])
        slots = np.concatenate([first[i] * ps + np.arange(lens[i]) for i in range(b)])
        qsl = np.concatenate([[0], np.cumsum(lens)])
        h = HostBatch(np.zeros(tokens, np.int64), pos, slots, table, qsl, lens, qsl[1:] - 1, ps,
                      True, tokens == b)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        pool = torch.zeros(c.num_layers, 2, int(pages.sum()) * ps, c.num_kv_heads, c.head_dim,
                           dtype=DTYPES[c.dtype], device=self.device)
        pool_bytes = pool.numel() * pool.element_size()
        ids, positions, meta = h.to_device(self.device)
        self.model(ids, positions, meta, pool)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base - pool_bytes
        del pool, ids, positions, meta
        torch.cuda.empty_cache()
        return int(peak)

    def _warm_keys(self, page_size: int, max_context: int, contiguous: bool) -> list[tuple]:
        return graph_keys(self.graph_warmup, max_num_seqs=self.max_num_seqs,
                          max_num_batched_tokens=self.max_num_batched_tokens, graph_max_tokens=self.graph_max_tokens,
                          max_context=max_context, page_size=page_size, contiguous=contiguous,
                          decode_sizes=self.decode_sizes)

    @torch.inference_mode()
    def _profile_graphs(self) -> int:
        """Bytes of GPU memory the warm-up's graphs will take, measured as vLLM V1's
        `profile_cudagraph_memory` does (free memory before and after capturing the largest
        graphs on a scratch KV pool, then a per-graph cost times the rest), then released:
          - the shared graph pool: the largest step with prefill (most tokens, most rows) and
            the largest decode step (most rows, widest table), captured first into a fresh pool;
            every later graph reuses its blocks (outputs are unowned, `_unowned`), so the pool
            holds about one largest graph's activations;
          - each graph's own cost (its executable, plans' buffers, what its activations add to
            the pool): 8 small decode graphs more, their mean times the other decode keys
            `graph_keys` gives (page size 1: the most keys), and (`graph_warmup=all`) 8 graphs
            with prefill spread over their keys, their mean times the other keys with prefill
            (their kernels and activation sizes are not a decode step's: on the H200 the warm-up
            of 1,659 mostly prefill graphs measured 4.3 GB in a process's first engine where the
            decode probes set 2.5 GB aside; with these probes 6.4 GB, and in the process's second
            engine, which measured 0.8 GB, the floor; docs/model.md);
          - the staging buffers (`_graph_inputs`) for those keys, computed.
        Each probe first runs once eagerly on the capture stream, so the caching allocator's
        blocks for its activations (counted in the activation peak) are not counted again."""
        ps, ctx = 16, self.max_model_len or 1 << 17
        warm = self._warm_keys(1, ctx, False)  # (page size 1: the most context buckets)
        n_keys, n_prefill = len(warm), sum(not k[4] for k in warm)
        widest = graph_keys("all", max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                            graph_max_tokens=self.graph_max_tokens, max_context=ctx, page_size=ps, contiguous=False,
                            decode_sizes=self.decode_sizes)
        prefill = [k for k in widest if not k[4]]  # (largest first)
        big = prefill[:1]  # the most prefill tokens (then rows): every mode may meet it
        big += [max((k for k in widest if k[4]), key=lambda k: (k[1], k[2]))]  # the most rows, the widest table
        small = [k for k in ((b, b, p, False, True, b) for b in (1, 2, 4, 8) for p in (16, 32)) if k not in big]
        rest = prefill[1:] if n_prefill > 1 else []
        small_prefill = list(dict.fromkeys(rest[i * len(rest) // 8] for i in range(8))) if rest else []
        c = self.cfg
        self.page_size = ps
        self.kv_pool = torch.zeros(c.num_layers, 2, 2 * ps, c.num_kv_heads, c.head_dim, dtype=DTYPES[c.dtype],
                                   device=self.device)  # (slots -1, lengths 0: nothing is read or written)
        self._stage = self._staging(big + small + small_prefill)
        try:
            side = self._capture_stream()
            with torch.cuda.stream(side):  # compile, and let the allocator cache the eager blocks
                for key in big + small + small_prefill:
                    self._graph_body(self._graph_inputs(key, ps))
            torch.cuda.synchronize()
            free = [torch.cuda.mem_get_info(self.device)[0]]
            for group in (big, small, small_prefill):
                for key in group:
                    self._capture(key, ps)
                torch.cuda.synchronize()
                free.append(torch.cuda.mem_get_info(self.device)[0])
        finally:
            for g in self._graphs.values():
                g.graph.reset()
            self._graphs.clear()
            self._graph_pool, self._stage, self.kv_pool, self.page_size = None, None, None, 0
            self.graph_capture_s = 0.0
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        # at least 1 MiB a graph, vLLM's floor (H200, 6b77b47: the decode probes gave 512 KiB a
        # graph, 324 warm-up graphs of a 1B run took 241 MB against an estimate of 200 MB without it)
        per_graph = max(max(free[1] - free[2], 0) / len(small), PER_GRAPH_FLOOR)
        per_prefill = max(max(free[2] - free[3], 0) / len(small_prefill), PER_GRAPH_FLOOR) if small_prefill else 0
        staging = self._staging_bytes(warm + big)
        n_decode = n_keys - n_prefill
        self.graph_profile = {"pool_and_largest_bytes": int(free[0] - free[1]), "per_graph_bytes": int(per_graph),
                              "per_prefill_graph_bytes": int(per_prefill), "keys": n_keys,
                              "prefill_keys": n_prefill, "staging_bytes": int(staging)}
        return int(max(free[0] - free[1], 0) + per_graph * max(n_decode - 1, 0)
                   + per_prefill * max(n_prefill - 1, 0) + staging)

    def kv_budget_bytes(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        return int(total * self.utilization - self.model.weight_bytes() - self.activation_peak
                   - self.graph_pool_bytes - outside_torch)

    def kv_capacity_tokens(self, requested: int | None) -> int:
        bpt, budget = kv_bytes_per_token(self.cfg), self.kv_budget_bytes()
        sizes = (f"GPU {_gb(self.total_mem)} x utilization {self.utilization}; weights "
                 f"{_gb(self.model.weight_bytes())}, activation peak {_gb(self.activation_peak)}, "
                 f"CUDA graphs {_gb(self.graph_pool_bytes)} (graph_warmup={self.graph_warmup}) "
                 f"-> KV budget {_gb(budget)} at {bpt} B/token")
        if requested is not None:
            tokens, why = int(requested), f"kv_capacity_tokens={requested}"
        elif self.kv_cache_gb is not None:
            tokens, why = tokens_in_gib(self.kv_cache_gb, bpt), f"kv_cache_gb={self.kv_cache_gb}"
        else:
            tokens, why = max(budget, 0) // bpt, "gpu_memory_utilization"
        if requested is not None or self.kv_cache_gb is not None:
            free = torch.cuda.mem_get_info(self.device)[0] - self.graph_pool_bytes  # (the graphs come after the pool)
            if tokens * bpt > free:
                raise ValueError(f"{why} asks for {_gb(tokens * bpt)} of KV pool, but only "
                                   f"{_gb(free)} of GPU memory is free beside the CUDA graphs ({sizes})")
        need = self.max_model_len or 1
        if tokens < need:
            raise ValueError(f"KV pool of {tokens} tokens (from {why}) cannot hold one request "
                             f"of {need} tokens; {sizes}")
        return tokens

    def bind(self, page_size: int, num_pages: int, strategy=None) -> None:
        try:
            super().bind(page_size, num_pages, strategy)
        except torch.cuda.OutOfMemoryError as e:
            need = num_pages * page_size * kv_bytes_per_token(self.cfg)
            raise ValueError(f"KV pool of {num_pages} pages x {page_size} tokens = {_gb(need)} "
                             f"does not fit: {_gb(torch.cuda.mem_get_info()[0])} free") from e
        hybrid = self.hybrid
        pool_tokens = (num_pages if hybrid is None else hybrid.min_pages) * page_size
        max_context = min(self.max_model_len or pool_tokens, pool_tokens)
        self._prefill_pages = context_pages(max_context, page_size)  # steps with prefill: this wide a table
        if self.warmup:
            self._warm_up(page_size, num_pages)
        if self.cuda_graphs and self.graph_warmup != "none":
            contiguous = bool(getattr(strategy, "contiguous", False)) and hybrid is None
            self._warm_up_graphs(self._warm_keys(page_size, max_context, contiguous), page_size)

    @torch.inference_mode()
    def _warm_up_graphs(self, keys: list[tuple], page_size: int) -> None:
        """Capture the graphs of `keys` (largest first) before the replay, each launched once on
        its capture inputs (`_capture`'s launch: the upload of a graph's first launch stays out of
        the replay's steps; docs/model.md, "graph_warmup"); the GPU memory they
        took is `graph_mem_measured` (free memory before and after: pool, executables, staging),
        to hold against the sizing's `graph_pool_bytes`."""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            free0, reserved0 = torch.cuda.mem_get_info(self.device)[0], torch.cuda.memory_reserved(self.device)
        self._stage = self._staging([*keys, *(g.key for g in self._graphs.values())])
        for key in keys:
            if key not in self._graphs:
                self._capture(key, page_size, launch=True)
        self.graph_warmup_captures = len(self._graphs)
        if cuda:
            torch.cuda.synchronize(self.device)
            free1, reserved1 = torch.cuda.mem_get_info(self.device)[0], torch.cuda.memory_reserved(self.device)
            pool = _pool_bytes(self._graph_pool) if self._graphs else 0
            staging = sum(st.dev.numel() + 4 * st.table.numel() for st in (self._stage or {}).values())  # (GPU bytes)
            outside = (free0 - free1) - (reserved1 - reserved0)  # executables, modules: outside torch
            self.graph_mem_measured = None if pool is None else int(pool + staging + outside)
        self.graph_warmup_s = time.perf_counter() - t0

    @torch.inference_mode()
    def _warm_up(self, page_size: int, num_pages: int) -> None:
        """Compile the kernel variants a replay will meet: mixed batches of B requests (B around
        every power of two up to 512, divisible by 16 and not), decodes over contexts of 64
        tokens to the longest request (every split-KV count class), and prefill / extend chunks
        (both launch configs, every prefix-split class, many requests at once), slab and paged
        layouts. Without the last, a replay's first prefill steps compiled inside timed steps
        (H200, f30b769: 14 s over the first six steps of a paged run).
        Writes garbage into pool pages that the replay has not used yet (a hybrid design: the same
        page ids in every table, so within its smallest space)."""
        from kvbench.kernels.extend_attention import EXTEND_SHORT_TOKENS, EXTEND_SHORT_TOTAL

        t0 = time.perf_counter()
        hybrid = getattr(self, "hybrid", None)
        pages = num_pages if hybrid is None else hybrid.min_pages
        sizes = sorted({b for p in range(10) for b in (1 << p, (1 << p) + 1) if 2 * b <= pages})
        for contiguous in (False,) if hybrid is not None else (False, True):  # (hybrid designs page)
            for b in sizes:
                lens = np.ones(b, np.int64)
                lens[-1] = 2  # one 2-token prefill after 1-token rows: the decode and extend paths
                table = np.arange(2 * b, dtype=np.int32).reshape(b, 2)  # request i: pages 2i, 2i+1
                pos = np.concatenate([np.arange(n) for n in lens])
                rows = np.repeat(np.arange(b), lens)
                slots = table[rows, pos // page_size].astype(np.int64) * page_size + pos % page_size
                qsl = np.concatenate([[0], np.cumsum(lens)])
                h = HostBatch(np.zeros(len(pos), np.int64), pos, slots, table, qsl, lens, qsl[1:] - 1,
                              page_size, contiguous, False, b - 1)
                ids, positions, meta = self._as_layout(h).to_device(self.device)
                self.model(ids, positions, meta, self._kv())
            longest = min(getattr(self, "max_model_len", None) or 1 << 17, pages * page_size)
            for n in (64 << k for k in range(12) if 64 << k <= longest):   # reads page 0, writes nothing
                one = np.ones(1, np.int64)
                h = HostBatch(np.zeros(1, np.int64), one * (n - 1), -one, np.zeros((1, -(-n // page_size)), np.int32),
                              np.array([0, 1]), one * n, np.zeros(1, np.int64), page_size, contiguous, True)
                ids, positions, meta = self._as_layout(h).to_device(self.device)
                self.model(ids, positions, meta, self._kv())
            # prefill and extend: chunks of a few new tokens and of more than the short-chunk bounds
            # (the two launch configs, `short_chunks`), over no prefix and over cached prefixes of
            # 256 … 8k tokens (every prefix-split class, so every merge width), and many short
            # extends at once (the request-count buckets); reads page 0, writes nothing
            for n_new, b, prefixes in ((2, 1, (0, *(256 << k for k in range(6)))),
                                       (max(EXTEND_SHORT_TOKENS, *EXTEND_SHORT_TOTAL.values()) + 1, 1,
                                        (0, *(256 << k for k in range(6)))),
                                       *((2, (64 << k) + 1, (0,)) for k in range(3))):
                for prefix in prefixes:
                    if prefix + n_new > longest:
                        continue
                    lens = np.full(b, n_new, np.int64)
                    qsl = np.concatenate([[0], np.cumsum(lens)])
                    h = HostBatch(np.zeros(b * n_new, np.int64), np.tile(np.arange(prefix, prefix + n_new), b),
                                  -np.ones(b * n_new, np.int64),
                                  np.zeros((b, -(-(prefix + n_new) // page_size)), np.int32), qsl,
                                  lens + prefix, qsl[1:] - 1, page_size, contiguous, False)
                    ids, positions, meta = self._as_layout(h).to_device(self.device)
                    self.model(ids, positions, meta, self._kv())
        # one eager prefill as long as the profiled step (at most the longest context): `_profile`
        # gave its activation blocks back (empty_cache), and without this the replay's first long
        # prefills paid the caching allocator's cudaMallocs (H200, bd032ee: a run's first four
        # ~1,100-token prefills took 26 ms, the same steps 15 ms in the next run); reads page 0
        n = min(getattr(self, "profile_tokens", 0), longest)
        if n > 0:
            h = HostBatch(np.zeros(n, np.int64), np.arange(n), -np.ones(n, np.int64),
                          np.zeros((1, -(-n // page_size)), np.int32), np.array([0, n]), np.array([n]),
                          np.array([n - 1]), page_size, False, False)
            ids, positions, meta = self._as_layout(h).to_device(self.device)
            self.model(ids, positions, meta, self._kv())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.warmup_s = time.perf_counter() - t0

    # ---- steps ----------------------------------------------------------------------------
    def step(self, batch) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        capture0, read0 = self.graph_capture_s, self._table_read_s()
        start.record()
        self._run(batch)
        end.record()
        if SPIN_WAIT:  # (the host polls the step's end: its thread stays on a core, warm, for the next step)
            while not end.query():
                pass
        else:
            end.synchronize()
        # (less a hybrid design's strategy.table() calls: torch_engine.TorchEngine.step says why)
        return start.elapsed_time(end) / 1e3 - (self.graph_capture_s - capture0) - (self._table_read_s() - read0)

    def _host_list(self, t: torch.Tensor) -> list:
        """`t.tolist()` of a small int64 GPU tensor (the sampled tokens), the wait polled as in `step`:
        a blocking copy would leave the host cold for the step's emit and the next step's batch."""
        if not SPIN_WAIT or t.device.type != "cuda":
            return t.tolist()
        n = t.numel()
        if self._tokens_host is None or self._tokens_host.numel() < n:
            self._tokens_host = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
            self._tokens_ready = torch.cuda.Event()
        host = self._tokens_host[:n]
        host.copy_(t.reshape(-1), non_blocking=True)
        self._tokens_ready.record()
        while not self._tokens_ready.query():
            pass
        return host.view(t.shape).tolist()

    def _forward(self, h: HostBatch) -> torch.Tensor:
        b, t = len(h.seq_lens), len(h.ids)
        nd = b if h.decode_only else h.num_decode
        if not (self.cuda_graphs and b <= GRAPH_BATCH_SIZES[-1] and (h.decode_only or t - nd <= self.graph_max_tokens)):
            return super()._forward(h)
        # graph layout: [nd decode rows | padding to dp] [prefill requests' tokens | padding];
        # requests: nd decodes, dp - nd dummies of one token, b - nd prefills, dummies of none
        if h.decode_only:
            dp = bs = next(x for x in self.decode_sizes if x >= b)
            ts = bs
        else:
            dp = next(x for x in (0, *GRAPH_BATCH_SIZES) if x >= nd)
            bs = dp + next(x for x in GRAPH_BATCH_SIZES if x >= b - nd)
            ts = dp + token_bucket(t - nd)
        pages = context_pages(int(h.seq_lens.max()), h.page_size)
        if not h.decode_only:  # steps with prefill: one table width (`graph_keys`)
            pages = max(pages, self._prefill_pages)
        key = (ts, bs, pages, h.contiguous, h.decode_only, dp)
        g = self._graphs.get(key)
        if g is None:  # not warmed up: captured now (its time is taken out of the step's)
            self.graph_captures_in_replay += 1
            g = self._capture(key, h.page_size, launch=True)
        w = min(h.page_table.shape[-1], pages)  # (pages past the longest request's length are never read)
        tables = h.page_table.reshape(-1, b, h.page_table.shape[-1])[..., :w]  # [num_tables, B, w]
        if h.decode_only and self._staged == (key, b) and torch_engine.FAST_DECODE_HOST:
            # the same graph and batch size as the last fill of the staging buffer (a steady decode):
            # its padding, query starts and logits rows are in place; only the rows' values change
            g.h64[0, :b], g.h64[1, :b], g.h64[2:, :b] = h.ids, h.positions, h.slot_mapping.reshape(-1, b)
            g.h32_lens[:b] = h.seq_lens
            g.h32_table[:, :b, :w] = tables
            if not g.copy_in:
                g.dev[:g.head].copy_(g.host[:g.head], non_blocking=True)
            self.short_fills += 1
            g.graph.replay()
            return g.logits[:b].clone() if self.keep_logits else g.logits[:b]
        # the step's inputs: written into the graph's pinned staging buffer, then one copy;
        # padded tokens write nowhere (slot -1), padded requests attend to nothing (seq_len 0)
        # (a hybrid design: one slot row and one page-table block per table; uniform: one)
        if h.decode_only:  # (the decode graphs share a staging buffer; steps with prefill have their own)
            self._staged = (key, b)
        shift, e, tp = dp - nd, len(h.logits_idx), t - nd
        for r, col in enumerate((h.ids, h.positions, *h.slot_mapping.reshape(-1, t))):
            g.h64[r, :nd], g.h64[r, dp:dp + tp] = col[:nd], col[nd:]
        g.h64[:2, nd:dp], g.h64[:2, dp + tp:] = 0, 0
        g.h64[2:, nd:dp], g.h64[2:, dp + tp:] = -1, -1
        g.h64_idx[:e] = h.logits_idx + np.where(h.logits_idx >= nd, shift, 0)
        g.h64_idx[e:] = 0
        qsl = g.h32_qsl
        qsl[:dp + 1] = np.arange(dp + 1)                      # decodes and their dummies: one token each
        qsl[dp + 1:dp + b - nd + 1] = h.query_start_loc[nd + 1:] + shift
        qsl[dp + b - nd + 1:] = dp + tp
        g.h32_lens[:nd], g.h32_lens[nd:dp] = h.seq_lens[:nd], 0
        g.h32_lens[dp:dp + b - nd], g.h32_lens[dp + b - nd:] = h.seq_lens[nd:], 0
        # (entries past a request's length are never read; the buffer is rewritten only after
        # `step` has synchronized, so the copy is done by then)
        # the table block: [nt, bs, pages] (decode, small prefill), or a wide table's first g.wb
        # columns, part of the head copy; a wide table's columns past g.wb: the used rows x columns,
        # packed, copied and spread into the wide table before the replay
        c = min(w, g.wb)
        g.h32_table[:, :nd, :c], g.h32_table[:, dp:dp + b - nd, :c] = tables[:, :nd, :c], tables[:, nd:, :c]
        if w > c:
            rows = dp + b - nd
            packed = g.h32_over[:g.nt * rows * (w - c)].reshape(g.nt, rows, w - c)
            packed[:, :nd], packed[:, dp:] = tables[:, :nd, c:], tables[:, nd:, c:]
            g.dev[g.head:g.head + 4 * packed.size].copy_(g.host[g.head:g.head + 4 * packed.size], non_blocking=True)
            g.table[:, :rows, c:w].copy_(g.over[:packed.size].view(g.nt, rows, w - c))
            self.packed_fills += 1
        if not g.copy_in:
            g.dev[:g.head].copy_(g.host[:g.head], non_blocking=True)
        g.graph.replay()
        return g.logits[:e].clone() if self.keep_logits else g.logits[:e]  # [B_emit, vocab]

    def _capture_stream(self) -> torch.cuda.Stream:
        """The one side stream every capture runs on (the caching allocator keeps blocks per
        stream: one stream lets each capture's eager run reuse the last one's)."""
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _capture(self, key: tuple[int, int, int, bool, bool, int], page_size: int, launch: bool = False) -> SimpleNamespace:
        """Capture the graph of `key`; with `launch`, also launch it once on its capture inputs
        (no request, slots -1: it writes nothing). A graph's first launch also uploads it, 0.3-0.7
        ms more than later ones for the 1B shape on the H200 (5444c26, first uses of graphs
        captured in the replay): with `launch` that cost is in the capture's time, which `step`
        takes out, not in the step that first replays it."""
        t0 = time.perf_counter()
        g = self._graph_inputs(key, page_size)
        side = self._capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels; writes nothing (slot -1)
            self._graph_body(g)
        torch.cuda.current_stream().wait_stream(side)
        self._graph_pool = self._graph_pool or torch.cuda.graph_pool_handle()
        if self.device.type == "cuda":
            side_stream(self.device)  # (made outside the capture: the model forks mixed steps onto it)
        g.graph = torch.cuda.CUDAGraph()
        # (not emptying the caching allocator: a capture inside the replay left the next eager
        # steps to cudaMalloc their blocks again, the cost 94a3240's warm-up prefill removed)
        with _no_cache_release(), torch.cuda.graph(g.graph, pool=self._graph_pool, stream=side):
            self._graph_body(g)
        g.logits = _unowned(g.logits)  # (its block goes back to the pool: the next capture reuses it)
        self._graphs[key] = g
        if launch:
            g.graph.replay()
            torch.cuda.current_stream().synchronize()
        self.graph_capture_s += time.perf_counter() - t0
        return g

    @staticmethod
    def _staging_size(key: tuple, nt: int = 1) -> tuple[int, int]:
        """(staging bytes, wide-table int32 entries) of a graph of shape `key` with `nt` page tables
        (`_graph_inputs`' layout). Pure."""
        ts, bs, pages, _, decode_only, _ = key
        nbytes = 8 * ((2 + nt) * ts + bs) + 4 * ((bs + 1) + bs + nt * bs * pages)
        return nbytes, 0 if decode_only or nbytes <= PREFILL_COPY_IN_BYTES else nt * bs * pages

    def _staging_sizes(self, keys: list[tuple], nt: int = 1) -> dict[bool, tuple[int, int]]:
        """Per kind of graph among `keys` (decode-only: True, with prefill: False), the largest
        staging bytes and wide-table entries of its keys (`_staging_size`). Pure."""
        out: dict[bool, tuple[int, int]] = {}
        for k in keys:
            nbytes, table = self._staging_size(k, nt)
            b, t = out.get(k[4], (0, 0))
            out[k[4]] = (max(b, nbytes), max(t, table))
        return out

    def _staging_bytes(self, keys: list[tuple], nt: int = 1) -> int:
        """GPU bytes of the staging buffers for `keys` (`_staging`). Pure."""
        return sum(nbytes + 4 * table for nbytes, table in self._staging_sizes(keys, nt).values())

    def _staging(self, keys: list[tuple]) -> dict[bool, SimpleNamespace] | None:
        """Per kind of graph (decode-only: True, with prefill: False), one staging buffer (pinned
        host, its device copy) and one wide page table for every graph of `keys` of that kind: a
        step fills only its own graph's part before its replay, and steps run one at a time, so
        graphs can share them (a key that needs more makes a larger one, `_graph_inputs`). Two kinds, so a step with
        prefill leaves the decode graphs' buffer as the last decode step filled it, and the decode
        step after it keeps the short fill (`_forward`; it had cost that step 16 µs more of host time,
        experiments/step_switch.py --host-only). None when `keys` is empty."""
        if not keys:
            return None
        nt = 1 if self.hybrid is None else len(self.hybrid.tables)
        out = {}
        for decode_only, (nbytes, table) in self._staging_sizes(keys, nt).items():
            host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            out[decode_only] = SimpleNamespace(host=host, dev=host.to(self.device), table=torch.zeros(
                max(table, 1), dtype=torch.int32, device=self.device))
        return out

    def _graph_inputs(self, key: tuple[int, int, int, bool, bool, int], page_size: int) -> SimpleNamespace:
        """The static inputs of a graph of shape `key`: one (pinned on CUDA) host staging buffer,
        its device copy, and the AttnMetadata (per page table too, for a hybrid design) viewing
        that copy; `_forward` fills the staging buffer at each replay. A step with prefill whose
        staging buffer is over `PREFILL_COPY_IN_BYTES` reads its page tables from a separate wide
        block [nt, bs, pages]: the graph fills its first `wb` columns from the head of the staging
        buffer (the part it copies), `_forward` the rest, where used, from packed rows after it.
        Both are parts of the shared `_staging` buffers of its kind when they fit. No CUDA call but
        the copies (the CPU tests run this with an eager stand-in for the graph)."""
        ts, bs, pages, contiguous, decode_only, dp = key
        if decode_only:
            self._staged = None  # (the decode graphs' staging buffer is rewritten below)
        hybrid = self.hybrid
        nt = 1 if hybrid is None else len(hybrid.tables)  # page tables (a hybrid design: one per TableSpec)
        # inputs: one pinned host buffer and its device copy; the graph reads views of the latter
        # (int64: ids, positions, nt slot rows [ts] and logits rows [bs]; int32: query_start_loc
        # [bs+1], seq_lens [bs], nt page tables [bs, pages] (decode) or their packed rows (prefill))
        n64 = (2 + nt) * ts + bs
        nbytes, wide = self._staging_size(key, nt)
        fixed = 8 * n64 + 4 * (2 * bs + 1)
        # a wide table's first `wb` columns go in the graph's own copy (the head of the staging
        # buffer, at most PREFILL_COPY_IN_BYTES with the fixed part) and are spread by the graph;
        # the rest (a step with a longer context) is packed and copied before the replay
        wb = pages if not wide else min(pages, max(0, PREFILL_COPY_IN_BYTES - fixed) // (4 * nt * bs))
        st = (self._stage or {}).get(decode_only)
        if st is None or st.host.numel() < nbytes or st.table.numel() < wide:
            # a larger one, shared by this kind's later graphs (earlier ones keep their views of the old)
            size, width = (nbytes, wide) if st is None else (max(nbytes, st.host.numel()), max(wide, st.table.numel()))
            st = SimpleNamespace(host=torch.zeros(size, dtype=torch.uint8, pin_memory=self.device.type == "cuda"),
                                 table=torch.zeros(max(width, 1), dtype=torch.int32, device=self.device))
            st.dev = st.host.to(self.device)
            self._stage = {**(self._stage or {}), decode_only: st}
        g = SimpleNamespace(host=st.host[:nbytes], dev=st.dev[:nbytes], key=key, nt=nt, wb=wb,
                            head=fixed + 4 * nt * bs * wb)
        g.host.zero_()
        v64, v32 = g.host.numpy()[:8 * n64].view(np.int64), g.host.numpy()[8 * n64:].view(np.int32)
        g.h64, g.h64_idx = v64[:(2 + nt) * ts].reshape(2 + nt, ts), v64[(2 + nt) * ts:]
        t0, t1 = 2 * bs + 1, 2 * bs + 1 + nt * bs * wb  # the int32 part: [t0, t1) table block, then the overflow
        g.h32_qsl, g.h32_lens = v32[:bs + 1], v32[bs + 1:t0]
        g.h32_table, g.h32_over = v32[t0:t1].reshape(nt, bs, wb), v32[t1:]
        g.h64[2:] = -1
        g.dev.copy_(g.host)  # (blocking: the shared host buffer is rewritten by the next key's inputs)
        d64, d32 = g.dev[:8 * n64].view(torch.int64), g.dev[8 * n64:].view(torch.int32)
        g.ids, g.positions = d64[:ts], d64[ts:2 * ts]
        slots = d64[2 * ts:(2 + nt) * ts].view(nt, ts)
        block, g.over = d32[t0:t1].view(nt, bs, wb), d32[t1:]
        whole = decode_only or not wide  # the table block in the staging buffer (`PREFILL_COPY_IN_BYTES`)
        g.table = None if whole else st.table[:wide].view(nt, bs, pages)
        g.block = None if whole or not wb else block
        tables = block if whole else g.table
        g.qsl, g.dp = d32[:bs + 1], dp
        g.split = 0 < dp and not decode_only
        g.copy_in = GRAPH_COPIES_INPUTS
        g.meta = AttnMetadata(slots[0], tables[0], g.qsl,
                              d32[bs + 1:2 * bs + 1], d64[(2 + nt) * ts:], page_size, contiguous, decode_only,
                              pages * page_size, dp if g.split else 0, None)
        if hybrid is not None:
            with_tables(g.meta, slots, tables, hybrid.layer_table)
        return g

    def _graph_body(self, g: SimpleNamespace) -> None:
        """What a graph runs: the copy of its staging buffer's head to the device (a graph with a
        wide table: and the spread of its first columns into it); (a split step) the prefill part's
        query_start_loc, recomputed from the input at each replay, into every table's metadata; the
        model, into g.logits [bs, vocab]."""
        if g.copy_in:  # (captured from pinned memory: the replay reads what the host wrote before it)
            g.dev[:g.head].copy_(g.host[:g.head], non_blocking=True)
        if g.block is not None:  # a wide table's first columns, from the copy into the wide table
            g.table[:, :, :g.wb].copy_(g.block)
        if g.split:
            g.meta.extend_start_loc = g.qsl[g.dp:] - g.dp
            for m in g.meta.table_metas or ():
                m.extend_start_loc = g.meta.extend_start_loc
        g.logits = self.model(g.ids, g.positions, g.meta, self._kv())

    def drop_graphs(self) -> None:
        """Forget the captured graphs (e.g. after a kernel setting changed); later steps capture
        anew, into a new memory pool."""
        self._graphs.clear()
        self._graph_pool = None
        self._stage = self._staged = None

    def summary(self) -> dict:
        props = torch.cuda.get_device_properties(self.device)
        return {**super().summary(), "device": props.name,
                "peak_gpu_mem_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "gpu_total_mem_bytes": int(self.total_mem),
                "gpu_memory_utilization": self.utilization,
                "activation_peak_bytes": self.activation_peak,
                "blas": self.blas, "cuda_graphs": self.cuda_graphs, "cuda_graph_captures": len(self._graphs),
                "cuda_graph_capture_s": self.graph_capture_s, "warmup_s": self.warmup_s, **self.graph_summary()}

    def graph_summary(self) -> dict:
        """The graphs' part of summary(): the warm-up mode, graphs captured by it and in the replay
        (keys it missed), its time, the memory the sizing gave the graphs (`graph_pool_bytes`,
        with its profile's parts) and what the warm-up's graphs took (`graph_mem_measured_bytes`)."""
        return {"graph_warmup": self.graph_warmup, "cuda_graph_captures_warmup": self.graph_warmup_captures,
                "cuda_graph_captures_in_replay": self.graph_captures_in_replay,
                "graph_warmup_s": self.graph_warmup_s, "graph_pool_bytes": self.graph_pool_bytes,
                "graph_mem_measured_bytes": self.graph_mem_measured,
                **{f"graph_profile_{k}": v for k, v in (self.graph_profile or {}).items()}}

