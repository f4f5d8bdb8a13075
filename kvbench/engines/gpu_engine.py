"""`engine=gpu`: the model on CUDA with the Triton kernels; the KV pool takes what is left.

Sizing, as vLLM does it: load the weights, run one profiling forward of `profile_tokens`
tokens, and give the pool

    kv_budget = total_gpu_mem * gpu_memory_utilization
                - weights - activation peak (profiled) - memory outside torch (CUDA context)

unless `kv_cache_gb` names the pool size. Step time = CUDA events around the whole step
(host-side batch building included), minus the capture time of any CUDA graph made in it and
the time a hybrid design's `strategy.table()` calls take (a one-table strategy's page tables are
read by the scheduler, outside the step; `table_read_s` in the summary).

CUDA graphs (`cuda_graphs=true`): every step of at most 512 requests replays a full-model graph
captured on first use of its (token bucket, batch bucket, context bucket, contiguous,
decode-only) shape, except steps with more than `graph_max_tokens` (8,192) tokens of prefill,
which run eagerly. Measured on an H200 (results/gpu/step_overhead_h200_05c9e0e.json): from graphs,
a 1B 1,024-token prefill takes 1.04x its kernels' time, where eagerly (the limit was 512 before
05c9e0e) it took 2.3x; an 8B 2,048-token prefill 1.08x. Padded tokens write nowhere (slot -1), padded requests
have no tokens and attend to nothing (seq_len 0), padded logits rows are dropped. Decode graphs
size their split-KV for the context bucket (a power of two of pages), not the exact max length.
Steps with prefill are padded to a token bucket (`token_bucket`: under 1/8 of padding): the extend kernel takes
its request boundaries from `query_start_loc`, so one graph serves any mix of chunks.

Hybrid pool designs (issue 16; `bind(..., strategy=)`, torch_engine.HybridKV): the pool is the
design's own memory, at most its `pool_bytes` (= kv_capacity_tokens x bytes per token, the
budget sized above: the engine never allocates more than the uniform pool would; bytes a design's
pages cannot use stay unallocated), each layer reading its table's slots. A graph then has one
slot-mapping row and one page-table block per table in its staging buffer (static, like the
rest), and every table's AttnMetadata views them; eager steps share the torch engine's path.

A mixed step's one-token rows go first (`HostBatch.num_decode`) and through the decode kernel;
only the prefill chunks go through extend, whose 128-query tiles would otherwise be spent on one
query each (measured, H200, 8B: a 512-token chunk beside 63 decodes took 42.3 ms, 28.8 of them
in extend; split, 19.6 ms). In a graph the decode rows are padded to a batch bucket of their own.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch

from kvbench.engines.torch_engine import HostBatch, TorchEngine, _plain, with_tables
from kvbench.model import DTYPES, AttnMetadata, ModelConfig, as_model_config
from kvbench.sizes import GIB, dtype_bytes, kv_bytes_per_token, tokens_in_gib

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def token_bucket(tokens: int) -> int:
    """Token count a step with prefill is padded to for its graph: a multiple of 16 up to 256
    tokens; above, a multiple of 1/8 of the power of two below it (32 from 256, 64 from 512, ...,
    512 from 4096), so padding stays under 1/8 with 8 buckets per doubling."""
    if tokens <= 256:
        return -(-tokens // 16) * 16
    step = 1 << ((tokens - 1).bit_length() - 4)
    return -(-tokens // step) * step


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
    """

    name = "gpu"

    def __init__(self, model, attention: str = "triton", seed: int = 0, sample: bool = False,
                 device: str = "cuda", keep_logits: bool = False, cuda_graphs: bool = False,
                 gpu_memory_utilization: float = 0.9, kv_cache_gb: float | None = None,
                 profile_tokens: int = 8192, max_model_len: int | None = None, warmup: bool = True,
                 graph_max_tokens: int = 8192):
        if not torch.cuda.is_available():
            raise ValueError("engine 'gpu' needs CUDA, and torch sees no GPU; use engine=torch")
        cfg = as_model_config(model if isinstance(model, ModelConfig) else _plain(model))
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
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
        self.profile_tokens = profile_tokens
        self.activation_peak = self._profile(profile_tokens)
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

    def kv_budget_bytes(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        return int(total * self.utilization - self.model.weight_bytes() - self.activation_peak
                   - outside_torch)

    def kv_capacity_tokens(self, requested: int | None) -> int:
        bpt, budget = kv_bytes_per_token(self.cfg), self.kv_budget_bytes()
        sizes = (f"GPU {_gb(self.total_mem)} x utilization {self.utilization}; weights "
                 f"{_gb(self.model.weight_bytes())}, activation peak {_gb(self.activation_peak)} "
                 f"-> KV budget {_gb(budget)} at {bpt} B/token")
        if requested is not None:
            tokens, why = int(requested), f"kv_capacity_tokens={requested}"
        elif self.kv_cache_gb is not None:
            tokens, why = tokens_in_gib(self.kv_cache_gb, bpt), f"kv_cache_gb={self.kv_cache_gb}"
        else:
            tokens, why = max(budget, 0) // bpt, "gpu_memory_utilization"
        if requested is not None or self.kv_cache_gb is not None:
            free = torch.cuda.mem_get_info(self.device)[0]
            if tokens * bpt > free:
                raise ValueError(f"{why} asks for {_gb(tokens * bpt)} of KV pool, but only "
                                   f"{_gb(free)} of GPU memory is free ({sizes})")
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
        if self.warmup:
            self._warm_up(page_size, num_pages)

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
        from kvbench.kernels.extend_attention import EXTEND_SHORT_TOKENS

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
            # prefill and extend: chunks of a few and of more than EXTEND_SHORT_TOKENS new tokens
            # (the two launch configs), over no prefix and over cached prefixes of 256 … 8k tokens
            # (every prefix-split class, so every merge width), and many short extends at once
            # (the request-count buckets); reads page 0, writes nothing
            for n_new, b, prefixes in ((2, 1, (0, *(256 << k for k in range(6)))),
                                       (EXTEND_SHORT_TOKENS + 1, 1, (0, *(256 << k for k in range(6)))),
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
        end.synchronize()
        # (less a hybrid design's strategy.table() calls: torch_engine.TorchEngine.step says why)
        return start.elapsed_time(end) / 1e3 - (self.graph_capture_s - capture0) - (self._table_read_s() - read0)

    def _forward(self, h: HostBatch) -> torch.Tensor:
        b, t = len(h.seq_lens), len(h.ids)
        nd = b if h.decode_only else h.num_decode
        if not (self.cuda_graphs and b <= GRAPH_BATCH_SIZES[-1] and (h.decode_only or t - nd <= self.graph_max_tokens)):
            return super()._forward(h)
        # graph layout: [nd decode rows | padding to dp] [prefill requests' tokens | padding];
        # requests: nd decodes, dp - nd dummies of one token, b - nd prefills, dummies of none
        if h.decode_only:
            dp = bs = next(x for x in GRAPH_BATCH_SIZES if x >= b)
            ts = bs
        else:
            dp = next(x for x in (0, *GRAPH_BATCH_SIZES) if x >= nd)
            bs = dp + next(x for x in GRAPH_BATCH_SIZES if x >= b - nd)
            ts = dp + token_bucket(t - nd)
        pages = 1 << max(4, int(-(-int(h.seq_lens.max()) // h.page_size) - 1).bit_length())
        key = (ts, bs, pages, h.contiguous, h.decode_only, dp)
        g = self._graphs.get(key) or self._capture(key, h.page_size)
        # the step's inputs: written into the graph's pinned staging buffer, then one copy;
        # padded tokens write nowhere (slot -1), padded requests attend to nothing (seq_len 0)
        # (a hybrid design: one slot row and one page-table block per table; uniform: one)
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
        w = min(h.page_table.shape[-1], pages)  # (pages past the longest request's length are never read)
        tables = h.page_table.reshape(-1, b, h.page_table.shape[-1])[..., :w]  # [num_tables, B, w]
        g.h32_table[:, :nd, :w], g.h32_table[:, dp:dp + b - nd, :w] = tables[:, :nd], tables[:, nd:]
        # (entries past a request's length are never read; the buffer is rewritten only after
        # `step` has synchronized, so the copy is done by then)
        g.dev.copy_(g.host, non_blocking=True)
        g.graph.replay()
        return g.logits[:e].clone() if self.keep_logits else g.logits[:e]  # [B_emit, vocab]

    def _capture(self, key: tuple[int, int, int, bool, bool, int], page_size: int) -> SimpleNamespace:
        t0 = time.perf_counter()
        g = self._graph_inputs(key, page_size)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels; writes nothing (slot -1)
            self._graph_body(g)
        torch.cuda.current_stream().wait_stream(side)
        self._graph_pool = self._graph_pool or torch.cuda.graph_pool_handle()
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self._graph_pool):
            self._graph_body(g)
        self._graphs[key] = g
        self.graph_capture_s += time.perf_counter() - t0
        return g

    def _graph_inputs(self, key: tuple[int, int, int, bool, bool, int], page_size: int) -> SimpleNamespace:
        """The static inputs of a graph of shape `key`: one (pinned on CUDA) host staging buffer,
        its device copy, and the AttnMetadata (per page table too, for a hybrid design) viewing
        that copy; `_forward` fills the staging buffer at each replay. No CUDA call but the copy
        (the CPU tests run this with an eager stand-in for the graph)."""
        ts, bs, pages, contiguous, decode_only, dp = key
        hybrid = self.hybrid
        nt = 1 if hybrid is None else len(hybrid.tables)  # page tables (a hybrid design: one per TableSpec)
        # inputs: one pinned host buffer and its device copy; the graph reads views of the latter
        # (int64: ids, positions, nt slot rows [ts] and logits rows [bs]; int32: query_start_loc
        # [bs+1], seq_lens [bs], nt page tables [bs, pages] and the prefill part's start locations)
        n64, n32 = (2 + nt) * ts + bs, (bs + 1) + bs + nt * bs * pages
        g = SimpleNamespace(host=torch.zeros(8 * n64 + 4 * n32, dtype=torch.uint8,
                                             pin_memory=self.device.type == "cuda"))
        v64, v32 = g.host.numpy()[:8 * n64].view(np.int64), g.host.numpy()[8 * n64:].view(np.int32)
        g.h64, g.h64_idx = v64[:(2 + nt) * ts].reshape(2 + nt, ts), v64[(2 + nt) * ts:]
        g.h32_qsl, g.h32_lens = v32[:bs + 1], v32[bs + 1:2 * bs + 1]
        g.h32_table = v32[2 * bs + 1:].reshape(nt, bs, pages)
        g.h64[2:] = -1
        g.dev = g.host.to(self.device)
        d64, d32 = g.dev[:8 * n64].view(torch.int64), g.dev[8 * n64:].view(torch.int32)
        g.ids, g.positions = d64[:ts], d64[ts:2 * ts]
        slots = d64[2 * ts:(2 + nt) * ts].view(nt, ts)
        tables = d32[2 * bs + 1:].view(nt, bs, pages)
        g.qsl, g.dp = d32[:bs + 1], dp
        g.split = 0 < dp and not decode_only
        g.meta = AttnMetadata(slots[0], tables[0], g.qsl,
                              d32[bs + 1:2 * bs + 1], d64[(2 + nt) * ts:], page_size, contiguous, decode_only,
                              pages * page_size, dp if g.split else 0, None)
        if hybrid is not None:
            with_tables(g.meta, slots, tables, hybrid.layer_table)
        return g

    def _graph_body(self, g: SimpleNamespace) -> None:
        """What a graph runs: (a split step) the prefill part's query_start_loc, recomputed from
        the input at each replay, into every table's metadata; the model, into g.logits [bs, vocab]."""
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

    def summary(self) -> dict:
        props = torch.cuda.get_device_properties(self.device)
        return {**super().summary(), "device": props.name,
                "peak_gpu_mem_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "gpu_total_mem_bytes": int(self.total_mem),
                "gpu_memory_utilization": self.utilization,
                "activation_peak_bytes": self.activation_peak,
                "cuda_graphs": self.cuda_graphs, "cuda_graph_captures": len(self._graphs),
                "cuda_graph_capture_s": self.graph_capture_s, "warmup_s": self.warmup_s}

