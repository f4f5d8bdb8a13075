"""kvbench.traces: generators, loaders, errors, configs, prefix analysis."""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from kvbench.request import Request
from kvbench.schema import register
from kvbench.traces import (Fixed, LogNormal, TraceError, Uniform, azure, burstgpt, mooncake,
                            multi_turn, prefix_reuse, shared_prefix, synthetic, traces_dir)
from kvbench.traces.arrivals import retime
from kvbench.traces.common import COMMON_KEYS

REPO = Path(__file__).resolve().parents[1]
TRACE_CONFIGS = sorted((REPO / "configs" / "trace").glob("*.yaml"))
AZURE_CONV = "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv"
MOONCAKE = "mooncake-fast25/synthetic_trace.jsonl"


def check_trace(reqs: list[Request], vocab_size: int = 32000) -> None:
    """The contract of every trace: ids 0..N-1 in arrival order, int32 ids in range."""
    assert [r.id for r in reqs] == list(range(len(reqs)))
    times = [r.arrival_s for r in reqs]
    assert times == sorted(times) and (not reqs or times[0] == 0.0)
    for r in reqs:
        for ids in (r.prompt, r.output):
            assert ids.dtype == np.int32 and ids.ndim == 1
            assert ids.min() >= 0 and ids.max() < vocab_size
        assert r.prompt_len >= 1 and r.output_len >= 1


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def need_shared(rel: str) -> Path:
    path = traces_dir() / rel
    if not path.is_file():
        pytest.skip(f"shared trace {path} not present")
    return path


# ---- Mooncake ---------------------------------------------------------------------------------

def mooncake_rows(*rows: tuple[int, int, int, list[int]]) -> str:
    return "".join(f'{{"timestamp": {t}, "input_length": {i}, "output_length": {o}, "hash_ids": {h}}}\n'
                   for t, i, o, h in rows)


def test_mooncake_equal_hash_ids_are_equal_blocks(tmp_path):
    f = write(tmp_path / "mc.jsonl", mooncake_rows((0, 1024, 5, [7, 8]), (10, 1024, 3, [7, 9]),
                                                   (20, 700, 2, [9, 8]), (30, 512, 1, [8])))
    a, b, c, d = mooncake(str(f))
    check_trace([a, b, c, d])
    assert np.array_equal(a.prompt[:512], b.prompt[:512])  # hash 7 == hash 7
    assert not np.array_equal(a.prompt[512:], b.prompt[512:])  # hash 8 != hash 9
    assert np.array_equal(a.prompt[512:], d.prompt)  # hash 8 at another position, same ids
    assert np.array_equal(b.prompt[512:], c.prompt[:512])  # hash 9
    # partial last block: the first 700 - 512 = 188 ids of hash 8's block
    assert c.prompt_len == 700 and np.array_equal(c.prompt[512:], d.prompt[:188])
    assert [r.output_len for r in (a, b, c, d)] == [5, 3, 2, 1]
    assert [r.arrival_s for r in (a, b, c, d)] == [0.0, 0.01, 0.02, 0.03]  # ms -> s
    assert a.source == "mc.jsonl:1" and d.source == "mc.jsonl:4"


def test_mooncake_ids_depend_on_seed_and_hash_only(tmp_path):
    f = write(tmp_path / "mc.jsonl", mooncake_rows((0, 512, 1, [3])))
    g = write(tmp_path / "mc2.jsonl", mooncake_rows((0, 1024, 1, [1, 2]), (5, 512, 1, [3])))
    assert np.array_equal(mooncake(str(f), seed=4)[0].prompt, mooncake(str(g), seed=4)[1].prompt)
    assert not np.array_equal(mooncake(str(f), seed=4)[0].prompt, mooncake(str(f), seed=5)[0].prompt)
    small = mooncake(str(g), vocab_size=50)
    check_trace(small, vocab_size=50)


@pytest.mark.parametrize("row, field", [
    ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 0, "hash_ids": [1]}', "output_length"),
    ('{"timestamp": 0, "input_length": "10", "output_length": 1, "hash_ids": [1]}', "input_length"),
    ('{"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp"),
    ('{"input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp"),
])
def test_mooncake_bad_row_names_file_line_field(tmp_path, row, field):
    f = write(tmp_path / "bad.jsonl", mooncake_rows((0, 10, 1, [0])) + row + "\n")
    with pytest.raises(TraceError, match=rf"^{re.escape(str(f))}:2: {field}: expected "):
        mooncake(str(f))


def test_mooncake_shared_trace_prefix_reuse():
    path = need_shared(MOONCAKE)
    reqs = mooncake(str(path))
    check_trace(reqs)
    assert len(reqs) == 3993 and sum(r.prompt_len for r in reqs) == 61_194_628
    reuse = prefix_reuse(reqs, block_size=512)  # README: 77,953 / 121,877 blocks, 1,782 requests
    assert (reuse.hit_blocks, reuse.blocks, reuse.requests_with_hit) == (77_953, 121_877, 1_782)
    assert round(reuse.block_hit_rate, 3) == 0.640


# ---- Azure ------------------------------------------------------------------------------------

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def test_azure_parses_lengths_and_7_digit_timestamps(tmp_path):
    f = write(tmp_path / "az.csv", AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
              "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:16:00.0000001,2,7\n")
    reqs = azure(str(f))
    check_trace(reqs)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(374, 44), (396, 109), (2, 7)]
    assert reqs[1].arrival_s == 4.314579
    assert reqs[2].arrival_s == 13.3194101
    assert [r.source for r in reqs] == ["az.csv:2", "az.csv:3", "az.csv:4"]


@pytest.mark.parametrize("row, field, got", [
    ("2023-11-16 18:15:47.0,abc,4", "ContextTokens", "'abc'"),
    ("2023-11-16 18:15:47.0,12,0", "GeneratedTokens", "'0'"),
    ("2023-11-16 18:15:47.0,-3,4", "ContextTokens", "'-3'"),
    ("16/11/2023 18:15,12,4", "TIMESTAMP", "'16/11/2023 18:15'"),
])
def test_azure_bad_row_names_file_line_field(tmp_path, row, field, got):
    f = write(tmp_path / "bad.csv", AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n" + row + "\n")
    with pytest.raises(TraceError) as err:
        azure(str(f))
    assert str(err.value).startswith(f"{f}:3: {field}: expected ")
    assert str(err.value).endswith(f"got {got}")


def test_azure_missing_column_and_missing_file(tmp_path, monkeypatch):
    f = write(tmp_path / "cols.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6,3\n")
    with pytest.raises(TraceError, match=r"cols\.csv:1: header: missing column.*GeneratedTokens"):
        azure(str(f))
    monkeypatch.setenv("KVBENCH_TRACES", str(tmp_path))
    with pytest.raises(TraceError, match=r"nope\.csv.*KVBENCH_TRACES.*trace\.path"):
        azure("nope.csv")


def test_traces_dir_env_and_relative_path(tmp_path, monkeypatch):
    write(tmp_path / "az.csv", AZURE_HEADER + "2023-11-16 18:15:46.6805900,5,6\n")
    monkeypatch.setenv("KVBENCH_TRACES", str(tmp_path))
    assert traces_dir() == tmp_path
    assert azure("az.csv")[0].prompt_len == 5


def test_rate_rescaling_and_limit(tmp_path):
    rows = [f"2023-11-16 18:00:{s:02d}.5000000,{10 + s},{1 + s}\n" for s in (0, 1, 3, 7, 15)]
    f = write(tmp_path / "az.csv", AZURE_HEADER + "".join(rows))
    keep = azure(str(f))
    assert [r.arrival_s for r in keep] == [0.0, 1.0, 3.0, 7.0, 15.0]
    fast = azure(str(f), rate=2.0)  # 4 gaps over the span -> mean rate (N-1)/span = 2 req/s
    assert fast[-1].arrival_s == pytest.approx(2.0) and fast[1].arrival_s == pytest.approx(1 / 7.5)
    assert [r.arrival_s for r in azure(str(f), rate="inf")] == [0.0] * 5
    assert [r.arrival_s for r in azure(str(f), rate=float("inf"))] == [0.0] * 5
    head = azure(str(f), limit=2)
    assert len(head) == 2 and all(np.array_equal(h.prompt, k.prompt) and np.array_equal(h.output, k.output)
                                  for h, k in zip(head, keep))
    assert not np.array_equal(azure(str(f), seed=1)[0].prompt, keep[0].prompt)
    assert np.array_equal(azure(str(f))[3].prompt, keep[3].prompt)  # deterministic
    with pytest.raises(TraceError, match="rate"):
        azure(str(f), rate=0)


def test_retime_sorts_relative_to_first():
    assert list(retime(np.array([5.0, 3.0, 4.0]), None)) == [2.0, 0.0, 1.0]
    assert list(retime(np.array([7.0]), 3.0)) == [0.0]


def test_unsorted_file_is_sorted_with_ids_in_arrival_order(tmp_path):
    f = write(tmp_path / "az.csv", AZURE_HEADER + "2023-11-16 18:00:05.0,1,1\n2023-11-16 18:00:01.0,2,2\n")
    reqs = azure(str(f))
    check_trace(reqs)
    assert [(r.prompt_len, r.source) for r in reqs] == [(2, "az.csv:3"), (1, "az.csv:2")]


def test_azure_shared_trace():
    path = need_shared(AZURE_CONV)
    reqs = azure(str(path))
    check_trace(reqs)
    assert len(reqs) == 19366 and (reqs[0].prompt_len, reqs[0].output_len) == (374, 44)
    assert reqs[-1].arrival_s == pytest.approx(3501.721937, abs=1e-6)
    assert sum(r.prompt_len for r in reqs) / len(reqs) == pytest.approx(1154.7, abs=0.05)


# ---- BurstGPT ---------------------------------------------------------------------------------

BURST = ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
         "5,ChatGPT,472,18,490,Conversation log\n"
         "45,ChatGPT,1087,0,1087,Conversation log\n"
         "118,GPT-4,417,276,693,API log\n")


def test_burstgpt_skips_failures_by_default(tmp_path, caplog):
    f = write(tmp_path / "burst.csv", BURST)
    with caplog.at_level(logging.WARNING):
        reqs = burstgpt(str(f))
    check_trace(reqs)
    assert [(r.arrival_s, r.prompt_len, r.output_len, r.source) for r in reqs] == [
        (0.0, 472, 18, "burst.csv:2"), (113.0, 417, 276, "burst.csv:4")]
    assert "skipped 1 failed" in caplog.text


def test_burstgpt_keep_failed_and_filters(tmp_path):
    f = write(tmp_path / "burst.csv", BURST)
    kept = burstgpt(str(f), keep_failed=True)
    assert [(r.output_len, r.meta["failed"]) for r in kept] == [(18, False), (1, True), (276, False)]
    assert [r.prompt_len for r in burstgpt(str(f), model="GPT-4")] == [417]
    assert [r.prompt_len for r in burstgpt(str(f), log_type="Conversation log", keep_failed=True)] == [472, 1087]
    assert len(burstgpt(str(f), limit=1)) == 1


def test_burstgpt_bad_row(tmp_path):
    f = write(tmp_path / "burst.csv", BURST + "130,ChatGPT,12,x7,19,API log\n")
    with pytest.raises(TraceError, match=r"burst\.csv:5: Response tokens: .*got 'x7'"):
        burstgpt(str(f))


# ---- generators -------------------------------------------------------------------------------

def test_synthetic_rate_burstiness_and_lengths():
    reqs = synthetic(num_requests=4000, rate=10.0, prompt_len=Uniform(3, 5), output_len=Fixed(2))
    check_trace(reqs)
    assert (len(reqs) - 1) / reqs[-1].arrival_s == pytest.approx(10.0, rel=0.05)
    assert {r.prompt_len for r in reqs} == {3, 4, 5} and {r.output_len for r in reqs} == {2}
    gaps = np.diff([r.arrival_s for r in synthetic(num_requests=4000, rate=10.0, burstiness=0.25,
                                                    prompt_len=1, output_len=1)])
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15)  # CV = 1/sqrt(burstiness)
    assert all(r.arrival_s == 0.0 for r in synthetic(num_requests=50, rate=float("inf")))
    a, b = synthetic(num_requests=20, seed=3), synthetic(num_requests=20, seed=3)
    assert all(np.array_equal(x.prompt, y.prompt) and np.array_equal(x.output, y.output) for x, y in zip(a, b))


def test_lognormal_clips_and_hits_mean():
    rng = np.random.default_rng(0)
    x = LogNormal(mean=100, sigma=0.5).sample(rng, 100_000)
    assert x.mean() == pytest.approx(100, rel=0.02)
    y = LogNormal(mean=100, sigma=1.5, min=20, max=300).sample(rng, 10_000)
    assert y.min() == 20 and y.max() == 300
    with pytest.raises(TraceError):
        Uniform(5, 3)


def test_shared_prefix_groups_share_exactly_the_system_prompt():
    reqs = shared_prefix(num_groups=3, questions_per_group=4, system_len=Uniform(50, 60),
                         question_len=Fixed(10), output_len=Fixed(3), rate=5.0)
    check_trace(reqs)
    assert len(reqs) == 12
    groups: dict[int, list[Request]] = {}
    for r in reqs:
        groups.setdefault(r.meta["group"], []).append(r)
    systems = []
    for members in groups.values():
        s = members[0].meta["system_len"]
        assert all(np.array_equal(m.prompt[:s], members[0].prompt[:s]) and m.prompt_len == s + 10 for m in members)
        qs = {m.prompt[s:].tobytes() for m in members}
        assert len(qs) == len(members)  # questions are each request's own
        systems.append(members[0].prompt[:s])
    assert all(reuse_len(a, b) < 3 for i, a in enumerate(systems) for b in systems[i + 1:])


def reuse_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def test_multi_turn_prompt_is_history_plus_new_message():
    reqs = multi_turn(num_chats=5, turns=Fixed(4), user_len=Uniform(5, 9), output_len=Uniform(2, 6),
                      think_time_s=2.0, rate=1.0)
    check_trace(reqs)
    chats: dict[int, list[Request]] = {}
    for r in reqs:
        chats.setdefault(r.session, []).append(r)
    assert sorted(chats) == list(range(5))
    for turns in chats.values():
        assert [t.meta["turn"] for t in turns] == [0, 1, 2, 3]  # in order
        for prev, nxt in zip(turns, turns[1:]):
            hist = np.concatenate([prev.prompt, prev.output])
            assert np.array_equal(nxt.prompt[:len(hist)], hist)
            assert 5 <= nxt.prompt_len - len(hist) <= 9
            assert nxt.arrival_s > prev.arrival_s
    capped = multi_turn(num_chats=3, turns=Fixed(50), user_len=Fixed(100), output_len=Fixed(100),
                        max_prompt_len=1000)
    assert max(r.prompt_len for r in capped) <= 1000 and len(capped) == 3 * 5


def test_prefix_reuse_exact_counts():
    def req(i, ids):
        return Request(id=i, arrival_s=float(i), prompt=np.array(ids, dtype=np.int32), output=np.array([0], dtype=np.int32))
    reqs = [req(0, [1, 2, 3, 4, 5]), req(1, [1, 2, 3, 4, 9]), req(2, [1, 2, 3, 4, 5]), req(3, [7, 2, 3])]
    reuse = prefix_reuse(reqs, block_size=2)  # blocks: 3, 3, 3, 2; hits: 0, 2, 3, 0
    assert (reuse.hit_blocks, reuse.blocks, reuse.hit_tokens, reuse.prompt_tokens) == (5, 11, 9, 18)
    assert reuse.requests_with_hit == 2


# ---- Hydra configs ----------------------------------------------------------------------------

@pytest.mark.parametrize("yaml", TRACE_CONFIGS, ids=lambda p: p.stem)
def test_every_trace_config_instantiates(yaml, tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(overrides=[f"+trace={yaml.stem}"]).trace
        assert set(COMMON_KEYS) <= set(cfg.keys()), f"{yaml.name} lacks {set(COMMON_KEYS) - set(cfg.keys())}"
        overrides = [f"+trace={yaml.stem}", "trace.limit=50", "+max_model_len=4096"]
        is_file_trace = "path" in cfg.keys()  # `in cfg` is False for a ??? value
        if is_file_trace:
            if OmegaConf.is_missing(cfg, "path"):
                with pytest.raises(MissingMandatoryValue):
                    instantiate(cfg)
                write(tmp_path / "t.csv", BURST)
                overrides.append(f"trace.path={tmp_path / 't.csv'}")
            elif not (traces_dir() / cfg.path).is_file():
                pytest.skip(f"{cfg.path} not in {traces_dir()}")
        trace = compose(overrides=overrides).trace
        assert trace.max_model_len == 4096  # the run's, by interpolation
        reqs = instantiate(trace)
    assert isinstance(reqs, Sequence) and 0 < len(reqs) <= 50  # a list, or a LazyTrace (synthetic)
    assert all(r.built == (max(r.prompt_len, r.output_len) <= 4096) for r in reqs if is_file_trace)
    check_trace(reqs)  # reads every id: builds the unbuilt ones


def test_common_keys_override_on_the_default_trace():
    """A sweep composes the primary config (the default trace) with the common overrides first:
    `kvbench -m trace=azure_conv,azure_code trace.limit=1000` needs `limit` on every trace."""
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trace.{k}={v}" for k, v in
                                                       (("limit", 7), ("rate", 3.0), ("seed", 2))])
    assert (cfg.trace.limit, cfg.trace.rate, cfg.trace.seed) == (7, 3.0, 2)


@pytest.mark.parametrize("make", [
    lambda limit: synthetic(num_requests=40, rate=5.0, limit=limit),
    lambda limit: shared_prefix(num_groups=3, questions_per_group=5, limit=limit),
    lambda limit: multi_turn(num_chats=6, turns=Fixed(3), limit=limit),
], ids=["synthetic", "shared_prefix", "multi_turn"])
def test_generators_limit_keeps_the_first_n_in_arrival_order(make):
    full, head = make(None), make(9)
    assert len(full) > 9 and summary(head) == summary(full[:9])
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(head, full))
    assert make(0) == []
    with pytest.raises(TraceError, match="limit"):
        make(1.5)


def summary(reqs: list[Request]) -> list[tuple]:
    return [(r.id, r.arrival_s, r.prompt_len, r.output_len, r.source, r.session) for r in reqs]


def test_synthetic_over_long_requests_are_unbuilt_and_others_unchanged():
    def make(max_model_len):
        return synthetic(num_requests=30, prompt_len=Uniform(10, 200), output_len=Fixed(60), seed=1,
                         max_model_len=max_model_len)
    full, lazy = make(None), make(150)
    assert summary(full) == summary(lazy)
    assert [r.built for r in lazy] == [r.prompt_len <= 150 for r in full]
    assert 0 < sum(not r.built for r in lazy) < 30
    # a side of at most max_model_len is drawn as without it, even when the sum is over
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(make(200), full))
    assert any(r.prompt_len + r.output_len > 200 for r in full)
