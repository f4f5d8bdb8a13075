"""The model runner's gpt-oss layers (arch: gpt_oss) against transformers' GptOssForCausalLM, and
attention sinks in the Triton decode / extend kernels against their torch references.

A tiny GptOssConfig (4 layers alternating sliding (window 8) / full, 4 experts, top-2, YaRN rope
as gpt-oss-20b's, a small swiglu_limit so the clamps bite) with random weights (sinks and norms
too), saved and read back through `ModelConfig.from_hf` / `load_checkpoint`. Requests longer than
the window run through the torch engine's paged KV path (chunked prefill in mixed steps, then
decodes, shuffled pages); every emitted step's logits must equal HF's dense forward (fp32).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kvbench.kernels.decode_attention import decode_attention
from kvbench.kernels.extend_attention import extend_attention

from kvbench.engines.torch_engine import TorchEngine
from kvbench.model import ModelConfig, kv_bytes_per_token, rope_params

try:  # the kernel tests need no transformers
    import transformers
    HAS_GPT_OSS = hasattr(transformers, "GptOssForCausalLM") and hasattr(transformers, "Gemma3ForCausalLM")
    WHY = f"transformers {transformers.__version__} has no GptOssForCausalLM"
except ImportError:
    HAS_GPT_OSS, WHY = False, "transformers is not installed"
needs_hf = pytest.mark.skipif(not HAS_GPT_OSS, reason=WHY)
if HAS_GPT_OSS:  # the same toy scheduler and requests (VOCAB 512)
    from test_model_gemma import drive, hf_logits, request

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB, WINDOW = 512, 8
TOL = dict(rtol=1e-4, atol=1e-4)
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 4096, "rope_theta": 150000.0}


def hf_gpt_oss(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters=dict(YARN), swiglu_limit=1.0, rms_norm_eps=1e-5, initializer_range=0.2,
        max_position_embeddings=256, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
            elif n.endswith("sinks"):
                p.normal_(0.0, 1.5)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


# ---------------------------------------------------------------------------- sinks in the kernels
def _paged(seed=0, lens=(13, 3, 40), hq=4, hkv=2, d=16, ps=4):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // ps) for n in lens)
    pages = len(lens) * width + 2
    kc, vc = torch.randn(pages * ps, hkv, d, generator=g), torch.randn(pages * ps, hkv, d, generator=g)
    pt = torch.randperm(pages, generator=g)[:len(lens) * width].reshape(len(lens), width).int()
    return kc, vc, pt, torch.tensor(lens).int(), torch.randn(hq, generator=g) * 2, ps


def _dense_attention(q, k, v, pos, sinks, window=0):
    """HF gpt-oss's eager attention for one request: q [M, H, D] at positions `pos`, k/v [n, Hkv, D]."""
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("mhd,nhd->hmn", q, k.repeat_interleave(g, 1)) * q.shape[-1] ** -0.5
    keys = torch.arange(k.shape[0])[None, :]
    vis = (keys <= pos[:, None]) & ((keys > pos[:, None] - window) if window else True)
    s = s.masked_fill(~vis[None], float("-inf"))
    logits = torch.cat([s, sinks[:, None, None].expand(-1, s.shape[1], 1)], -1)
    p = torch.softmax(logits - logits.max(-1, keepdim=True).values, -1)[..., :-1]
    return torch.einsum("hmn,nhd->mhd", p, v.repeat_interleave(g, 1))


@pytest.mark.parametrize("kw", [{}, {"num_splits": 2}, {"window": 5},
                                {"num_splits": 2, "config": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1,
                                                             "FUSED_MERGE": 1}}],
                         ids=["plain", "split", "window", "fused-merge"])
def test_decode_sinks_match_reference(kw):
    kc, vc, pt, sl, sinks, ps = _paged()
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1))
    w = kw.get("window", 0)
    ref = decode_attention(q, kc, vc, pt, sl, ps, backend="torch", sinks=sinks, window=w)
    for b, n in enumerate(sl.tolist()):  # the reference is HF's formula
        slots = (pt[b, torch.arange(n) // ps] * ps + torch.arange(n) % ps).long()
        dense = _dense_attention(q[b:b + 1], kc[slots], vc[slots], torch.tensor([n - 1]), sinks, w)[0]
        torch.testing.assert_close(ref[b], dense, rtol=1e-5, atol=1e-5)
    no_sink = decode_attention(q, kc, vc, pt, sl, ps, backend="torch", window=w)
    assert (ref - no_sink).abs().max() > 0.1  # the sinks matter
    torch.testing.assert_close(decode_attention(q, kc, vc, pt, sl, ps, sinks=sinks, **kw), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_attention(q, kc, vc, pt, sl, ps, **kw), no_sink, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"prefix_splits": 2}, {"window": 4}], ids=["plain", "split", "window"])
def test_extend_sinks_match_reference(kw):
    kc, vc, pt, sl, sinks, ps = _paged(seed=2)
    qsl = torch.tensor([0, 5, 8, 17]).int()  # new tokens 5, 3, 9 over prefixes 8, 0, 31
    q = torch.randn(17, 4, 16, generator=torch.Generator().manual_seed(3))
    w = kw.get("window", 0)
    ref = extend_attention(q, kc, vc, pt, qsl, sl, ps, backend="torch", sinks=sinks, window=w)
    b, n = 0, int(sl[0])
    slots = (pt[b, torch.arange(n) // ps] * ps + torch.arange(n) % ps).long()
    dense = _dense_attention(q[0:5], kc[slots], vc[slots], torch.arange(n - 5, n), sinks, w)
    torch.testing.assert_close(ref[0:5], dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extend_attention(q, kc, vc, pt, qsl, sl, ps, sinks=sinks, **kw), ref,
                               rtol=1e-5, atol=1e-5)
    k_new = torch.empty(17, 2, 16)  # the ragged path: the new tokens' K/V from their own rows
    v_new = torch.empty_like(k_new)
    for b, (qs, qe) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        pos = torch.arange(int(sl[b]) - (qe - qs), int(sl[b]))
        slots = (pt[b, pos // ps] * ps + pos % ps).long()
        k_new[qs:qe], v_new[qs:qe] = kc[slots], vc[slots]
    torch.testing.assert_close(extend_attention(q, kc, vc, pt, qsl, sl, ps, sinks=sinks, k_new=k_new, v_new=v_new,
                                                **kw), ref, rtol=1e-5, atol=1e-5)


def test_bad_sinks_are_refused():
    kc, vc, pt, sl, sinks, ps = _paged()
    with pytest.raises(ValueError, match=r"sinks must be \[H_q=4\]"):
        decode_attention(torch.randn(3, 4, 16), kc, vc, pt, sl, ps, sinks=sinks[:3])


# ---------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def hf():
    if not HAS_GPT_OSS:
        pytest.skip(WHY)
    return hf_gpt_oss()


@pytest.fixture(scope="module")
def cfg(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    hf.save_pretrained(path)
    return ModelConfig.from_hf(path, dtype="float32")


@needs_hf
def test_from_hf_reads_gpt_oss(hf, cfg):
    assert (cfg.arch, cfg.num_experts, cfg.experts_per_token, cfg.swiglu_limit) == ("gpt_oss", 4, 2, 1.0)
    assert cfg.attention_bias and cfg.attention_out_bias and not cfg.tie_embeddings
    assert cfg.layer_bounds() == ((WINDOW, 0), (0, 0)) * 2
    inv, scale = rope_params(cfg)
    assert cfg.rope_scaling.rope_type == "yarn" and not cfg.rope_scaling.truncate
    torch.testing.assert_close(inv, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert scale == pytest.approx(hf.model.rotary_emb.attention_scaling) and scale > 1.3


@needs_hf
def test_prefill_and_decodes_match_transformers(hf, cfg):
    reqs = [request(0, 19, 9, 1), request(1, 5, 12, 2), request(2, 11, 7, 3)]
    ours = drive(TorchEngine(model=cfg, keep_logits=True), reqs)
    for r in reqs:
        ref = hf_logits(hf, r)
        assert ours[r.id].shape == (r.output_len, VOCAB) and ref.std() > 0.3
        torch.testing.assert_close(ours[r.id], ref, **TOL)
        assert torch.equal(ours[r.id].argmax(-1), ref.argmax(-1))


@needs_hf
def test_sinks_and_clamps_matter(hf, cfg):
    """Not vacuous: zeroing the sinks' effect (-inf) or lifting the clamp changes the logits;
    the MoE's dense path (CUDA graph capture) gives the sparse path's values."""
    ok = TorchEngine(model=cfg, keep_logits=True)
    r = request(0, 13, 3, 4)
    ref = hf_logits(hf, r)
    for change in ({"swiglu_limit": 100.0}, "no sinks"):
        eng = TorchEngine(model=replace(cfg, checkpoint=None, **(change if isinstance(change, dict) else {})),
                          keep_logits=True)
        eng.model.load_state_dict(ok.model.state_dict())
        if change == "no sinks":
            for layer in eng.model.layers:
                layer.sinks.fill_(float("-inf"))
        assert (drive(eng, [r])[0] - ref).abs().max() > 1e-2, change
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    moe = ok.model.layers[1].moe
    torch.testing.assert_close(moe(x, dense=True), moe(x, dense=False), rtol=1e-6, atol=1e-6)


@needs_hf
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py)")
def test_triton_kernels_match_transformers(hf, cfg):
    r = request(0, 11, 2, 7)  # one prefill past the window, one decode
    ours = drive(TorchEngine(model=cfg, attention="triton", keep_logits=True), [r], chunk=11)
    torch.testing.assert_close(ours[0], hf_logits(hf, r), **TOL)


def test_gpt_oss_yaml_matches_the_hub_config(tmp_path):
    """configs/model/gpt_oss_like.yaml is openai/gpt-oss-20b's config.json but for name,
    checkpoint and dtype (the checkpoint's experts are MXFP4); KV bytes per token unchanged
    (24 layers x 8 KV heads x 64 x K,V x bf16)."""
    from omegaconf import OmegaConf
    hub = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "experts_per_token": 4, "head_dim": 64,
           "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
           "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
           "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
           "num_key_value_heads": 8, "num_local_experts": 32, "rms_norm_eps": 1e-05,
           "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
           "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
           "vocab_size": 201088, "quantization_config": {"quant_method": "mxfp4"}}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    ours = ModelConfig.from_dict(OmegaConf.load(CONFIGS / "model" / "gpt_oss_like.yaml"))
    theirs = ModelConfig.from_hf(tmp_path, dtype="bfloat16")
    assert replace(theirs, name=ours.name, checkpoint=None, layers=ours.layers) == ours
    assert theirs.layer_bounds() == ours.layer_bounds()
    assert kv_bytes_per_token(ours) == 24 * 2 * 8 * 64 * 2
