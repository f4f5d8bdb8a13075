"""The toy scheduler of the model tests (no strategy): requests with random ids, driven through an
engine step by step against transformers' logits of the same ids."""
from __future__ import annotations

import numpy as np
import torch

from kvbench.batch import ScheduledSeq, StepBatch
from kvbench.request import Request


def request(rid, prompt_len, output_len, seed, vocab) -> Request:
    rng = np.random.default_rng(seed)
    return Request(id=rid, arrival_s=0.0, prompt=rng.integers(0, vocab, prompt_len).astype(np.int32),
                   output=rng.integers(0, vocab, output_len).astype(np.int32))


def hf_logits(hf, req) -> torch.Tensor:
    """transformers' logits of the request's ids, from its last prompt position on."""
    ids = torch.from_numpy(req.token_ids()[:req.kv_len].astype(np.int64))[None]
    with torch.no_grad():
        return hf(input_ids=ids).logits[0][req.prompt_len - 1:]


def run_steps(eng, reqs, tables, page_size, num_pages, contiguous, chunk=8, stagger=3, starts=None,
              copies=None) -> dict[int, torch.Tensor]:
    """A toy scheduler over given page tables: request i joins at step i*stagger; prefill in chunks
    of `chunk` (mixed with the others' decodes), then one decode a step; `starts` = positions already
    computed per request, `copies` = a step's copy-on-write list. Returns {id: [output_len, vocab]}
    of the emitted steps' logits."""
    if eng.kv_pool is None:
        eng.bind(page_size, num_pages)
    pos = {r.id: (starts or {}).get(r.id, 0) for r in reqs}
    got: dict[int, list[torch.Tensor]] = {r.id: [] for r in reqs}
    step = 0
    while any(pos[r.id] < r.kv_len for r in reqs):
        seqs = []
        for i, r in enumerate(reqs):
            s = pos[r.id]
            if step >= i * stagger and s < r.kv_len:
                n = min(chunk, r.prompt_len - s) if s < r.prompt_len else 1
                seqs.append(ScheduledSeq(r, s, n, np.asarray(tables[r.id][:-(-(s + n) // page_size)], np.int32)))
        if seqs:
            eng.step(StepBatch(seqs, page_size, num_pages, contiguous, (copies or {}).get(step, [])))
            for sq in seqs:
                pos[sq.request.id] += sq.num_new
                if sq.emits_token:
                    got[sq.request.id].append(eng.last_logits[sq.request.id].clone())
        step += 1
    return {rid: torch.stack(v) for rid, v in got.items()}


def drive(eng, reqs, page_size=4, contiguous=False, chunk=5, seed=0) -> dict[int, torch.Tensor]:
    """run_steps with request i joining at step i, over pages a shuffled (paged) or consecutive
    (slab) run of a pool just large enough."""
    need = [-(-r.kv_len // page_size) for r in reqs]
    num_pages = sum(need) + 3
    order = np.arange(num_pages) if contiguous else np.random.default_rng(seed).permutation(num_pages)
    tables, at = {}, 1
    for r, n in zip(reqs, need):
        tables[r.id], at = order[at:at + n], at + n + (1 if contiguous else 0)
    return run_steps(eng, reqs, tables, page_size, num_pages, contiguous, chunk=chunk, stagger=1)
