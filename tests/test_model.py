"""The model runner against transformers, through the torch engine and hand-built StepBatches.

Each layout (slab / paged / radix page tables) must give the logits of a plain
`transformers` forward over the whole sequence, and the same greedy tokens.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")



from kvbench.batch import ScheduledSeq, StepBatch  # noqa: E402
from kvbench.engines.torch_engine import TorchEngine  # noqa: E402
from kvbench.model import ModelConfig, hf_tensor_map, kv_bytes_per_token, rope_inv_freq  # noqa: E402
from kvbench.request import Request  # noqa: E402
from model_drive import run_steps as drive  # noqa: E402  (tests/model_drive.py)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = 512
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # short, so scaling matters at test lengths
TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 on CPU, logits of magnitude ~1


def hf_llama(tie=False, bias=False, rope=LLAMA3, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, **(rope or {"rope_type": "default"})},
        tie_word_embeddings=tie, attention_bias=bias, initializer_range=0.2,
        max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    if bias:  # HF inits biases to zero: make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.data.normal_(0, 0.2)
    return model


def our_cfg(tie=False, rope=LLAMA3) -> ModelConfig:
    return ModelConfig.from_dict(dict(
        name="test", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
        num_kv_heads=2, head_dim=16, vocab_size=VOCAB, rope_theta=500000.0,
        rope_scaling=rope and {k: v for k, v in rope.items()}, rms_norm_eps=1e-5,
        tie_embeddings=tie, dtype="float32"))


def engine_like(hf, **kw) -> TorchEngine:
    """A TorchEngine holding `hf`'s weights (copied by HF name)."""
    eng = TorchEngine(model=our_cfg(tie=hf.config.tie_word_embeddings), keep_logits=True, **kw)
    sd = hf.state_dict()
    with torch.no_grad():
        for name, dst in hf_tensor_map(eng.model):
            dst.copy_(sd[name])
    return eng


def make_request(rid, prompt_len, output_len, seed) -> Request:
    rng = np.random.default_rng(seed)
    return Request(id=rid, arrival_s=0.0, prompt=rng.integers(0, VOCAB, prompt_len).astype(np.int32),
                   output=np.zeros(output_len, np.int32))


def hf_logits(hf, req: Request) -> torch.Tensor:
    """Logits for each output token of `req`: [output_len, vocab], from one full forward."""
    ids = torch.from_numpy(req.token_ids()[:req.kv_len].astype(np.int64))[None]
    with torch.no_grad():
        out = hf(input_ids=ids).logits[0]  # [kv_len, vocab]
    return out[req.prompt_len - 1:]


def layout(kind, reqs, seed=0):
    """Page tables per request, and (page_size, num_pages, contiguous), for each strategy's shape."""
    ps = {"slab": 16, "paged": 16, "radix": 1}[kind]
    need = [-(-r.kv_len // ps) for r in reqs]
    num_pages = sum(need) + 7
    if kind == "slab":  # one consecutive run each, with gaps between runs
        order, first, tables = np.arange(num_pages), 1, {}
        for r, n in zip(reqs, need):
            tables[r.id] = order[first:first + n]
            first += n + 2
    else:
        order = np.random.default_rng(seed).permutation(num_pages)
        tables, at = {}, 0
        for r, n in zip(reqs, need):
            tables[r.id] = order[at:at + n]
            at += n
    return tables, ps, num_pages, kind == "slab"


def three_requests():
    return [make_request(0, 21, 17, 1), make_request(1, 37, 17, 2), make_request(2, 5, 17, 3)]


@pytest.fixture(scope="module")
def hf():
    return hf_llama()


@pytest.fixture(scope="module")
def runs(hf):
    """Each layout driven once with greedy sampling: {kind: (requests, logits)}."""
    out = {}
    for kind in ("slab", "paged", "radix"):
        reqs = three_requests()
        tables, ps, num_pages, contig = layout(kind, reqs)
        out[kind] = reqs, drive(engine_like(hf, sample=True), reqs, tables, ps, num_pages, contig)
    return out


@pytest.mark.parametrize("kind", ["slab", "paged", "radix"])
def test_prefill_and_16_decodes_match_transformers(hf, runs, kind):
    reqs, logits = runs[kind]
    for r in reqs:
        assert logits[r.id].shape == (17, VOCAB)  # the prefill's token + 16 decodes
        torch.testing.assert_close(logits[r.id], hf_logits(hf, r), **TOL)
        assert (r.output == logits[r.id].argmax(-1).numpy()).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels on CPU need TRITON_INTERPRET=1 before triton is imported")
def test_triton_backend_in_interpreter_matches_transformers(hf, runs):
    reqs = three_requests()
    tables, ps, num_pages, contig = layout("paged", reqs)
    got = drive(engine_like(hf, sample=True, attention="triton"), reqs, tables, ps, num_pages, contig)
    for r, ref in zip(reqs, runs["paged"][0]):
        torch.testing.assert_close(got[r.id], hf_logits(hf, r), **TOL)
        np.testing.assert_array_equal(r.output, ref.output)


def test_greedy_outputs_identical_across_layouts(runs):
    base = [r.output for r in runs["slab"][0]]
    assert len(set(base[0].tolist())) > 1  # not a degenerate constant stream
    for kind in ("paged", "radix"):
        for a, r in zip(base, runs[kind][0]):
            np.testing.assert_array_equal(a, r.output)


def test_replay_mode_writes_nothing(hf):
    reqs = [make_request(0, 9, 4, 5)]
    reqs[0].output[:] = [7, 8, 9, 10]
    tables, ps, n, contig = layout("paged", reqs)
    logits = drive(engine_like(hf), reqs, tables, ps, n, contig)
    np.testing.assert_array_equal(reqs[0].output, [7, 8, 9, 10])
    torch.testing.assert_close(logits[0], hf_logits(hf, reqs[0]), **TOL)


@pytest.mark.parametrize("page_size,prefix_len", [(16, 32), (1, 23), (16, 23)])
def test_prefix_hit_matches_full_prefill(hf, page_size, prefix_len):
    """B's first `prefix_len` tokens are A's: B starts at `prefix_len` on A's pages. With a
    partial last page (16, 23) that page is copied first (copy-on-write), as paged does."""
    a, b = make_request(0, 40, 3, 7), make_request(1, 40, 5, 8)
    b.prompt[:prefix_len] = a.prompt[:prefix_len]
    ps = page_size
    na, nb = -(-a.kv_len // ps), -(-b.kv_len // ps)
    order = np.random.default_rng(3).permutation(na + nb + 4)
    ta = order[:na]
    shared, partial = prefix_len // ps, prefix_len % ps
    tb = np.concatenate([ta[:shared], order[na:na + nb - shared]])
    eng = engine_like(hf)
    drive(eng, [a], {0: ta}, ps, len(order), False)
    copies = {0: [(int(ta[shared]), int(tb[shared]))]} if partial else {}
    got = drive(eng, [b], {1: tb}, ps, len(order), False, starts={1: prefix_len}, copies=copies)
    fresh = make_request(1, 40, 5, 8)
    fresh.prompt[:] = b.prompt
    eng2 = engine_like(hf)
    full = drive(eng2, [fresh], {1: np.arange(nb)}, ps, nb, True)
    torch.testing.assert_close(got[1], full[1], **TOL)
    torch.testing.assert_close(got[1], hf_logits(hf, b), **TOL)


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = hf_llama().config
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(our_cfg())
    assert not torch.allclose(ours, rope_inv_freq(our_cfg(rope=None)))  # scaling does something
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_default_rope_matches_transformers():
    hf = hf_llama(rope=None, seed=4)
    eng = TorchEngine(model=our_cfg(rope=None), keep_logits=True)
    with torch.no_grad():
        for name, dst in hf_tensor_map(eng.model):
            dst.copy_(hf.state_dict()[name])
    r = make_request(0, 30, 3, 9)
    r.output[:] = [1, 2, 3]
    tables, ps, n, contig = layout("paged", [r])
    torch.testing.assert_close(drive(eng, [r], tables, ps, n, contig)[0], hf_logits(hf, r), **TOL)


@pytest.mark.parametrize("arch,tie,shard", [("llama", False, False), ("llama", True, True),
                                            ("llama_bias", False, True), ("qwen2", False, False)])
def test_checkpoint_loader(tmp_path, arch, tie, shard):
    if arch == "qwen2":
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            tie_word_embeddings=False, initializer_range=0.2)
        cfg._attn_implementation = "eager"
        hf = transformers.Qwen2ForCausalLM(cfg).eval()
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.data.normal_(0, 0.2)
    else:
        hf = hf_llama(tie=tie, bias=arch == "llama_bias", seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    mcfg = ModelConfig.from_hf(tmp_path, dtype="float32")
    assert mcfg.tie_embeddings == tie and mcfg.checkpoint == str(tmp_path)
    assert mcfg.attention_bias == (arch != "llama")
    assert mcfg.attention_out_bias == (arch == "llama_bias")
    eng = TorchEngine(model=mcfg, keep_logits=True)
    r = make_request(0, 25, 4, 11)
    r.output[:] = [5, 6, 7, 8]
    tables, ps, n, contig = layout("radix", [r])
    torch.testing.assert_close(drive(eng, [r], tables, ps, n, contig)[0], hf_logits(hf, r), **TOL)


def test_checkpoint_missing_or_misshaped_tensor_is_named(tmp_path):
    hf_llama(seed=2).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = safetensors_torch.load_file(f)
    cfg = ModelConfig.from_hf(tmp_path, dtype="float32")
    sd["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(96, 64)
    safetensors_torch.save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(128, 64\)"):
        TorchEngine(model=cfg)
    del sd["model.layers.1.mlp.up_proj.weight"]
    safetensors_torch.save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        TorchEngine(model=cfg)


def test_model_yaml_must_match_checkpoint_config(tmp_path):
    hf_llama(seed=2).save_pretrained(tmp_path)
    wrong = {**our_cfg().__dict__, "intermediate_size": 96, "checkpoint": str(tmp_path)}
    with pytest.raises(ValueError, match=r"intermediate_size.*\(96, 128\)"):
        TorchEngine(model=ModelConfig(**wrong))


def test_model_configs_and_kv_bytes():
    from omegaconf import OmegaConf
    expected = {"tiny": 2 * 2 * 2 * 16 * 4, "llama3_2_1b": 32768, "llama3_1_8b": 131072,
                "qwen2_5_7b": 57344}
    for name, kv in expected.items():
        cfg = ModelConfig.from_dict(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))
        assert cfg.name == name and kv_bytes_per_token(cfg) == kv
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**our_cfg().__dict__, "n_layers": 3})


def test_engine_configs_instantiate_on_tiny():
    """The yaml as Hydra composes it: `model: ${model}` resolved against the tiny group."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    root = OmegaConf.create({"model": OmegaConf.load(CONFIGS / "model" / "tiny.yaml"),
                             "engine": OmegaConf.load(CONFIGS / "engine" / "torch.yaml")})
    eng = instantiate(root.engine)
    assert isinstance(eng, TorchEngine) and eng.needs_layout and eng.cfg.vocab_size == 32000
    r = make_request(0, 6, 2, 12)
    r.prompt[:] += 31800  # some ids >= 32000: the engine takes them modulo vocab_size
    eng.bind(16, 4)
    eng.step(StepBatch([ScheduledSeq(r, 0, 6, np.array([2], np.int32))], 16, 4, True, []))
    gpu = OmegaConf.load(CONFIGS / "engine" / "gpu.yaml")
    assert gpu._target_ == "kvbench.engines.gpu_engine.GPUEngine" and gpu.attention == "triton"


@pytest.mark.parametrize("widths", [[5, 5, 5], [3, 7, 1], [130, 200, 129], [300, 1, 128], [1]])
def test_page_tables_stack_into_rows_padded_with_page_0(widths):
    """torch_engine._stack_tables: row i holds table i, then zeros to the widest, writable (ragged
    rows are joined as bytes; a row that is not a contiguous int32 array, which the join cannot
    take, is copied a row at a time: the same table)."""
    from kvbench.engines.torch_engine import _stack_tables
    rng = np.random.default_rng(len(widths))
    pts = [rng.integers(1, 1 << 20, n).astype(np.int32) for n in widths]
    odd = [pts[0].astype(np.int64), *pts[1:]], [np.repeat(pts[0], 2)[::2], *pts[1:]]  # int64; strided
    for rows in (pts, *odd):
        table = _stack_tables(rows)
        assert table.dtype == np.int32 and table.shape == (len(widths), max(widths)) and table.flags.writeable
        for row, pt in zip(table, pts):
            assert (row[:len(pt)] == pt).all() and not row[len(pt):].any()
