"""The model runner with per-layer attention bounds (issue 16) against transformers' Qwen2 with
`layer_types` (a sliding-window layer, then a full one): HF's dense forward over the whole sequence
applies its sliding-window mask (key k visible to query p iff p - window < k <= p), ours runs
chunked prefill and decode through the paged pool with each layer's window passed to the
attention kernels (torch references; one short run through the Triton kernels in the interpreter)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvbench.engines.torch_engine import TorchEngine  # noqa: E402
from kvbench.model import ModelConfig, hf_tensor_map  # noqa: E402
from kvbench.request import Request  # noqa: E402
import model_drive  # noqa: E402  (tests/model_drive.py)
from model_drive import drive, hf_logits  # noqa: E402

VOCAB, WINDOW = 256, 6   # window smaller than the prompts and not a multiple of the page size


def hf_qwen2(window, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
        layer_types=["sliding_attention" if window else "full_attention", "full_attention"],
        initializer_range=0.3, max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.data.normal_(0, 0.2)
    return model


def our_cfg(window) -> ModelConfig:
    return ModelConfig.from_dict(dict(
        name="qwen2-sliding", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
        head_dim=8, vocab_size=VOCAB, rope_theta=10000.0, rms_norm_eps=1e-6, attention_bias=True,
        dtype="float32", layers={"pattern": ["local", "global"],
                                 "groups": {"local": {"kind": "sliding", "window": window},
                                            "global": {"kind": "full"}}}))


def engine_like(hf, window, attention="reference") -> TorchEngine:
    eng = TorchEngine(model=our_cfg(window), attention=attention, keep_logits=True)
    sd = hf.state_dict()
    with torch.no_grad():
        for name, dst in hf_tensor_map(eng.model):
            dst.copy_(sd[name])
    return eng


def request(rid, prompt_len, output_len, seed) -> Request:
    return model_drive.request(rid, prompt_len, output_len, seed, VOCAB)


@pytest.fixture(scope="module")
def hf():
    return hf_qwen2(WINDOW)


@pytest.mark.parametrize("page_size,contiguous", [(4, False), (1, False), (4, True)], ids=["page4", "page1", "slab4"])
def test_sliding_layers_match_transformers(hf, page_size, contiguous):
    reqs = [request(0, 13, 9, 1), request(1, 4, 12, 2), request(2, 9, 6, 3)]   # contexts past and inside the window
    eng = engine_like(hf, WINDOW)
    assert [(l.window, l.chunk) for l in eng.model.layers] == [(WINDOW, 0), (0, 0)]
    ours = drive(eng, reqs, page_size, contiguous)
    full = hf_qwen2(None)                      # same weights (same seed), no window: must differ
    for r in reqs:
        ref = hf_logits(hf, r)
        torch.testing.assert_close(ours[r.id], ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(ours[r.id].argmax(-1), ref.argmax(-1))    # greedy tokens
        if r.kv_len > WINDOW + 1:
            assert (hf_logits(full, r) - ref).abs().max() > 1e-2, "the window changes nothing: test is vacuous"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU model through Triton's interpreter, which a GPU "
                    "run does not load; there the bounds are checked at real shapes (test_kernel_attention_bounds)")
def test_sliding_layers_triton_kernels(hf):
    """The same through the Triton kernels (interpreter): one request past the window."""
    r = request(0, 11, 4, 4)
    ours = drive(engine_like(hf, WINDOW, attention="triton"), [r], 4, False, chunk=8)
    torch.testing.assert_close(ours[0], hf_logits(hf, r), rtol=1e-4, atol=1e-4)


def test_layers_the_runner_cannot_run_are_refused():
    state = dict(our_cfg(WINDOW).__dict__, layers={"pattern": ["s", "f"], "groups": {"s": {"kind": "state", "state_bytes": 8},
                                                                                    "f": {"kind": "full"}}})
    with pytest.raises(ValueError, match="state layer"):
        ModelConfig(**state).layer_bounds()
    heads = dict(our_cfg(WINDOW).__dict__, layers={"pattern": ["a"], "groups": {"a": {"kind": "full", "head_dim": 16}}})
    with pytest.raises(ValueError, match="one KV pool needs one shape"):
        ModelConfig(**heads).layer_bounds()
    with pytest.raises(ValueError, match="window"):
        ModelConfig(**dict(our_cfg(WINDOW).__dict__, layers={"pattern": ["a"], "groups": {"a": {"kind": "sliding"}}}))
