"""kvbench.sizes: exact KV bytes of every shipped model, one dtype table that every reader shares
(fp8 included), the pool geometry's invariants, and no torch import."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from kvbench import sizes
from kvbench.run import run
from kvbench.schema import CHOICES, ConfigError, register, validate
from kvbench.sizes import LayerGroup, PoolGeometry, kv_bytes_per_token

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# by hand from configs/model/*.yaml: 2 (K, V) x layers x kv_heads x head_dim x dtype bytes
LLAMAS = {"llama3_1_8b": 2 * 32 * 8 * 128 * 2,   # 131072, bfloat16
          "llama3_2_1b": 2 * 16 * 8 * 64 * 2,    # 32768, bfloat16
          "qwen2_5_7b": 2 * 28 * 4 * 128 * 2,    # 57344, bfloat16
          "tiny": 2 * 2 * 2 * 16 * 4}            # 512, float32
# models with layer groups (issue 16): (label, kind, layers, bytes per token, window/chunk/state bytes)
GROUPS = {"gemma3_1b_like": [("local", "sliding", 22, 2 * 22 * 1 * 256 * 2, 512),
                             ("global", "full", 4, 2 * 4 * 256 * 2, 0)],
          "gpt_oss_like": [("sliding", "sliding", 12, 2 * 12 * 8 * 64 * 2, 128),
                           ("full", "full", 12, 2 * 12 * 8 * 64 * 2, 0)],
          "hybrid_like": [("linear", "state", 36, 0, 1114112), ("full", "full", 12, 2 * 12 * 2 * 256 * 2, 0)]}
SHIPPED = {**LLAMAS, "gemma3_1b_like": 26624, "gpt_oss_like": 49152, "hybrid_like": 24576}


def shipped(name: str):
    return OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")


def composed(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


def test_every_shipped_model_has_its_hand_computed_bytes_per_token():
    assert sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")) == sorted(SHIPPED)  # a new yaml: add it
    for name, expect in SHIPPED.items():
        assert kv_bytes_per_token(shipped(name)) == expect, name
        assert kv_bytes_per_token(OmegaConf.to_container(shipped(name))) == expect, name  # a plain dict too


def test_the_torch_model_reads_the_same_sizes():
    torch = pytest.importorskip("torch")
    from kvbench import model

    assert model.kv_bytes_per_token is sizes.kv_bytes_per_token
    for name, expect in LLAMAS.items():  # (the model runner's layer kinds: its own tests)
        cfg = model.ModelConfig.from_dict(shipped(name))
        assert model.kv_bytes_per_token(cfg) == expect, name
    for name, dtype in model.DTYPES.items():  # the model's torch dtypes agree with the byte table
        assert dtype.itemsize == sizes.DTYPE_BYTES[name], name
    for name, nbytes in sizes.DTYPE_BYTES.items():  # every name is torch's own name of that dtype
        assert getattr(torch, name).itemsize == nbytes, name


@pytest.mark.parametrize("dtype", ["fp8", "float8", "float8_e4m3fn", "float8_e5m2"])
def test_fp8_is_one_byte_for_every_reader(dtype):
    cfg = composed("model=llama3_1_8b", f"model.dtype={dtype}")
    validate(cfg)  # the schema accepts the name ...
    assert dtype in CHOICES[("model", "dtype")]
    assert sizes.dtype_bytes(dtype) == 1  # ... and sizes give it one byte
    assert kv_bytes_per_token(cfg.model) == SHIPPED["llama3_1_8b"] // 2 == 65536
    assert sizes.layer_groups(cfg.model)[0].dtype in ("float8_e4m3fn", "float8_e5m2")  # aliases resolved


def test_aliases_mean_e4m3_and_unknown_names_are_refused_with_the_list():
    assert sizes.canonical_dtype("fp8") == sizes.canonical_dtype("float8") == "float8_e4m3fn"
    assert set(sizes.DTYPE_NAMES) == set(sizes.DTYPE_BYTES) | set(sizes.DTYPE_ALIASES)
    with pytest.raises(ValueError, match=r"dtype 'int4': must be one of bfloat16, float16, float32, "
                                         r"float8_e4m3fn, float8_e5m2 \(aliases: float8 = float8_e4m3fn"):
        sizes.dtype_bytes("int4")
    with pytest.raises(ConfigError, match=r"^model.dtype='fp4': must be one of bfloat16"):
        validate(composed("model.dtype=fp4"))


def test_the_torch_model_refuses_fp8_saying_it_sizes_the_sim_only():
    pytest.importorskip("torch")
    from kvbench.model import ModelConfig

    with pytest.raises(ValueError, match=r"dtype 'fp8' not in \['bfloat16', 'float16', 'float32'\] .*sim"):
        ModelConfig.from_dict({**OmegaConf.to_container(shipped("tiny")), "dtype": "fp8"})


dims = st.integers(1, 4096)


@given(page_size=st.integers(1, 512), num_pages=st.integers(1, 2**31 - 1), layers=st.integers(1, 128),
       heads=st.integers(1, 64), head_dim=dims, dtype=st.sampled_from(sizes.DTYPE_NAMES))
def test_geometry_invariants(page_size, num_pages, layers, heads, head_dim, dtype):
    model = {"num_layers": layers, "num_kv_heads": heads, "head_dim": head_dim, "dtype": dtype}
    pool = PoolGeometry.of(model, page_size, num_pages)
    bpt = 2 * layers * heads * head_dim * sizes.dtype_bytes(dtype)
    assert pool.bytes_per_token == bpt == kv_bytes_per_token(model)
    assert pool.capacity_tokens == num_pages * page_size
    assert pool.bytes_per_page == page_size * bpt
    assert pool.capacity_bytes == pool.capacity_tokens * bpt == num_pages * pool.bytes_per_page
    assert len(pool.groups) == 1 and pool.groups[0].kind == "full"


def test_geometry_sums_its_groups_and_is_frozen():
    full = LayerGroup("full", 2, 2, 16, "float32")  # 512 B/token
    other = LayerGroup("sliding", 1, 1, 8, "float8_e5m2", window=4)  # 16 B/token
    pool = PoolGeometry(page_size=4, num_pages=3, groups=(full, other))
    assert (pool.bytes_per_token, pool.bytes_per_page, pool.capacity_tokens, pool.capacity_bytes) == (528, 2112, 12, 6336)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.num_pages = 4  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, match", [
    (dict(page_size=0, num_pages=1), "page_size=0 must be an integer >= 1"),
    (dict(page_size=1, num_pages=0), "num_pages=0 must be an integer >= 1"),
    (dict(page_size=1.5, num_pages=1), "page_size=1.5 must be an integer >= 1"),
    (dict(page_size=1, num_pages=1, groups=()), "groups=\\(\\) must be a non-empty tuple"),
])
def test_a_bad_geometry_is_refused(kwargs, match):
    kwargs.setdefault("groups", (LayerGroup("full", 1, 1, 1, "bfloat16"),))
    with pytest.raises(ValueError, match=match):
        PoolGeometry(**kwargs)
    with pytest.raises(ValueError, match="head_dim=0 must be an integer >= 1"):
        LayerGroup("full", 1, 1, 0, "bfloat16")
    with pytest.raises(ValueError, match="dtype 'fp8' must be one of"):
        LayerGroup("full", 1, 1, 1, "fp8")  # a group holds the canonical name only


@pytest.mark.parametrize("dtype, bpt", [("bfloat16", 131072), ("fp8", 65536)])
def test_a_sim_run_reports_the_geometry(tmp_path, dtype, bpt):
    # 1 GiB of pool in pages of 16: capacity rounds down to whole pages
    s = run(composed("model=llama3_1_8b", f"model.dtype={dtype}", "kv_capacity_gb=1", "kv_capacity_tokens=null",
                     "trace.num_requests=5", "strategy=paged", "strategy.page_size=16"), tmp_path)
    tokens = (2**30 // bpt) // 16 * 16
    assert (s["kv_bytes_per_token"], s["kv_capacity_tokens"], s["kv_capacity_bytes"]) == (bpt, tokens, tokens * bpt)


def test_importing_sizes_does_not_import_torch():
    code = "import sys, kvbench.sizes; print(sorted(m for m in ('torch', 'numpy', 'hydra') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_layer_groups_of_every_shipped_model():
    for name in LLAMAS:  # one full-attention group, as before issue 16
        (g,) = sizes.layer_groups(shipped(name))
        assert (g.kind, g.window, g.chunk, g.state_bytes, g.name) == ("full", 0, 0, 0, "")
        assert not PoolGeometry.of(shipped(name), 16, 4).hybrid
    for name, expect in GROUPS.items():
        got = [(g.label, g.kind, g.num_layers, g.bytes_per_token, g.window or g.chunk or g.state_bytes)
               for g in sizes.layer_groups(shipped(name))]
        assert got == expect, name
    hybrid = PoolGeometry.of(shipped("hybrid_like"), 16, 4)
    assert hybrid.hybrid and hybrid.state_bytes_per_request == 36 * 1114112
    gemma = PoolGeometry.of(shipped("gemma3_1b_like"), 16, 4)
    assert [gemma.group_bytes_per_page(i) for i in range(2)] == [16 * 22528, 16 * 4096]
    assert sum(gemma.group_capacity_bytes(i) for i in range(2)) == gemma.capacity_bytes == 4 * 16 * 26624


def test_a_pattern_repeats_over_the_layers_and_groups_override_shapes():
    model = {"num_layers": 7, "num_kv_heads": 4, "head_dim": 8, "dtype": "float16",
             "layers": {"pattern": ["a", "b", "c"], "groups": {
                 "a": {"kind": "chunked", "chunk": 64}, "b": {"kind": "full", "num_kv_heads": 1, "head_dim": 16},
                 "c": {"kind": "sliding", "window": 3}, "unused": {"kind": "full"}}}}
    a, b, c = sizes.layer_groups(model)  # layers a b c a b c a: 3 a, 2 b, 2 c; `unused` holds nothing
    assert (a.num_layers, b.num_layers, c.num_layers) == (3, 2, 2)
    assert (a.bytes_per_token, b.bytes_per_token, c.bytes_per_token) == (2 * 3 * 4 * 8 * 2, 2 * 2 * 16 * 2,
                                                                          2 * 2 * 4 * 8 * 2)
    assert kv_bytes_per_token(model) == 384 + 128 + 256


@pytest.mark.parametrize("layers, match", [
    ({"pattern": ["x"]}, "model.layers=.*must be a mapping with keys pattern"),
    ({"pattern": [], "groups": {"x": {"kind": "full"}}}, "model.layers.pattern=\\[\\]: must be a non-empty list"),
    ({"pattern": ["x"], "groups": {"x": {"kind": "state", "state_bytes": 8}}}, "every layer is a state layer"),
    ({"pattern": ["x"], "groups": {"x": {"kind": "full", "window": 4}}}, "window=4 is for kind sliding only"),
    ({"pattern": ["x"], "groups": {"x": {"kind": "sliding"}}}, "kind sliding needs window >= 1, got 0"),
    ({"pattern": ["x"], "groups": {"x": {"kind": "full", "heads": 2}}},
     "model.layers.groups.x=.*must be a mapping with kind"),
])
def test_a_bad_layers_description_names_the_key(layers, match):
    with pytest.raises(ValueError, match=match):
        sizes.layer_groups({"num_layers": 2, "num_kv_heads": 1, "head_dim": 4, "dtype": "float32", "layers": layers})
