"""CUDA graphs of steps with prefill (gpu engine): a graph replay of a mixed step (prefill
chunks beside decodes, padded to its token bucket) computes what the eager step computes.
GPU only; CI tests the eager path on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbench.batch import ScheduledSeq, StepBatch
from kvbench.request import Request

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = dict(name="tiny-bf16", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
            head_dim=64, vocab_size=32000, rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=True,
            attention_bias=False, attention_out_bias=False, dtype="bfloat16", checkpoint=None)


def _drive(eng, reqs, chunk, graphs):
    """Toy schedule: request i joins at step i, prefill chunks of `chunk`, then decodes; returns
    every emitted row of logits (fp32) and the keys of the graphs used."""
    eng.cuda_graphs = graphs
    ps, pos, got, step = 16, {r.id: 0 for r in reqs}, [], 0
    tables = {r.id: np.arange(r.id * 64, r.id * 64 + 64, dtype=np.int32)[::-1].copy() for r in reqs}
    while any(pos[r.id] < r.kv_len for r in reqs):
        seqs = []
        for i, r in enumerate(reqs):
            s = pos[r.id]
            if step < i or s >= r.kv_len:
                continue
            n = min(chunk, r.prompt_len - s) if s < r.prompt_len else 1
            seqs.append(ScheduledSeq(r, s, n, tables[r.id][:-(-(s + n) // ps)]))
        eng.step(StepBatch(seqs, ps, eng.kv_pool.shape[2] // ps, False, []))
        got += [eng.last_logits[s.request.id].float().cpu() for s in seqs if s.emits_token]
        for s in seqs:
            pos[s.request.id] += s.num_new
        step += 1
    return got


def test_mixed_step_graphs_match_eager():
    from kvbench.engines.gpu_engine import GPUEngine
    eng = GPUEngine(TINY, kv_cache_gb=0.05, keep_logits=True, warmup=False, profile_tokens=256)
    eng.bind(16, eng.kv_capacity_tokens(None) // 16)
    rng = np.random.default_rng(0)
    reqs = [Request(i, 0.0, rng.integers(0, 32000, n).astype(np.int32), np.zeros(4, np.int32))
            for i, n in enumerate([70, 5, 33, 140])]
    eager = _drive(eng, reqs, chunk=24, graphs=False)
    graphed = _drive(eng, reqs, chunk=24, graphs=True)
    mixed = [k for k in eng._graphs if not k[4]]
    assert mixed, "no mixed-step graph was captured"
    assert len(eager) == len(graphed)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, atol=3e-2, rtol=3e-2)
        assert a.argmax() == b.argmax()
