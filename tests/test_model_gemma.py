"""The model runner's Gemma-3 layers (arch: gemma3) against transformers' Gemma3ForCausalLM.

A tiny Gemma3TextConfig (4 layers: sliding, sliding, full, sliding; window 8) with random weights
(norm weights too: Gemma's x * (1 + w) must matter), saved and read back through
`ModelConfig.from_hf` / `load_checkpoint`. Requests longer than the window run through the torch
engine's paged KV path (chunked prefill in mixed steps, then decode steps, shuffled pages) and
every emitted step's logits must equal HF's dense forward over the whole sequence (fp32).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3ForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no Gemma3ForCausalLM", allow_module_level=True)

from kvbench.engines.torch_engine import TorchEngine  # noqa: E402
from kvbench.model import ModelConfig, kv_bytes_per_token, rope_params  # noqa: E402
from kvbench.request import Request  # noqa: E402
import model_drive  # noqa: E402  (tests/model_drive.py)
from model_drive import drive, hf_logits  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB, WINDOW = 512, 8
TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
TOL = dict(rtol=1e-4, atol=1e-4)  # fp32, logits of std ~1


def hf_gemma(seed=0, full_rope=None, softcap=None):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=len(TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=WINDOW, layer_types=TYPES, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6, **(full_rope or {})},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=softcap, initializer_range=0.1, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):  # HF inits them to 0 (x * (1 + 0)): make them matter
                p.normal_(0, 0.3)
    return model


def saved(hf, path: Path) -> ModelConfig:
    hf.save_pretrained(path)
    return ModelConfig.from_hf(path, dtype="float32")


def request(rid, prompt_len, output_len, seed) -> Request:
    return model_drive.request(rid, prompt_len, output_len, seed, VOCAB)


@pytest.fixture(scope="module")
def hf():
    return hf_gemma()


@pytest.fixture(scope="module")
def cfg(hf, tmp_path_factory):
    return saved(hf, tmp_path_factory.mktemp("gemma3"))


def test_from_hf_reads_gemma3(cfg):
    assert (cfg.arch, cfg.query_pre_attn_scalar, cfg.rope_theta, cfg.rope_local_theta) == ("gemma3", 24, 1e6, 1e4)
    assert cfg.tie_embeddings and cfg.final_logit_softcapping is None and cfg.rope_scaling is None
    assert cfg.layer_bounds() == ((WINDOW, 0), (WINDOW, 0), (0, 0), (WINDOW, 0))


def test_prefill_and_decodes_match_transformers(hf, cfg):
    reqs = [request(0, 19, 9, 1), request(1, 5, 12, 2), request(2, 11, 7, 3)]  # past and inside the window
    eng = TorchEngine(model=cfg, keep_logits=True)
    assert [layer.rope for layer in eng.model.layers] == ["sliding", "sliding", "full", "sliding"]
    ours = drive(eng, reqs)
    for r in reqs:
        ref = hf_logits(hf, r)
        assert ours[r.id].shape == (r.output_len, VOCAB) and ref.std() > 0.3
        torch.testing.assert_close(ours[r.id], ref, **TOL)
        assert torch.equal(ours[r.id].argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("field,value", [("query_pre_attn_scalar", None), ("rope_local_theta", None)])
def test_each_gemma_specific_matters(hf, cfg, field, value):
    """Not vacuous: the attention scale and the sliding layers' rope base change the logits."""
    r = request(0, 13, 3, 4)
    eng = TorchEngine(model=replace(cfg, checkpoint=None), keep_logits=True)
    ok = TorchEngine(model=cfg, keep_logits=True)
    eng.model.load_state_dict(ok.model.state_dict())
    off = TorchEngine(model=replace(cfg, checkpoint=None, **{field: value}), keep_logits=True)
    off.model.load_state_dict(ok.model.state_dict())
    ref = hf_logits(hf, r)
    torch.testing.assert_close(drive(eng, [r])[0], ref, **TOL)
    assert (drive(off, [r])[0] - ref).abs().max() > 1e-2


def test_linear_rope_scaling_and_logit_softcap(tmp_path):
    """Gemma-3 4B+ scale the full layers' rope linearly; final_logit_softcapping (Gemma-2 style)."""
    hf = hf_gemma(seed=5, full_rope={"rope_type": "linear", "factor": 4.0}, softcap=3.0)
    cfg = saved(hf, tmp_path)
    assert cfg.rope_scaling.rope_type == "linear" and cfg.final_logit_softcapping == 3.0
    r = request(0, 14, 3, 6)
    ours, ref = drive(TorchEngine(model=cfg, keep_logits=True), [r])[0], hf_logits(hf, r)
    assert ref.abs().max() < 3.0 and ref.abs().max() > 2.0  # the cap is active
    torch.testing.assert_close(ours, ref, **TOL)
    for sliding in (False, True):  # the frequencies, against HF's own
        ref_inv = hf.model.rotary_emb.__getattr__(f"{'sliding' if sliding else 'full'}_attention_inv_freq")
        torch.testing.assert_close(rope_params(cfg, sliding)[0], ref_inv, rtol=1e-6, atol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py)")
def test_triton_kernels_match_transformers(hf, cfg):
    r = request(0, 11, 2, 7)  # one prefill past the window, one decode
    ours = drive(TorchEngine(model=cfg, attention="triton", keep_logits=True), [r], chunk=11)
    torch.testing.assert_close(ours[0], hf_logits(hf, r), **TOL)


def test_gemma3_1b_yaml_matches_the_hub_config(tmp_path):
    """configs/model/gemma3_1b_like.yaml is google/gemma-3-1b-pt's config.json (hub format:
    rope_local_base_freq, sliding_window_pattern, no layer_types) but for name and checkpoint; its
    KV bytes per token are unchanged (22 sliding + 4 global layers x 1 KV head x 256 x K,V x bf16)."""
    from omegaconf import OmegaConf
    hub = {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
           "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
           "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
           "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
           "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
           "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
           "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    ours = ModelConfig.from_dict(OmegaConf.load(CONFIGS / "model" / "gemma3_1b_like.yaml"))
    theirs = ModelConfig.from_hf(tmp_path)
    assert replace(theirs, name=ours.name, checkpoint=None, layers=ours.layers) == ours
    assert theirs.layer_bounds() == ours.layer_bounds()
    assert kv_bytes_per_token(ours) == 26 * 2 * 256 * 2
