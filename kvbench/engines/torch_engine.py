"""`engine=torch`: the real model, executed on each StepBatch (CPU + reference attention by default).

Per step: swap-outs (pages to host tensors) -> copy-on-write page copies -> swap-ins (host tensors
back into the pages the request holds now) -> flatten the batch -> model forward -> (sample=true) greedy
ids into the requests' outputs. Replay mode (the default) feeds the trace's own tokens and writes
nothing, so every strategy and engine sees the same token stream.

Token ids are taken modulo `vocab_size` before embedding, so a trace whose ids run past a small
model's vocabulary (traces use [0, 32000) by default) still runs; every shipped config has
vocab_size >= 32000, where this is the identity.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from kvbench.batch import StepBatch, SwapIn, SwapOut
from kvbench.engines.base import Engine
from kvbench.kernels.page_copy import page_move
from kvbench.model import DTYPES, AttnMetadata, ModelConfig, as_model_config, build_model


@dataclass(slots=True)
class HostBatch:
    """One step's flat batch on the host (numpy), before it becomes tensors + AttnMetadata."""

    ids: np.ndarray  # [T] int64 token ids (mod vocab)
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    page_table: np.ndarray  # [B, max_pages] int32
    query_start_loc: np.ndarray  # [B+1] int64
    seq_lens: np.ndarray  # [B] int64
    logits_idx: np.ndarray  # [B_emit] int64
    page_size: int
    contiguous: bool
    decode_only: bool
    num_decode: int = 0  # leading requests with one new token (a mixed step's decode-kernel rows)

    def to_device(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        def t(x, dtype):
            return torch.from_numpy(x).to(device=dev, dtype=dtype, non_blocking=True)

        meta = AttnMetadata(
            t(self.slot_mapping, torch.int64), t(self.page_table, torch.int32),
            t(self.query_start_loc, torch.int32), t(self.seq_lens, torch.int32),
            t(self.logits_idx, torch.int64), self.page_size, self.contiguous, self.decode_only,
            int(self.seq_lens.max()), self.num_decode,
            t(self.query_start_loc[self.num_decode:] - self.num_decode, torch.int32) if self.num_decode else None)
        return t(self.ids, torch.int64), t(self.positions, torch.int64), meta


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
        self.page_size = 0
        self.last_logits: dict[int, torch.Tensor] = {}
        self._ids: dict[int, np.ndarray] = {}  # request id -> prompt ++ output (int64, mod vocab)
        self._swapped: dict[int, torch.Tensor] = {}  # request id -> its pages [P, L, 2, page_size, H_kv, D] on the host
        self._host_tier: torch.Tensor | None = None  # [host pages so far, L, 2, page_size, H_kv, D], row = host page id
        self.steps = 0

    # ---- contract -------------------------------------------------------------------------
    def bind(self, page_size: int, num_pages: int) -> None:
        c = self.cfg
        self.page_size = page_size
        self.kv_pool = torch.zeros(c.num_layers, 2, num_pages * page_size, c.num_kv_heads,
                                   c.head_dim, dtype=DTYPES[c.dtype], device=self.device)

    def step(self, batch: StepBatch) -> float:
        t0 = time.perf_counter()
        self._run(batch)
        return time.perf_counter() - t0

    def summary(self) -> dict:
        pool = 0 if self.kv_pool is None else self.kv_pool.numel() * self.kv_pool.element_size()
        return {"device": str(self.device), "model": self.cfg.name,
                "attention_backend": self.model.ops.backend, "kv_pool_bytes": pool,
                "weight_bytes": self.model.weight_bytes()}

    # ---- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, batch: StepBatch) -> None:
        if self.kv_pool is None or batch.page_size != self.page_size:
            raise RuntimeError(f"engine '{self.name}': step before bind(), or page_size "
                               f"{batch.page_size} != bound {self.page_size}")
        if batch.swap_out:  # first: a page a victim released may be written again in this step
            self._swap_out(batch.swap_out)
        if batch.host_copies:  # the host tier's, in order (a page evicted to host may be taken again)
            self._host_tier_copies(batch.host_copies)
        if batch.copies:  # copy-on-write, before anything reads or writes those pages
            src, dst = (torch.tensor(x, dtype=torch.int64, device=self.device)
                        for x in zip(*batch.copies))
            self.model.ops.page_copy(self.kv_pool, src, dst, self.page_size)
        if batch.swap_in:
            self._swap_in(batch.swap_in)
        if not batch.seqs:
            return
        if any(s.page_table is None for s in batch.seqs):
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
        return self.model(ids, positions, meta, self.kv_pool)

    def _flatten(self, batch: StepBatch) -> HostBatch:
        """StepBatch -> the flat batch as numpy arrays (one host->device copy each later). The
        requests with one new token come first (`num_decode` of them, for the decode kernel);
        logits rows stay in the order of the batch's emitting requests."""
        ps, order, num_decode = batch.page_size, list(range(len(batch.seqs))), 0
        if not batch.decode_only:
            order.sort(key=lambda i: batch.seqs[i].num_new != 1)  # stable: one-token rows first
            num_decode = sum(1 for s in batch.seqs if s.num_new == 1)
        seqs = [batch.seqs[i] for i in order]
        n_new = np.fromiter((s.num_new for s in seqs), np.int64, len(seqs))
        starts = np.fromiter((s.start for s in seqs), np.int64, len(seqs))
        qsl = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(n_new, out=qsl[1:])
        seq_lens = starts + n_new
        table = np.zeros((len(seqs), max(len(s.page_table) for s in seqs)), np.int32)
        for b, s in enumerate(seqs):
            table[b, :len(s.page_table)] = s.page_table  # rows padded with page 0, never read
        # token i of the flat batch: request rows[i], position pos[i] (vectorized: host time is
        # step time, and a 64-request decode step is only a few ms on the GPU)
        rows = np.repeat(np.arange(len(seqs)), n_new)
        pos = np.arange(int(qsl[-1]), dtype=np.int64) + np.repeat(starts - qsl[:-1], n_new)
        slots = table[rows, pos // ps].astype(np.int64) * ps + pos % ps
        ids = [self._token_ids(s.request)[s.start:s.start + s.num_new] for s in seqs]
        row = np.empty(len(order), np.int64)
        row[order] = np.arange(len(order))  # the batch's request i is row row[i]
        emit = row[[i for i, s in enumerate(batch.seqs) if s.emits_token]]  # in the batch's order
        return HostBatch(np.concatenate(ids), pos, slots, table,
                         qsl, seq_lens, qsl[1:][emit] - 1, ps, batch.contiguous,
                         batch.decode_only, num_decode)

    def _token_ids(self, req) -> np.ndarray:
        ids = self._ids.get(req.id)
        if ids is None:
            ids = self._ids[req.id] = req.token_ids().astype(np.int64) % self.cfg.vocab_size
        return ids

    def _emit(self, batch: StepBatch, logits: torch.Tensor) -> None:
        emitting = [s for s in batch.seqs if s.emits_token]
        if self.keep_logits:
            self.last_logits = {s.request.id: logits[i] for i, s in enumerate(emitting)}
        if self.sample:
            tokens = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(emitting):
            r, end = s.request, s.start + s.num_new
            if self.sample:  # the token at position `end` (prompt_len + k) is output[k]
                r.output[end - r.prompt_len] = tokens[i]
                self._token_ids(r)[end] = tokens[i]
            if end >= r.kv_len:  # its last token: the request is done with this engine
                self._ids.pop(r.id, None)
