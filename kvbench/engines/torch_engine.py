"""`engine=torch`: the real model, executed on each StepBatch (CPU + reference attention by default).

Per step: swap-outs (pages to host tensors) -> copy-on-write page copies -> swap-ins (host tensors
back into the pages the request holds now) -> flatten the batch -> model forward -> (sample=true) greedy
ids into the requests' outputs. Replay mode (the default) feeds the trace's own tokens and writes
nothing, so every strategy and engine sees the same token stream.

Token ids are taken modulo `vocab_size` before embedding, so a trace whose ids run past a small
model's vocabulary (traces use [0, 32000) by default) still runs; every shipped config has
vocab_size >= 32000, where this is the identity.

Hybrid pool designs (issue 16, strategies/hybrid/): kvbench.run binds the engine with the strategy
(`bind(page_size, num_pages, strategy=)`); the engine then keeps the design's K/V storage
(`HybridKV`: one buffer per page-id space, or one shared by spaces that tile the same bytes) and
gives each layer the page table and slots of the table that serves it, read per step from
`strategy.table(rid, t)` (`ScheduledSeq.page_table`, the primary table, is not used then). Such
designs have no host tier, swap or copy-on-write: a batch that asks for one is an error.
"""
from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from kvbench.batch import StepBatch, SwapIn, SwapOut
from kvbench.engines.base import Engine
from kvbench.kernels.decode_attention import key_lo_host
from kvbench.kernels.page_copy import page_move
from kvbench.model import DTYPES, AttnMetadata, ModelConfig, as_model_config, build_model
from kvbench.sizes import dtype_bytes

NULL_PAGE = -1  # (kvbench.strategies.hybrid.base.NULL_PAGE: a table entry for a page the request does not hold)


# A decode-only step's host part on its short path: `TorchEngine._flatten_decode`, and in the gpu
# engine a staging fill of only the rows' values when the graph and batch size are the last fill's
# (`GPUEngine._forward`). False: the general path (an A/B of experiments/check_model_gpu.py)
FAST_DECODE_HOST = True


_PAGE_TABLE, _NONE = operator.attrgetter("page_table"), type(None)


class LastLogits(Mapping):
    """{request id: its row of the step's logits [vocab]}, a row taken when asked for: keeping
    them costs a step no tensor view per request (made after the step's GPU work, they counted
    in its time)."""

    def __init__(self, ids: list, logits: torch.Tensor) -> None:
        self._row, self._logits = dict(zip(ids, range(len(ids)))), logits

    def __getitem__(self, rid) -> torch.Tensor:
        return self._logits[self._row[rid]]

    def __iter__(self):
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)


def _stack_tables(pts: list) -> np.ndarray:
    """[B, widest] int32 of B page-table rows; shorter rows padded with page 0 (never read)."""
    lens = list(map(len, pts))
    width = lens[0]
    if lens.count(width) == len(lens):  # (one concatenate: np.stack costs 3x more at 64 rows)
        return np.concatenate(pts).astype(np.int32, copy=False).reshape(len(pts), width)
    width = max(lens)
    # ragged rows: one join of their bytes, each row followed by its padding (no per-entry work:
    # 126 radix-1 rows of 300-1,000 pages 85 -> 50 us, 120 rows of 20-80 pages 43 -> 30 us
    # against a slice copy a row, this VM's CPU)
    pad, parts = memoryview(bytes(4 * width)), []
    for pt, n in zip(pts, lens):
        parts += (pt, pad[:4 * (width - n)])
    try:
        table = bytearray().join(parts)
    except (TypeError, BufferError):  # (a row that is not a contiguous array)
        table = b""
    if len(table) == 4 * width * len(pts):  # (a row of another item size would miss it)
        return np.frombuffer(table, np.int32).reshape(len(pts), width)
    table = np.zeros((len(pts), width), np.int32)
    for row, pt in zip(table, pts):
        row[:len(pt)] = pt
    return table


@dataclass(slots=True)
class HostBatch:
    """One step's flat batch on the host (numpy), before it becomes tensors + AttnMetadata."""

    ids: np.ndarray  # [T] int64 token ids (mod vocab)
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64; hybrid pools: [num_tables, T], one row per page table
    page_table: np.ndarray  # [B, max_pages] int32; hybrid pools: [num_tables, B, max_pages]
    query_start_loc: np.ndarray  # [B+1] int64
    seq_lens: np.ndarray  # [B] int64
    logits_idx: np.ndarray  # [B_emit] int64
    page_size: int
    contiguous: bool
    decode_only: bool
    num_decode: int = 0  # leading requests with one new token (a mixed step's decode-kernel rows)
    layer_table: tuple[int, ...] | None = None  # hybrid pools: layer i reads page table layer_table[i]

    def to_device(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        def t(x, dtype):
            return torch.from_numpy(x).to(device=dev, dtype=dtype, non_blocking=True)

        slots, tables = t(self.slot_mapping, torch.int64), t(self.page_table, torch.int32)
        hybrid = self.layer_table is not None
        meta = AttnMetadata(
            slots[0] if hybrid else slots, tables[0] if hybrid else tables,
            t(self.query_start_loc, torch.int32), t(self.seq_lens, torch.int32),
            t(self.logits_idx, torch.int64), self.page_size, self.contiguous, self.decode_only,
            int(self.seq_lens.max()), self.num_decode,
            t(self.query_start_loc[self.num_decode:] - self.num_decode, torch.int32) if self.num_decode else None)
        if hybrid:
            with_tables(meta, slots, tables, self.layer_table)
        return t(self.ids, torch.int64), t(self.positions, torch.int64), meta


def with_tables(meta: AttnMetadata, slots, tables, layer_table: tuple[int, ...]) -> AttnMetadata:
    """Give `meta` one AttnMetadata per page table k (slot_mapping slots[k], page_table tables[k],
    the rest equal to meta's) and the table each layer reads. Mutates and returns meta. (A field
    set on meta later, e.g. extend_start_loc, must be set on meta.table_metas too.)"""
    meta.table_metas = tuple(dataclasses.replace(meta, slot_mapping=slots[k], page_table=tables[k])
                             for k in range(len(slots)))
    meta.layer_table = tuple(layer_table)
    return meta


class HybridKV:
    """The K/V memory of a hybrid pool design (strategies/hybrid/base.py: `tables`, a tuple of
    TableSpec) and the page table each layer reads. Built once, at bind; the buffers are the only
    K/V memory the engine holds for such a design.

    Layers -> tables: the model's layers of geometry group g (in model order) are dealt to g's
    tables (in `tables` order) in consecutive runs of `TableSpec.layers` layers: hybrid_unified's
    Gemma-like split of the 22 sliding layers (all but 5, 11, 17, 23) into tables of 4, 4, 4, 4,
    4, 2 gives them layers {0-3}, {4, 6-8}, {9, 10, 12, 13}, {14-16, 18}, {19-22}, {24, 25}, and
    the full table {5, 11, 17, 23}. (vLLM deals layers[i::num_tables] instead, so that pipeline
    stages get equal shares; on one GPU the assignment changes no number.) All layers of
    a table share one (window, chunk) bound, and every table one page size (the model runner's
    layers share one K/V shape).

    Spaces -> memory: a page of space s (`page_bytes`) is page_size tokens x W_s layer slots x
    (K, V), W_s = page_bytes / (page_size x one layer's K+V bytes per token).
      - The tables of a space whose layers together fit W_s take consecutive layer slots (a page
        id then serves all of them at once: hybrid_radix's full lane, shared by every full group;
        any space with one table).
      - Otherwise each table's layer j uses slot j (hybrid_unified: 7 tables of <= 4 layers over
        pages of 4 slots; a page belongs to one table at a time, the design's invariant, and the
        2-layer table leaves 2 slots of its pages unused, the padding the design counts as
        internal). This is vLLM's layout: tensor j is shared by the j-th layer of every table.
    Buffers:
      - spaces whose bytes (space_pages x page_bytes) sum to at most the design's pool_bytes
        (hybrid_separate, hybrid_unified, hybrid_radix) get one tensor each,
        [W_s, 2, space_pages x page_size, H_kv, D]: a layer's K is a contiguous [slots, H_kv, D]
        plane, as in the uniform pool;
      - spaces whose bytes sum past it tile the same memory (hybrid_jenga: each group's small
        page p is bytes [p x page_bytes, (p+1) x page_bytes) of the large pages, inside large
        page p // ratio): one buffer of the largest space, each space a token-major view
        [space_pages x page_size, W_s, 2, H_kv, D] of it, so small page p of every group lies in
        exactly those bytes (pages the design hands to two groups at once never overlap); a
        layer's K is then a [slots, H_kv, D] view whose slot stride is W_s x 2 x H_kv x D (the
        kernels read the cache through its strides).
    `nbytes` (the sum of the buffers) is at most the design's `pool_bytes` (asserted): the engine
    holds what the design accounts, less the bytes no page of it can use.

    NULL_PAGE (-1) entries (pages before a window the request no longer holds) are replaced by
    page 0 in the step's tables; `host_tables` first proves that none lies where a query of the
    step reads ([key_lo(first new position), length), the range the kernels and their torch
    references read), so page 0 is never read through them.
    """

    def __init__(self, strategy, cfg: ModelConfig, device: torch.device) -> None:
        tables = tuple(strategy.tables)
        if not tables:
            raise ValueError(f"strategy {strategy.name}: a hybrid pool design without page tables")
        groups = tuple(strategy.groups)
        L, H, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        bounds = cfg.layer_bounds()  # ValueError for state layers / per-group head shapes
        if cfg.layers is None:
            group_of = [0] * L
        else:
            label = {g.label: i for i, g in enumerate(groups)}
            pattern = cfg.layers["pattern"]
            group_of = [label[str(pattern[i % len(pattern)])] for i in range(L)]
        self.tables = tables
        self.layer_table, self.layer_slot = [-1] * L, [0] * L
        for g in sorted(set(group_of)):
            layers = [i for i in range(L) if group_of[i] == g]
            specs = [t for t, spec in enumerate(tables) if spec.group == g]
            if sum(tables[t].layers for t in specs) != len(layers):
                raise ValueError(f"strategy {strategy.name}: the tables of group '{groups[g].label}' serve "
                                 f"{sum(tables[t].layers for t in specs)} layers, the model has {len(layers)}")
            it = iter(layers)
            for t in specs:
                for j in range(tables[t].layers):
                    i = next(it)
                    self.layer_table[i], self.layer_slot[i] = t, j
        self.layer_table = tuple(self.layer_table)
        self.bounds = []  # (window, chunk) of each table's layers
        for t in range(len(tables)):
            b = {bounds[i] for i in range(L) if self.layer_table[i] == t}
            if len(b) != 1:
                raise ValueError(f"strategy {strategy.name}: table {t} serves layers of bounds {sorted(b)}")
            self.bounds.append(b.pop())
        sizes = {spec.page_size for spec in tables}
        if len(sizes) != 1:
            raise ValueError(f"strategy {strategy.name}: tables of page sizes {sorted(sizes)}: the model runner's "
                             "layers share one K/V shape, so one page size")
        self.page_size = ps = sizes.pop()
        dtype = DTYPES[cfg.dtype]
        layer_token = 2 * H * D * dtype_bytes(cfg.dtype)  # one layer's K + V of one token
        self.spaces = sorted({spec.space for spec in tables})
        self.space_pages, self.width = {}, {}  # space -> pages, layer slots per page
        offset = [0] * len(tables)  # a table's first layer slot in its space's pages
        for s in self.spaces:
            specs = [t for t, spec in enumerate(tables) if spec.space == s]
            (pages, page_bytes), = {(tables[t].space_pages, tables[t].page_bytes) for t in specs}
            if page_bytes % (ps * layer_token):
                raise ValueError(f"strategy {strategy.name}: space {s}'s pages of {page_bytes} bytes are not whole "
                                 f"layer slots of {ps} x {layer_token} bytes")
            w = page_bytes // (ps * layer_token)
            layers = [tables[t].layers for t in specs]
            if sum(layers) <= w:  # consecutive slots: one page id serves every table of the space
                for t, start in zip(specs, np.cumsum([0] + layers[:-1])):
                    offset[t] = int(start)
            elif max(layers) > w:
                raise ValueError(f"strategy {strategy.name}: a table of {max(layers)} layers in pages of {w} slots")
            self.space_pages[s], self.width[s] = pages, w
        space_bytes = {s: self.space_pages[s] * self.width[s] * ps * layer_token for s in self.spaces}
        self.aliased = sum(space_bytes.values()) > strategy.pool_bytes
        self.buffers: list[torch.Tensor] = []
        self._space_view: dict[int, torch.Tensor] = {}  # plane: [W, 2, S, H, D]; aliased: [S, W, 2, H, D]
        if self.aliased:
            if len(set(space_bytes.values())) != 1 or max(space_bytes.values()) > strategy.pool_bytes:
                raise ValueError(f"strategy {strategy.name}: page-id spaces of {sorted(space_bytes.values())} bytes "
                                 f"sum past the pool's {strategy.pool_bytes}, but do not tile one memory of at "
                                 "most the pool (as Jenga's groups tile its large pages)")
            elems = max(space_bytes.values()) // dtype_bytes(cfg.dtype)
            buf = torch.zeros(elems, dtype=dtype, device=device)
            self.buffers.append(buf)
            for s in self.spaces:
                n = space_bytes[s] // dtype_bytes(cfg.dtype)
                self._space_view[s] = buf[:n].view(self.space_pages[s] * ps, self.width[s], 2, H, D)
        else:
            for s in self.spaces:
                buf = torch.zeros(self.width[s], 2, self.space_pages[s] * ps, H, D, dtype=dtype, device=device)
                self.buffers.append(buf)
                self._space_view[s] = buf
        self.nbytes = sum(b.numel() * b.element_size() for b in self.buffers)
        assert self.nbytes <= strategy.pool_bytes, (self.nbytes, strategy.pool_bytes)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (k_cache, v_cache) [slots, H, D]
        for i in range(L):
            t = self.layer_table[i]
            s, w = tables[t].space, offset[t] + self.layer_slot[i]
            v = self._space_view[s]
            self.layers.append((v[:, w, 0], v[:, w, 1]) if self.aliased else (v[w, 0], v[w, 1]))
        self.min_pages = min(self.space_pages.values())
        self.null_entries = 0  # NULL_PAGE entries met in the steps' tables (each proven unread)
        self.read_s = 0.0  # host time inside strategy.table() calls

    def page_view(self, s: int, buffers: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[space_pages, W, 2, page_size, H, D]: page p of space s is view[p] (a view of `buffers`,
        default the engine's; another list must be clones of them). Pure."""
        ps = self.page_size
        v = self._space_view[s]
        if buffers is not None:
            v = self._space_view_of(s, buffers)
        n, w = self.space_pages[s], self.width[s]
        if self.aliased:
            return v.view(n, ps, w, 2, *v.shape[-2:]).permute(0, 2, 3, 1, 4, 5)
        return v.view(w, 2, n, ps, *v.shape[-2:]).permute(2, 0, 1, 3, 4, 5)

    def _space_view_of(self, s: int, buffers: list[torch.Tensor]) -> torch.Tensor:
        own = self._space_view[s]
        if self.aliased:
            return buffers[0][:own.numel()].view(own.shape)
        return buffers[self.spaces.index(s)]

    def host_tables(self, strategy, seqs, starts: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """[num_tables, B, max pages] int32: each table of each request (`strategy.table`), cut to
        its pages of [0, seq_len), NULL_PAGE entries replaced by page 0 after proving that no
        query of the step reads them (RuntimeError naming the request otherwise). Mutates only
        the `null_entries` count."""
        ps, nt, b = self.page_size, len(self.tables), len(seqs)
        need = -(-seq_lens // ps)  # [B] pages of [0, seq_len)
        t0 = time.perf_counter()
        raw = [strategy.table(s.request.id, t) for t in range(nt) for s in seqs]  # table-major
        self.read_s += time.perf_counter() - t0
        lens = np.fromiter(map(len, raw), np.int64, nt * b).reshape(nt, b)
        if (short := lens < need).any():
            t, i = (int(x[0]) for x in np.nonzero(short))
            raise RuntimeError(f"strategy {strategy.name}: table {t} of request {seqs[i].request.id} has "
                               f"{lens[t, i]} pages, the step reads {need[i]}")
        cut = need.tolist() * nt
        flat = np.concatenate([r if len(r) == n else r[:n] for r, n in zip(raw, cut)])
        out = np.zeros((nt, b, int(need.max())), np.int32)
        rows = np.repeat(np.arange(b), need)  # (request, page) of each entry of one table
        cols = np.arange(int(need.sum())) - np.repeat(np.cumsum(need) - need, need)
        out[:, rows, cols] = flat.reshape(nt, -1)
        null = out == NULL_PAGE
        if null.any():
            self.null_entries += int(null.sum())
            # the first page any query of the step reads, per table and request
            lo = np.stack([key_lo_host(starts, *bound) // ps for bound in self.bounds])  # [nt, B]
            read = null & (np.arange(out.shape[2])[None, None, :] >= lo[:, :, None])
            if read.any():
                t, i, page = (int(x[0]) for x in np.nonzero(read))
                raise RuntimeError(f"strategy {strategy.name}: table {t} of request {seqs[i].request.id} has "
                                   f"NULL_PAGE at page {page}, which the step reads (positions {int(starts[i])}.."
                                   f"{int(seq_lens[i]) - 1}, bound {self.bounds[t]}: pages from {int(lo[t, i])})")
            out[null] = 0  # harmless: before the first page a query of this step reads
        return out

    def describe(self) -> dict:
        return {"kv_tables": len(self.tables), "kv_spaces": len(self.spaces), "kv_null_entries": self.null_entries,
                "kv_layout": "aliased" if self.aliased else "per_space",
                "kv_layer_table": list(self.layer_table)}


def _plain(x):
    """DictConfig / nested mappings -> plain dicts (no omegaconf import needed)."""
    return {k: _plain(x[k]) for k in x} if isinstance(x, Mapping) else x


class TorchEngine(Engine):
    """Runs `kvbench.model.LlamaModel` on every step.

    Args:
        model: a ModelConfig or its fields as a dict / DictConfig (configs/model/*.yaml).
        attention: "reference" (torch references of the kernels) or "triton".
        seed: weight init seed when the model has no checkpoint.
        sample: False = replay the trace's tokens; True = greedy argmax, written to
            `request.output[start + num_new - prompt_len]` (the token after the step's last one).
        device: "cpu" or "cuda".
        keep_logits: keep `last_logits` = {request id: logits [vocab]} of the last step.
        cuda_graphs: decode steps through CUDA graphs; gpu engine only (True is an error here).
    """

    name = "torch"
    needs_layout = True

    def __init__(self, model, attention: str = "reference", seed: int = 0, sample: bool = False,
                 device: str | torch.device = "cpu", keep_logits: bool = False,
                 cuda_graphs: bool = False):
        if cuda_graphs:
            raise ValueError(f"engine '{self.name}': cuda_graphs=true needs engine=gpu")
        self.cfg: ModelConfig = as_model_config(model if isinstance(model, ModelConfig)
                                                else _plain(model))
        self.device = torch.device(device)
        self.sample, self.keep_logits = sample, keep_logits
        self.model = build_model(self.cfg, self.device, attention, seed)
        self.kv_pool: torch.Tensor | None = None  # [L, 2, num_pages * page_size, H_kv, D]
        self.hybrid: HybridKV | None = None  # a hybrid pool design's K/V (then kv_pool is None)
        self.strategy = None  # the hybrid design whose tables the steps read (bind)
        self.table_build_s = 0.0  # host time spent reading, checking and padding a hybrid design's tables
        self.page_size = 0
        self.last_logits: Mapping[int, torch.Tensor] = {}
        self._ids: dict[int, np.ndarray] = {}  # request id -> prompt ++ output (int64, mod vocab)
        self._decode_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # b -> `_flatten_decode`'s fixed arrays
        self._swapped: dict[int, torch.Tensor] = {}  # request id -> its pages [P, L, 2, page_size, H_kv, D] on the host
        self._host_tier: torch.Tensor | None = None  # [host pages so far, L, 2, page_size, H_kv, D], row = host page id
        self.steps = 0

    # ---- contract -------------------------------------------------------------------------
    def bind(self, page_size: int, num_pages: int, strategy=None) -> None:
        """Allocate the pool: the uniform [L, 2, num_pages * page_size, H_kv, D], or, when
        `strategy` is a hybrid pool design (it has `tables`), its own memory (`HybridKV`), read
        through `strategy.table(rid, t)` at every step."""
        c = self.cfg
        self.page_size = page_size
        if strategy is not None and getattr(strategy, "tables", None) is not None:
            self.hybrid, self.strategy, self.kv_pool = HybridKV(strategy, c, self.device), strategy, None
            if self.hybrid.page_size != page_size:
                raise ValueError(f"strategy {strategy.name}: tables of page size {self.hybrid.page_size}, "
                                 f"bound with {page_size}")
            return
        self.kv_pool = torch.zeros(c.num_layers, 2, num_pages * page_size, c.num_kv_heads,
                                   c.head_dim, dtype=DTYPES[c.dtype], device=self.device)

    def _kv(self):
        """What the model reads as its KV pool: the uniform tensor, or per layer (k, v) views."""
        return self.kv_pool if self.hybrid is None else self.hybrid.layers

    def step(self, batch: StepBatch) -> float:
        """Wall time of the step, less the time spent asking a hybrid design for its tables
        (`HybridKV.read_s`: for a one-table strategy the scheduler reads `page_table` while it
        builds the batch, outside the step, so that reading is not step time here either)."""
        t0, read0 = time.perf_counter(), self._table_read_s()
        self._run(batch)
        return time.perf_counter() - t0 - (self._table_read_s() - read0)

    def _table_read_s(self) -> float:
        return 0.0 if self.hybrid is None else self.hybrid.read_s

    def summary(self) -> dict:
        pool = 0 if self.kv_pool is None else self.kv_pool.numel() * self.kv_pool.element_size()
        extra = {}
        if self.hybrid is not None:
            pool = self.hybrid.nbytes
            extra = {**self.hybrid.describe(), "table_build_s": self.table_build_s,
                     "table_read_s": self.hybrid.read_s}
        return {"device": str(self.device), "model": self.cfg.name,
                "attention_backend": self.model.ops.backend, "kv_pool_bytes": pool,
                "weight_bytes": self.model.weight_bytes(), **extra}

    # ---- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, batch: StepBatch) -> None:
        if (self.kv_pool is None and self.hybrid is None) or batch.page_size != self.page_size:
            raise RuntimeError(f"engine '{self.name}': step before bind(), or page_size "
                               f"{batch.page_size} != bound {self.page_size}")
        if self.hybrid is not None and (batch.swap_out or batch.swap_in or batch.host_copies or batch.copies):
            raise RuntimeError(f"engine '{self.name}': strategy {self.strategy.name} is a hybrid pool design; "
                               "it has no swap, host tier or copy-on-write, yet the step asks for page copies")
        if batch.swap_out:  # first: a page a victim released may be written again in this step
            self._swap_out(batch.swap_out)
        if batch.host_copies:  # the host tier's, in order (a page evicted to host may be taken again)
            self._host_tier_copies(batch.host_copies)
        if batch.copies:  # copy-on-write, before anything reads or writes those pages
            src, dst = (torch.tensor(x, dtype=torch.int64, device=self.device)
                        for x in zip(*batch.copies))
            self.model.ops.page_copy(self.kv_pool, src, dst, self.page_size)  # (uniform pool only)
        if batch.swap_in:
            self._swap_in(batch.swap_in)
        if not batch.seqs:
            return
        if _NONE in set(map(type, map(_PAGE_TABLE, batch.seqs))):  # (C-level loops, no Python frame a row)
            raise ValueError(f"engine '{self.name}' needs page tables (needs_layout=True), but a "
                             f"ScheduledSeq has page_table=None")
        logits = self._forward(self._flatten(batch))  # [B_emit, vocab]
        self._emit(batch, logits)
        self.steps += 1

    def _move_backend(self) -> str:
        return "triton" if self.model.ops.backend == "triton" else "torch"

    def _swap_out(self, outs: list[SwapOut]) -> None:
        """Copy each victim's pages (all layers, K and V) to a host tensor of its own (pinned when
        the pool is on a GPU), kept until it comes back."""
        L, _, _, H, D = self.kv_pool.shape
        ps = self.page_size
        for o in outs:
            if o.rid in self._swapped:
                raise RuntimeError(f"engine '{self.name}': request {o.rid} swapped out twice without a swap-in")
            host = torch.empty((len(o.pages), L, 2, ps, H, D), dtype=self.kv_pool.dtype,
                               pin_memory=self.device.type == "cuda")
            pages = torch.as_tensor(np.asarray(o.pages, np.int64), device=self.device)
            page_move(self.kv_pool, pages, host, ps, to_host=True, backend=self._move_backend())
            self._swapped[o.rid] = host

    def _host_tier_copies(self, copies: list[tuple[str, int, int]]) -> None:
        """A strategy's host tier, for real: ("d2h", gpu_page, host_page) copies a pool page into
        row host_page of one host buffer (pinned on a GPU, grown by doubling as host pages are
        first used); ("h2d", host_page, gpu_page) copies it back. Consecutive copies of one kind
        go in one page_move (a d2h run ends before a host row it already writes)."""
        need = 1 + max(a if kind == "h2d" else b for kind, a, b in copies)
        if self._host_tier is None or need > len(self._host_tier):
            self._grow_host_tier(need)
        run: list[tuple[int, int]] = []  # (gpu page, host row) of the pending run
        kind_of_run = None
        for kind, a, b in copies:
            if kind not in ("d2h", "h2d"):
                raise ValueError(f"engine '{self.name}': host copy kind {kind!r} is not 'd2h' or 'h2d'")
            gpu, row = (a, b) if kind == "d2h" else (b, a)
            if run and (kind != kind_of_run or (kind == "d2h" and any(r == row for _, r in run))):
                self._host_tier_run(kind_of_run, run)
                run = []
            kind_of_run = kind
            run.append((gpu, row))
        if run:
            self._host_tier_run(kind_of_run, run)

    def _host_tier_run(self, kind: str, run: list[tuple[int, int]]) -> None:
        pages, rows = (torch.as_tensor(np.asarray(x, np.int64), device=self.device) for x in zip(*run))
        page_move(self.kv_pool, pages, self._host_tier, self.page_size, to_host=kind == "d2h", host_rows=rows,
                  backend=self._move_backend())

    def _grow_host_tier(self, rows: int) -> None:
        L, _, _, H, D = self.kv_pool.shape
        old = self._host_tier
        size = max(rows, 2 * len(old)) if old is not None else rows
        buf = torch.empty((size, L, 2, self.page_size, H, D), dtype=self.kv_pool.dtype,
                          pin_memory=self.device.type == "cuda",
                          device="cpu" if self.device.type == "cuda" else self.device)
        if old is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # copies into the old buffer are done
            buf[:len(old)] = old
        self._host_tier = buf

    def _swap_in(self, ins: list[SwapIn]) -> None:
        """Copy positions [start, start + tokens) of each request's host copy into the pages it
        holds now (whole pages: `start` is a page boundary, the prefix cache serves whole pages;
        the last page's tail past the copied positions is computed in this step), then drop it."""
        ps = self.page_size
        for i in ins:
            host = self._swapped.pop(i.rid, None)
            if host is None:
                raise RuntimeError(f"engine '{self.name}': swap-in of request {i.rid}, which was never swapped out")
            if i.tokens == 0:
                continue  # the prefix cache served all of it: the host copy is dropped
            if i.start % ps:
                raise RuntimeError(f"engine '{self.name}': swap-in of request {i.rid} from position {i.start}, "
                                   f"not a page boundary (page_size {ps})")
            first, last = i.start // ps, -(-(i.start + i.tokens) // ps)
            pages = torch.as_tensor(np.asarray(i.pages[first:last], np.int64), device=self.device)
            page_move(self.kv_pool, pages, host[first:last], ps, to_host=False, backend=self._move_backend())

    def _forward(self, h: HostBatch) -> torch.Tensor:
        ids, positions, meta = h.to_device(self.device)
        return self.model(ids, positions, meta, self._kv())

    def _as_layout(self, h: HostBatch) -> HostBatch:
        """A batch built for one table (warm-up shapes) given to every table of a hybrid design
        (its page ids must exist in every space). Mutates and returns h."""
        if self.hybrid is not None:
            nt = len(self.hybrid.tables)
            h.slot_mapping = np.stack([h.slot_mapping] * nt)
            h.page_table = np.stack([h.page_table] * nt)
            h.layer_table = self.hybrid.layer_table
        return h

    def _flatten(self, batch: StepBatch) -> HostBatch:
        """StepBatch -> the flat batch as numpy arrays (one host->device copy each later). The
        requests with one new token come first (`num_decode` of them, for the decode kernel);
        logits rows stay in the order of the batch's emitting requests."""
        if batch.decode_only and self.hybrid is None and FAST_DECODE_HOST:
            return self._flatten_decode(batch)
        ps, seqs, num_decode = batch.page_size, list(batch.seqs), 0
        if not batch.decode_only:
            order = sorted(range(len(seqs)), key=lambda i: seqs[i].num_new != 1)  # stable: one-token rows first
            seqs = [seqs[i] for i in order]
            num_decode = sum(1 for s in seqs if s.num_new == 1)
        b = len(seqs)
        starts = np.fromiter([s.start for s in seqs], np.int64, b)
        # token i of the flat batch: request rows[i], position pos[i] (vectorized: host time is
        # step time, and a 64-request decode step is only a few ms on the GPU)
        if batch.decode_only:  # one new token each (a decode batch: the step the graphs replay most)
            n_new = np.ones(b, np.int64)
            qsl = np.arange(b + 1, dtype=np.int64)
            tid = self._token_ids
            ids = np.fromiter([tid(s.request)[s.start] for s in seqs], np.int64, b)
            rows, pos = np.arange(b), starts
        else:
            n_new = np.fromiter([s.num_new for s in seqs], np.int64, b)
            qsl = np.zeros(b + 1, np.int64)
            np.cumsum(n_new, out=qsl[1:])
            ids = np.concatenate([self._token_ids(s.request)[s.start:s.start + s.num_new] for s in seqs])
            rows = np.repeat(np.arange(b), n_new)
            pos = np.arange(int(qsl[-1]), dtype=np.int64) + np.repeat(starts - qsl[:-1], n_new)
        seq_lens = starts + n_new
        if self.hybrid is None:
            table = _stack_tables([s.page_table for s in seqs])
        else:  # [num_tables, B, pages]: each table from the strategy, NULL entries proven unread
            t0 = time.perf_counter()
            table = self.hybrid.host_tables(self.strategy, seqs, starts, seq_lens)
            self.table_build_s += time.perf_counter() - t0
        # [T] or [num_tables, T] (C order: numpy's fancy indexing may return it transposed, and the
        # kernels read a slot mapping as contiguous)
        slots = (table[rows, pos // ps] if table.ndim == 2 else np.ascontiguousarray(table[:, rows, pos // ps]))
        slots = slots.astype(np.int64) * ps + pos % ps
        emit = np.array([i for i, s in enumerate(batch.seqs) if s.emits_token], np.int64)  # in the batch's order
        if not batch.decode_only:
            row = np.empty(b, np.int64)
            row[order] = np.arange(b)  # the batch's request i is row row[i]
            emit = row[emit]
        return HostBatch(ids, pos, slots, table, qsl, seq_lens, qsl[1:][emit] - 1, ps,
                         batch.contiguous and self.hybrid is None, batch.decode_only, num_decode,
                         None if self.hybrid is None else self.hybrid.layer_table)

    def _flatten_decode(self, batch: StepBatch) -> HostBatch:
        """`_flatten` of a decode-only batch (one table): one token a request, every request
        emits, rows in the batch's order; fewer numpy calls (the step the graphs replay most,
        whose host part is step time)."""
        ps, seqs = batch.page_size, batch.seqs
        b = len(seqs)
        fixed = self._decode_rows.get(b)
        if fixed is None:  # [b + 1] query starts, [b] rows (= the logits rows): never written
            fixed = self._decode_rows[b] = (np.arange(b + 1, dtype=np.int64), np.arange(b, dtype=np.int64))
        qsl, rows = fixed
        starts = [s.start for s in seqs]
        pos = np.array(starts, np.int64)
        known = self._ids
        try:
            ids = np.fromiter([known[s.request.id][p] for s, p in zip(seqs, starts)], np.int64, b)
        except KeyError:  # (a request's first step on this engine: its ids are made once)
            tid = self._token_ids
            ids = np.fromiter([tid(s.request)[p] for s, p in zip(seqs, starts)], np.int64, b)
        table = _stack_tables(list(map(_PAGE_TABLE, seqs)))
        page, off = np.divmod(pos, ps)
        slots = table[rows, page].astype(np.int64) * ps + off
        return HostBatch(ids, pos, slots, table, qsl, pos + 1, rows, ps, batch.contiguous, True, 0)

    def _token_ids(self, req) -> np.ndarray:
        ids = self._ids.get(req.id)
        if ids is None:  # (made once a request; `%` only where an id is out of range: a division an id costs)
            ids = self._ids[req.id] = req.token_ids().astype(np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
                ids %= self.cfg.vocab_size
        return ids

    def _host_list(self, t: torch.Tensor) -> list:
        """`t.tolist()` (the gpu engine waits for it its own way)."""
        return t.tolist()

    def _emit(self, batch: StepBatch, logits: torch.Tensor) -> None:
        emitting = batch.seqs if batch.decode_only else [s for s in batch.seqs if s.emits_token]
        if self.keep_logits:
            self.last_logits = LastLogits([s.request.id for s in emitting], logits)
        known = self._ids
        if self.sample:  # the token at position `end` (prompt_len + k) is output[k], a view of tokens
            for s, tok in zip(emitting, self._host_list(logits.argmax(dim=-1))):
                r, end = s.request, s.start + s.num_new
                r.tokens[end] = tok
                ids = known.get(r.id)
                (self._token_ids(r) if ids is None else ids)[end] = tok
        for s in emitting:
            if s.start + s.num_new >= s.request.kv_len:  # its last token: the request is done with this engine
                known.pop(s.request.id, None)
