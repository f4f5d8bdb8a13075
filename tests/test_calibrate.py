"""The cost-model fit recovers the coefficients that produced a timeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from kvbench.calibrate import COEFFICIENTS, fit, fit_metrics, held_by_stalls, metric_weights, predict
from kvbench.engines.sim import SimEngine, step_time
from test_end_to_end import CONFIGS, run_with


def _timeline(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"prefill_tokens": rng.integers(0, 4000, n) * (rng.random(n) < 0.5),  # half decode-only
                         "decode_tokens": rng.integers(0, 64, n), "kv_read_tokens": rng.integers(0, 200000, n)})


NO_GRAPH_PREFILL = dict(graph_prefill_tokens=0, graph_prefill_step_s=0.0, graph_prefill_token_s=0.0)


def test_fit_recovers_known_coefficients_and_keeps_them_non_negative():
    tl = _timeline(400)
    coef = dict(overhead_s=0.004, prefill_token_s=2e-5, decode_token_s=0.0, kv_read_token_s=5e-8,
                prefill_step_s=0.006, eager_floor_s=0.0, eager_decode_token_s=3e-5, eager_kv_read_token_s=5e-8,
                **NO_GRAPH_PREFILL)
    tl["dt_s"] = predict(tl, coef)
    got = fit(tl)
    assert list(got) == list(COEFFICIENTS)
    for key, value in coef.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_fit_recovers_three_step_models_graph_mixed_and_eager():
    """Decode-only steps, steps with up to graph_prefill_tokens prefill tokens (graph replays:
    the decode-only model plus their own fixed and per-token costs) and larger, eager steps (a
    fixed cost, a floor, their own per-token costs): the fit gives back each coefficient, and
    the threshold it was told."""
    rng = np.random.default_rng(3)
    n = 900
    p = np.select([rng.random(n) < 0.4, rng.random(n) < 0.5], [0, rng.integers(1, 513, n)], rng.integers(513, 8193, n))
    tl = pd.DataFrame({"prefill_tokens": p, "decode_tokens": rng.integers(0, 256, n),
                       "kv_read_tokens": rng.integers(0, 300000, n)})
    coef = dict(overhead_s=0.0011, prefill_token_s=3.4e-6, decode_token_s=2.2e-5, kv_read_token_s=1e-8,
                prefill_step_s=0.002, eager_floor_s=0.0058, eager_decode_token_s=1.8e-5, eager_kv_read_token_s=3e-8,
                graph_prefill_tokens=512, graph_prefill_step_s=0.0009, graph_prefill_token_s=1.9e-6)
    tl["dt_s"] = predict(tl, coef)
    mixed = (tl.prefill_tokens > 0) & (tl.prefill_tokens <= 512)
    assert np.allclose(tl.dt_s[mixed], 0.0011 + 0.0009 + tl.decode_tokens[mixed] * 2.2e-5
                       + tl.kv_read_tokens[mixed] * 1e-8 + tl.prefill_tokens[mixed] * 1.9e-6, rtol=1e-12)
    on_floor = (tl.prefill_tokens > 512) & np.isclose(tl.dt_s, 0.0011 + 0.002 + 0.0058, rtol=0, atol=1e-12)
    assert 0 < on_floor.sum() < (tl.prefill_tokens > 512).sum()
    got = fit(tl, graph_prefill_tokens=512)
    assert list(got) == list(COEFFICIENTS) and got["graph_prefill_tokens"] == 512
    for key, value in coef.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    # told there are no graph-replayed prefills, it fits every step with prefill as eager
    assert fit(tl[tl.prefill_tokens != 200])["graph_prefill_tokens"] == 0
    # a stall (a just-in-time compile) is dropped from the fit
    stalled = tl.copy()
    stalled.loc[stalled.index[:3], "dt_s"] *= 50
    again = fit(stalled, graph_prefill_tokens=512)
    for key, value in coef.items():
        assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_step_time_without_graph_prefill_keys_is_the_old_formula_bit_for_bit():
    """configs/engine/sim.yaml has no graph_prefill_* keys: every step with prefill takes the eager
    formula with the same IEEE operations as before they existed (results/baselines/ rely on it),
    on the one-step path and the array path alike."""
    c = dict(overhead_s=0.006, prefill_token_s=3e-5, decode_token_s=5e-5, kv_read_token_s=4.4e-8,
             prefill_step_s=0.0, eager_floor_s=0.0, eager_decode_token_s=None, eager_kv_read_token_s=None)
    for p, d, k in [(1, 3, 1000), (200, 0, 4096), (8000, 17, 123457), (0, 64, 99999)]:
        old = (c["overhead_s"] + d * c["decode_token_s"] + k * c["kv_read_token_s"]) if p == 0 else (
            c["overhead_s"] + c["prefill_step_s"] + max(0.0, p * c["prefill_token_s"] + d * c["decode_token_s"]
                                                         + k * c["kv_read_token_s"]))
        assert step_time(c, p, d, k) == old
        assert step_time(SimEngine(**c).coefficients, p, d, k) == old  # the engine's copy, graph keys 0
        assert float(step_time(c, np.array([float(p)]), np.array([float(d)]), np.array([float(k)]))[0]) == old
    g = dict(c, graph_prefill_tokens=512, graph_prefill_step_s=0.001, graph_prefill_token_s=2e-6)
    graph = 0.006 + 3 * 5e-5 + 1000 * 4.4e-8
    assert step_time(g, 512, 3, 1000) == graph + 0.001 + 512 * 2e-6         # a graph replay
    assert step_time(g, 513, 3, 1000) == step_time(c, 513, 3, 1000)          # eager, as before
    arr = step_time(g, np.array([0.0, 512.0, 513.0]), np.array([3.0] * 3), np.array([1000.0] * 3))
    assert list(arr) == [step_time(g, 0, 3, 1000), step_time(g, 512, 3, 1000), step_time(g, 513, 3, 1000)]


def test_fit_finds_the_floor_of_eager_steps():
    """Steps with prefill that take max(floor, GPU work): small ones sit on the floor (the host's
    launches), large ones grow with their tokens; the fit tells which is which."""
    tl = _timeline(600, seed=1)
    coef = dict(overhead_s=0.0015, prefill_token_s=4e-6, decode_token_s=2.5e-5, kv_read_token_s=1e-8,
                prefill_step_s=0.002, eager_floor_s=0.006, eager_decode_token_s=3.5e-5, eager_kv_read_token_s=2e-8,
                **NO_GRAPH_PREFILL)
    tl["dt_s"] = predict(tl, coef)
    on_floor = (tl.prefill_tokens > 0) & np.isclose(tl.dt_s, 0.0015 + 0.002 + 0.006, rtol=0, atol=1e-12)
    assert 0 < on_floor.sum() < (tl.prefill_tokens > 0).sum()
    got = fit(tl)
    for key, value in coef.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    # the sim engine steps by the same formula
    engine = SimEngine(**coef)
    assert float(step_time(engine.coefficients, 3000, 10, 50000)) == pytest.approx(
        0.0015 + 0.002 + max(0.006, 3000 * 4e-6 + 10 * 3.5e-5 + 50000 * 2e-8))
    assert float(step_time(engine.coefficients, 0, 10, 50000)) == pytest.approx(0.0015 + 10 * 2.5e-5 + 50000 * 1e-8)


def test_calibrating_on_a_sim_run_gives_back_the_sim_config(tmp_path):
    run_with(tmp_path / "run", "trace.num_requests=80")
    out = tmp_path / "sim_fitted.yaml"
    subprocess.run([sys.executable, "-m", "kvbench.calibrate", str(tmp_path / "run"), "--out", str(out)],
                   check=True, capture_output=True)
    fitted, sim = OmegaConf.load(out), OmegaConf.load(CONFIGS / "engine" / "sim.yaml")
    assert list(fitted.defaults) == ["sim", "_self_"]
    for key in ("overhead_s", "prefill_token_s", "decode_token_s", "kv_read_token_s", "prefill_step_s",
                "eager_floor_s"):
        assert fitted[key] == pytest.approx(sim[key], rel=1e-5, abs=1e-12), key
    assert sim.eager_decode_token_s is None and sim.eager_kv_read_token_s is None  # null: same as decode-only
    assert fitted.eager_decode_token_s == pytest.approx(sim.decode_token_s, rel=1e-5)
    assert fitted.eager_kv_read_token_s == pytest.approx(sim.kv_read_token_s, rel=1e-5)
    assert fitted.graph_prefill_tokens == 0  # a sim run without graph-replayed prefills: none fitted
    tl = pd.read_parquet(tmp_path / "run" / "timeline.parquet")  # prefill pairs recorded, 0 in decode-only steps
    assert tl.prefill_pairs.dtype == np.int64 and ((tl.prefill_pairs > 0) == (tl.prefill_tokens > 0)).all()
    assert (tl.prefill_pairs >= tl.prefill_tokens).all()  # each query pairs with itself at least
    assert fitted.prefill_pair_s == pytest.approx(0.0, abs=1e-15)  # sim.yaml prices no pairs


def test_calibrating_a_run_with_graph_replayed_prefills_reads_the_threshold_from_its_config(tmp_path):
    graph = ["++engine.graph_prefill_tokens=256", "++engine.graph_prefill_step_s=0.0009",
             "++engine.graph_prefill_token_s=2e-6"]
    run_with(tmp_path / "run", "trace.num_requests=80", "trace.rate=20", *graph)
    out = tmp_path / "sim_fitted.yaml"
    subprocess.run([sys.executable, "-m", "kvbench.calibrate", str(tmp_path / "run"), "--out", str(out)],
                   check=True, capture_output=True)
    fitted, sim = OmegaConf.load(out), OmegaConf.load(CONFIGS / "engine" / "sim.yaml")
    assert fitted.graph_prefill_tokens == 256
    assert fitted.graph_prefill_step_s == pytest.approx(0.0009, rel=1e-5)
    assert fitted.graph_prefill_token_s == pytest.approx(2e-6, rel=1e-5)
    for key in ("overhead_s", "decode_token_s", "kv_read_token_s", "prefill_token_s"):
        assert fitted[key] == pytest.approx(sim[key], rel=1e-5, abs=1e-12), key
    bad = subprocess.run([sys.executable, "-m", "kvbench.calibrate", str(tmp_path), "--out", str(tmp_path / "x.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no timeline.parquet" in bad.stderr
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("engine", [
    "sim",
    pytest.param("torch", marks=pytest.mark.skipif(
        os.environ.get("KVBENCH_TORCH_PIPELINE") != "1",
        reason="the real model on the CPU takes ~4 min: KVBENCH_TORCH_PIPELINE=1 runs it")),
])
def test_gpu_strategies_experiment_runs_end_to_end_on_the_cpu(tmp_path, engine):
    """experiments/gpu_strategies.py with a CPU engine in place of the GPU: every stage runs (the
    'GPU' runs, their repeats, the fits, the sims with the fitted coefficients, the recorded
    replays), offline replays make the same decisions in the sim, and a second call reuses the
    runs. With engine=sim (the default, ~15 s) the measured clock is the sim's own, so the fit
    has exact data; engine=torch (the tiny model, opt-in) gives it a real, noisy clock."""
    script = CONFIGS.parent / "experiments" / "gpu_strategies.py"
    args = [sys.executable, str(script), "--out", str(tmp_path), "--engine", engine, "--model", "tiny",
            "--limit", "4", "--rate-limit", "3", "--capacity", "40000", "--trace", "synthetic"]
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    fidelity = {(r["case"], r["fit"]): r for r in json.loads((tmp_path / "gpu_strategies.json").read_text())["fidelity"]}
    assert len(fidelity) == 12
    assert all(r["same_decisions"] for (case, _), r in fidelity.items() if case.endswith("offline"))
    assert all(r["same_decisions_on_gpu_clock"] for r in fidelity.values())  # rates too
    assert all(0 <= r["step_err_p50"] <= r["step_err_p90"] for r in fidelity.values())
    if engine == "sim":  # the sim's steps follow its cost model: the fit recovers it, and the replays agree
        assert all(r["step_err_p90"] < 1e-6 and r["same_decisions"] for r in fidelity.values())
    for name in ("all", "slab", "paged", "radix"):
        assert OmegaConf.load(tmp_path / f"sim_fitted_{name}.yaml").defaults[0] == "sim"
    again = subprocess.run(args, check=True, capture_output=True, text=True, timeout=600)
    repeat = json.loads((tmp_path / "gpu_strategies.json").read_text())["gpu_repeat"]
    assert [r["case"] for r in repeat] == [c for c, f in fidelity if f == "one for all"]
    assert all(r["same_decisions"] for r in repeat if r["case"].endswith("offline"))
    assert again.stdout.count("kept the earlier results") == 6 + 6 + 6 + 12  # gpu, repeat, recorded, sims


def test_gpu_strategies_cases_runs_only_the_configs_named(tmp_path):
    """--cases TEXT keeps the configs whose name contains TEXT (a repeat of the finite-rate runs
    alone); a TEXT that names none is one line on stderr and exit 2, with nothing written."""
    script = CONFIGS.parent / "experiments" / "gpu_strategies.py"
    args = [sys.executable, str(script), "--engine", "sim", "--model", "tiny", "--limit", "4", "--rate-limit", "3",
            "--capacity", "40000", "--trace", "synthetic", "--no-repeat"]
    bad = subprocess.run([*args, "--out", str(tmp_path / "none"), "--cases", "rate16"], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "rate16" in bad.stderr
    assert not (tmp_path / "none").exists()
    subprocess.run([*args, "--out", str(tmp_path), "--cases", "rate"], check=True, capture_output=True, timeout=600)
    assert sorted(d.name for d in (tmp_path / "runs").iterdir()) == ["paged-16_rate4", "paged-16_rate8"]
    cases = {r["case"] for r in json.loads((tmp_path / "gpu_strategies.json").read_text())["fidelity"]}
    assert cases == {"paged-16_rate4", "paged-16_rate8"}


DECISIONS = ["running", "waiting", "prefill_tokens", "decode_tokens", "kv_read_tokens", "preemptions"]


def test_recorded_engine_replays_a_runs_clock_and_its_decisions(tmp_path):
    """engine=recorded on a run's own timeline gives back that run: the clock is the only thing
    the engines differ in. Here the recorded run is a sim at a finite rate with preemptions."""
    common = ["trace.num_requests=120", "trace.rate=40", "strategy=paged", "kv_capacity_tokens=12000"]
    first = run_with(tmp_path / "sim", *common)
    assert first["preemptions"] > 0
    again = run_with(tmp_path / "rec", *common, "engine=recorded",
                     f"engine.timeline={tmp_path / 'sim' / 'timeline.parquet'}")
    a, b = (pd.read_parquet(tmp_path / d / "timeline.parquet") for d in ("sim", "rec"))
    assert a[DECISIONS].equals(b[DECISIONS]) and np.array_equal(a.t_s, b.t_s)
    for key in ("finished", "preemptions", "ttft_mean_s", "tpot_mean_s", "request_throughput"):
        assert again[key] == first[key], key
    assert again["replayed_steps"] == again["recorded_steps"] == len(a)


def test_recorded_engine_names_the_step_where_a_replay_diverges(tmp_path):
    common = ["trace.num_requests=60", "trace.rate=40", "kv_capacity_tokens=12000"]
    run_with(tmp_path / "sim", *common, "strategy=paged")
    with pytest.raises(RuntimeError, match=r"step \d+: .*diverged"):
        run_with(tmp_path / "rec", *common, "strategy=slab_oracle", "engine=recorded",
                 f"engine.timeline={tmp_path / 'sim' / 'timeline.parquet'}")
    with pytest.raises(Exception, match="timeline: .* is not a file"):  # (hydra wraps it)
        run_with(tmp_path / "rec2", *common, "engine=recorded", f"engine.timeline={tmp_path / 'none.parquet'}")


def test_attention_check_counts_every_prefill_query_key_pair(tmp_path):
    """experiments/gpu_strategies.py --attention-check replays a run on its own clock counting each
    step's prefill query-key pairs: without prefix hits or preemptions, a prompt of L tokens
    contributes L (L + 1) / 2 pairs however the scheduler chunks it."""
    import importlib.util
    path = CONFIGS.parent / "experiments" / "gpu_strategies.py"
    spec = importlib.util.spec_from_file_location("gpu_strategies", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_strategies"] = mod
    spec.loader.exec_module(mod)
    overrides = ["strategy=paged_nocache", "trace.num_requests=12", "scheduler.max_num_batched_tokens=300"]
    summary = run_with(tmp_path / "run", *overrides)
    assert summary["preemptions"] == 0 and summary["prefix_hit_rate"] == 0
    row = mod.attention_check(mod.compose_cfg(overrides), tmp_path / "run", tmp_path / "rec", 0)
    req = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    assert sum(mod.PairCountingRecorded.pairs) == float((req.prompt_len * (req.prompt_len + 1) // 2).sum())
    assert row["eager_steps"] == int((pd.read_parquet(tmp_path / "run" / "timeline.parquet").prefill_tokens > 0).sum())


def test_fit_recovers_a_known_prefill_pair_cost_in_the_graph_and_eager_prefill_models():
    """A timeline with a prefill_pairs column (the prefill chunks' query-key pairs): the fit gives
    back prefill_pair_s (eager steps, inside the floor's max) and graph_prefill_pair_s (graph-
    replayed prefills) with every other coefficient; the same timeline without the column gets
    no pair keys."""
    rng = np.random.default_rng(5)
    n = 900
    p = np.select([rng.random(n) < 0.4, rng.random(n) < 0.5], [0, rng.integers(1, 513, n)], rng.integers(513, 8193, n))
    prefix = rng.integers(0, 60000, n)  # one chunk per step after a cached prefix: n p + n (n + 1) / 2 pairs
    tl = pd.DataFrame({"prefill_tokens": p, "decode_tokens": rng.integers(0, 256, n),
                       "kv_read_tokens": rng.integers(0, 300000, n),
                       "prefill_pairs": p * prefix + p * (p + 1) // 2})
    coef = dict(overhead_s=0.0011, prefill_token_s=3.4e-6, decode_token_s=2.2e-5, kv_read_token_s=1e-8,
                prefill_step_s=0.002, eager_floor_s=0.0, eager_decode_token_s=1.8e-5, eager_kv_read_token_s=3e-8,
                graph_prefill_tokens=512, graph_prefill_step_s=0.0009, graph_prefill_token_s=1.9e-6,
                prefill_pair_s=4e-10, graph_prefill_pair_s=7e-10)
    tl["dt_s"] = predict(tl, coef)
    eager = tl.prefill_tokens > 512
    assert np.allclose(tl.dt_s[eager], 0.0011 + 0.002 + tl.prefill_tokens[eager] * 3.4e-6 + tl.decode_tokens[eager]
                       * 1.8e-5 + tl.kv_read_tokens[eager] * 3e-8 + tl.prefill_pairs[eager] * 4e-10, rtol=1e-12)
    got = fit(tl, graph_prefill_tokens=512)
    assert list(got) == [*COEFFICIENTS, "prefill_pair_s", "graph_prefill_pair_s"]
    for key, value in coef.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-13), key
    assert list(fit(tl.drop(columns="prefill_pairs"), graph_prefill_tokens=512)) == list(COEFFICIENTS)


def test_prefill_pair_cost_absent_or_zero_is_the_old_step_time_bit_for_bit_and_priced_when_set():
    c = dict(overhead_s=0.006, prefill_token_s=3e-5, decode_token_s=5e-5, kv_read_token_s=4.4e-8,
             prefill_step_s=0.001, eager_floor_s=0.0, eager_decode_token_s=None, eager_kv_read_token_s=None,
             graph_prefill_tokens=512, graph_prefill_step_s=0.001, graph_prefill_token_s=2e-6)
    zero = dict(c, prefill_pair_s=0.0, graph_prefill_pair_s=0.0)
    for p, d, k, a in [(1, 3, 1000, 10**6), (513, 0, 4096, 7 * 10**8), (8192, 17, 123457, 5 * 10**9), (0, 64, 99999, 0)]:
        assert step_time(zero, p, d, k, a) == step_time(c, p, d, k) == step_time(SimEngine(**c).coefficients, p, d, k, a)
    priced = dict(c, prefill_pair_s=4e-10, graph_prefill_pair_s=7e-10)
    assert step_time(priced, 8192, 0, 70000, 5 * 10**8) == step_time(c, 8192, 0, 70000) + 5 * 10**8 * 4e-10
    assert step_time(priced, 300, 2, 7000, 10**6) == pytest.approx(step_time(c, 300, 2, 7000) + 10**6 * 7e-10, rel=1e-15)
    assert step_time(priced, 0, 2, 7000, 0) == step_time(c, 0, 2, 7000)
    arr = step_time(priced, np.array([0.0, 300.0, 8192.0]), np.array([2.0] * 3), np.array([7000.0] * 3),
                    np.array([0.0, 1e6, 5e8]))
    assert list(arr) == [step_time(priced, 0, 2, 7000), step_time(priced, 300, 2, 7000, 10**6),
                         step_time(priced, 8192, 2, 7000, 5 * 10**8)]


def test_a_steps_prefill_pairs_count_every_causal_query_key_pair_of_its_prefill_chunks():
    """n new tokens at positions p..p+n-1 attend to 0..own position: n p + n (n + 1) / 2 pairs;
    decode rows add none; a sliding-window / chunked group counts what its attention reads,
    weighted by its K/V bytes like kv_read_tokens (checked against a brute-force count)."""
    from kvbench.batch import KVReadGroups, ScheduledSeq, StepBatch
    from kvbench.request import Request

    def req(prompt, out=4):
        return Request(prompt, 0.0, np.arange(prompt, dtype=np.int32), np.arange(out, dtype=np.int32))

    seqs = [ScheduledSeq(req(100), 40, 60, None), ScheduledSeq(req(30), 0, 30, None),
            ScheduledSeq(req(20), 21, 1, None)]  # a chunk after 40 cached, a whole prompt, a decode
    b = StepBatch(seqs, 16, 64, False, [])
    brute = sum(q + 1 for q in range(40, 100)) + sum(q + 1 for q in range(30))
    assert b.prefill_pairs == brute == 60 * 40 + 60 * 61 // 2 + 30 * 31 // 2
    assert StepBatch([ScheduledSeq(req(20), 21, 1, None)], 16, 64, False, []).prefill_pairs == 0
    groups = KVReadGroups(bytes_per_token=700, full_bytes=100, windowed=((200, 32, 0), (400, 0, 16)))
    full = [q + 1 for q in range(40, 100)] + [q + 1 for q in range(30)]
    exact = sum(100 * c + 200 * min(c, 32) + 400 * ((c - 1) % 16 + 1) for c in full)
    got = StepBatch([ScheduledSeq(req(100), 40, 60, None), ScheduledSeq(req(30), 0, 30, None),
                     ScheduledSeq(req(20), 21, 1, None)], 16, 64, False, [], kv_read_groups=groups).prefill_pairs
    assert got == (2 * exact + 700) // (2 * 700)


def _decode_run(n: int, lo: int, hi: int, fixed: float, per_token: float, seed: int) -> pd.DataFrame:
    """`n` decode-only steps of lo..hi-1 decode tokens taking fixed + per_token x tokens seconds."""
    d = np.random.default_rng(seed).integers(lo, hi, n)
    return pd.DataFrame({"prefill_tokens": 0, "decode_tokens": d, "kv_read_tokens": 0, "dt_s": fixed + per_token * d})


def _total_errors(runs: list[pd.DataFrame], coef: dict) -> np.ndarray:
    return np.array([predict(r, coef).sum() / r.dt_s.sum() - 1 for r in runs])


def test_a_fit_weighted_by_run_counts_each_run_equally_not_its_long_steps():
    """Two runs no single line fits: a short one of 1k small steps (1 ms + 0.1 ms per token) and
    a long one of 300 flat 30 ms steps. Unweighted, the long run's large errors decide the line and
    the short run's total comes out 64 % high; weighted by run (n / T**2 per step), the short run's
    total is within 2 %, the worst run's error falls by half or more, and the fit no longer depends
    on how many steps a run has (the long run's steps repeated 3x: the same coefficients)."""
    short, long_ = _decode_run(1000, 1, 17, 1e-3, 1e-4, 0), _decode_run(300, 50, 251, 0.03, 0.0, 1)
    steps = pd.concat([short, long_], ignore_index=True)
    runs = np.r_[np.zeros(len(short)), np.ones(len(long_))]
    plain, weighted = fit(steps), fit(steps, runs=runs)
    assert list(weighted) == list(plain) == list(COEFFICIENTS)
    err_plain, err_weighted = _total_errors([short, long_], plain), _total_errors([short, long_], weighted)
    assert err_plain[0] > 0.5 and abs(err_weighted[0]) < 0.02
    assert np.abs(err_weighted).max() < 0.5 * np.abs(err_plain).max()
    assert (err_weighted**2).sum() < 0.2 * (err_plain**2).sum()
    longer = pd.concat([short, long_, long_, long_], ignore_index=True)
    runs3 = np.r_[np.zeros(len(short)), np.ones(3 * len(long_))]
    again = fit(longer, runs=runs3)
    for key in ("overhead_s", "decode_token_s"):
        assert again[key] == pytest.approx(weighted[key], rel=1e-9), key
    assert fit(longer)["decode_token_s"] != pytest.approx(plain["decode_token_s"], rel=1e-3)  # unweighted: it moves


def test_run_weights_recover_a_model_that_fits_every_run_and_the_cli_option(tmp_path):
    """Runs that one model fits exactly: the weighted fit gives it back as the unweighted one does;
    `kvbench-calibrate --weights run` writes it and says so; the default is the unweighted fit."""
    a, b = _decode_run(800, 1, 17, 1e-3, 1e-4, 2), _decode_run(50, 50, 251, 1e-3, 1e-4, 3)
    for i, r in enumerate((a, b)):
        (tmp_path / f"r{i}").mkdir()
        _clocked(r).to_parquet(tmp_path / f"r{i}" / "timeline.parquet")
        (tmp_path / f"r{i}" / "summary.json").write_text(json.dumps({"device": "test", "model": "m"}))
    got = fit(pd.concat([a, b], ignore_index=True), runs=np.r_[np.zeros(len(a)), np.ones(len(b))])
    assert got["overhead_s"] == pytest.approx(1e-3, rel=1e-9) and got["decode_token_s"] == pytest.approx(1e-4, rel=1e-9)
    cli = [sys.executable, "-m", "kvbench.calibrate", str(tmp_path / "r0"), str(tmp_path / "r1"), "--weights"]
    bad = subprocess.run(cli + ["metrics", "--out", str(tmp_path / "x.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no requests.parquet" in bad.stderr
    assert not (tmp_path / "x.yaml").exists()
    for i, r in enumerate((a, b)):
        _requests(_clocked(r), [(0, len(r) - 1), (5, 30)]).to_parquet(tmp_path / f"r{i}" / "requests.parquet")
    for weights in ("run", "step", "metrics"):
        out = tmp_path / f"{weights}.yaml"
        subprocess.run(cli + [weights, "--out", str(out)], check=True, capture_output=True)
        text = out.read_text()
        assert ("--weights run" in text) == (weights == "run") and ("--weights metrics" in text) == (weights == "metrics")
        assert OmegaConf.load(out).decode_token_s == pytest.approx(1e-4, rel=1e-6)


def _requests(steps: pd.DataFrame, spans: list[tuple[int, int]], arrival: list[float] | None = None) -> pd.DataFrame:
    """requests.parquet rows of requests that got their first token at the end of step f and their
    last at the end of step l (one token a step), for each (f, l) of `spans`; arrivals 0 by default."""
    end = (steps.t_s + steps.dt_s).to_numpy()
    f, last = np.array([a for a, _ in spans]), np.array([b for _, b in spans])
    arr = np.zeros(len(spans)) if arrival is None else np.asarray(arrival, float)
    out = last - f + 1
    return pd.DataFrame({"arrival_s": arr, "status": "finished", "output_len": out, "first_token_s": end[f],
                         "finish_s": end[last], "ttft_s": end[f] - arr,
                         "tpot_s": np.where(out > 1, (end[last] - end[f]) / np.maximum(out - 1, 1), np.nan)})


def _clocked(steps: pd.DataFrame) -> pd.DataFrame:
    return steps.assign(t_s=np.r_[0.0, np.cumsum(steps.dt_s.to_numpy())[:-1]])


def _metrics(steps: pd.DataFrame, spans, arrival=None) -> np.ndarray:
    r = _requests(_clocked(steps), spans, arrival)
    return np.array([r.ttft_s.mean(), r.tpot_s.mean(), r.finish_s.max() - r.arrival_s.min()])


def test_metric_weights_move_each_metric_as_the_steps_times_do():
    """At t=0 the metrics are linear in the step times: mean TTFT, mean TPOT and duration after
    changing every step's time equal the measured ones + v @ change, exactly."""
    steps = _clocked(_decode_run(60, 1, 9, 1e-3, 1e-4, 4))
    spans = [(0, 59), (3, 20), (10, 10), (25, 41)]
    w = metric_weights(steps, _requests(steps, spans))
    extra = np.random.default_rng(5).random(60) * 1e-3
    want = _metrics(steps.assign(dt_s=steps.dt_s + extra), spans)
    for i, key in enumerate(("ttft", "tpot", "duration")):
        v, value = w[key]
        assert value + v @ extra == pytest.approx(want[i], rel=1e-12), key
    late = metric_weights(steps, _requests(steps, spans, arrival=[0.0, 0.0, 0.001, 0.002]))
    assert "duration" not in late  # requests after t=0: throughput is the arrivals', not fitted


def test_requests_a_stall_held_and_the_stall_weighs_nothing_in_the_fitted_metrics():
    """A stall in step 30 with requests waiting until step 33: the requests in the system from its
    start to the end of step 33 are held (the one that finished at step 20 and the one that
    arrived as step 34 began are not); the stall step weighs 0 in every fitted metric, the other
    steps as without the mask."""
    steps = _clocked(_decode_run(60, 1, 9, 1e-3, 1e-4, 4))
    steps["waiting"] = np.where((steps.index >= 30) & (steps.index < 33), 2, 0)
    spans = [(0, 20), (25, 40), (31, 35), (34, 59)]
    arrival = [0.0, 0.0, steps.t_s[29], steps.t_s[34]]
    req = _requests(steps, spans, arrival)
    stalls = np.arange(60) == 30
    assert held_by_stalls(steps, req, stalls).tolist() == [False, True, True, False]
    w, plain = metric_weights(steps, req, stalls), metric_weights(steps, req)
    for key in ("ttft", "tpot"):
        assert w[key][1] == plain[key][1] and w[key][0][30] == 0 and plain[key][0][30] > 0
        assert (np.delete(w[key][0], 30) == np.delete(plain[key][0], 30)).all()


def test_fitting_the_metrics_gets_every_runs_metrics_where_an_unweighted_fit_does_not():
    """The two runs no single line fits step by step (1k short steps; 300 flat 30 ms ones): fitted to
    each run's mean TTFT, mean TPOT and duration, one model gets all six within 2 %; the unweighted
    step fit is 60 % off on the short run. (stall=10: the long run's flat steps are no stalls.)"""
    short, long_ = _decode_run(1000, 1, 17, 1e-3, 1e-4, 0), _decode_run(300, 50, 251, 0.03, 0.0, 1)
    spans = {id(short): [(0, 999), (100, 600), (500, 999)], id(long_): [(0, 299), (20, 150), (200, 299)]}
    runs = [_clocked(short), _clocked(long_)]
    got = fit_metrics(runs, [_requests(r, spans[id(s)]) for r, s in zip(runs, (short, long_))], stall=10.0)
    plain = fit(pd.concat([short, long_], ignore_index=True))
    for steps in (short, long_):
        measured = _metrics(steps, spans[id(steps)])
        model = _metrics(steps.assign(dt_s=predict(steps, got)), spans[id(steps)])
        assert np.abs(model / measured - 1).max() < 0.02
    unweighted = _metrics(short.assign(dt_s=predict(short, plain)), spans[id(short)])
    assert (unweighted / _metrics(short, spans[id(short)]) - 1).min() > 0.5
    assert list(got) == list(COEFFICIENTS) and min(got.values()) >= 0


MIXED_OWN = dict(overhead_s=0.0045, prefill_token_s=2.2e-5, decode_token_s=6e-5, kv_read_token_s=1e-8,
                 prefill_step_s=0.0, eager_floor_s=0.0, eager_decode_token_s=6e-5, eager_kv_read_token_s=1e-8,
                 graph_prefill_tokens=8192, graph_prefill_step_s=0.0, graph_prefill_token_s=2.0e-5,
                 prefill_pair_s=5e-10, graph_prefill_pair_s=5e-10, graph_mixed_step_s=0.004,
                 graph_mixed_decode_token_s=9e-5)


def test_a_mixed_step_with_its_own_fixed_cost_and_decode_price_and_none_is_the_old_step_time():
    """graph_mixed_step_s set: a graph-replayed step with prefill costs its own fixed cost, its decode
    rows at graph_mixed_decode_token_s, plus K/V reads, prefill tokens and pairs (no overhead_s, no
    decode_token_s); the sim's step, its cost and the vectorised step_time agree to the bit; absent
    or None it is the model of before, bit for bit; decode-only and eager steps never change."""
    old = {k: v for k, v in MIXED_OWN.items() if not k.startswith("graph_mixed")}
    p, d, k, a = 300, 7, 90000, 300 * 4000 + 300 * 301 // 2
    own = 0.004 + d * 9e-5 + k * 1e-8 + p * 2.0e-5 + a * 5e-10
    assert step_time(MIXED_OWN, p, d, k, a) == pytest.approx(own, rel=1e-15)
    assert step_time(MIXED_OWN, p, d, k, a) < step_time(old, p, d, k, a)   # 7 decodes: cheaper than the sum
    assert step_time(MIXED_OWN, p, 200, k, a) > step_time(old, p, 200, k, a)   # 200: dearer
    for q in (0, 9000):  # decode-only and eager (past graph_prefill_tokens) steps: as before
        assert step_time(MIXED_OWN, q, d, k, a) == step_time(old, q, d, k, a)
    # never below the decode-only step of the same rows (one prefill token: 4.02 ms of its own, 4.5 + K/V)
    assert step_time(MIXED_OWN, 1, 0, 1000, 1) == step_time(MIXED_OWN, 0, 0, 1000) > 0.004 + 1000 * 1e-8 + 2e-5
    assert step_time(dict(old, graph_mixed_step_s=None, graph_mixed_decode_token_s=0.0), p, d, k, a) == \
        step_time(old, p, d, k, a)
    sim = SimEngine(**MIXED_OWN)
    batch = SimpleNamespace(prefill_tokens=p, decode_tokens=d, kv_read_tokens=k, prefill_pairs=a, h2d_tokens=0,
                            d2h_tokens=0)
    assert sim.step(batch) == sim.cost(p, d, k, a) == step_time(MIXED_OWN, p, d, k, a)
    tiny = SimpleNamespace(prefill_tokens=1, decode_tokens=0, kv_read_tokens=1000, prefill_pairs=1, h2d_tokens=0,
                           d2h_tokens=0)
    assert sim.step(tiny) == step_time(MIXED_OWN, 0, 0, 1000)
    assert SimEngine(**old).step(batch) == step_time(old, p, d, k, a)
    arr = step_time(MIXED_OWN, np.array([0.0, p, 9000.0]), np.array([d] * 3, float), np.array([k] * 3, float),
                    np.array([0.0, a, a], float))
    assert list(arr) == [step_time(MIXED_OWN, 0, d, k), step_time(MIXED_OWN, p, d, k, a),
                         step_time(MIXED_OWN, 9000, d, k, a)]
    with pytest.raises(ValueError, match="graph_mixed_step_s"):
        SimEngine(**dict(MIXED_OWN, graph_mixed_step_s=-1.0))


def test_fit_with_mixed_own_recovers_the_mixed_steps_own_costs_and_fit_metrics_keeps_them():
    """Steps made by the mixed-own model: fit(..., mixed_own=True) gives back every coefficient of
    the graph-replayed steps with prefill (their own fixed cost and decode price) beside the
    decode-only model's; the plain fit cannot (its mixed steps pay the decode step's fixed cost);
    fit_metrics with mixed_own keeps the keys and fits both runs' metrics within 1e-6."""
    rng = np.random.default_rng(11)
    n = 900
    small = rng.random(n) < 0.1   # a few tokens beside a few decodes: below the decode-only step of their rows
    p = np.where(rng.random(n) < 0.5, 0, np.where(small, rng.integers(1, 20, n), rng.integers(1, 8193, n)))
    tl = pd.DataFrame({"prefill_tokens": p, "decode_tokens": np.where(small, rng.integers(0, 8, n), rng.integers(0, 256, n)),
                       "kv_read_tokens": rng.integers(0, 300000, n),
                       "prefill_pairs": p * np.where(small, rng.integers(0, 100, n), rng.integers(0, 60000, n))
                       + p * (p + 1) // 2})
    tl["dt_s"] = predict(tl, MIXED_OWN)
    c0 = {key: v for key, v in MIXED_OWN.items() if not key.startswith("graph_mixed")}
    assert ((tl.prefill_tokens > 0) & (tl.dt_s == predict(tl.assign(prefill_tokens=0), c0))).sum() > 5  # on the floor
    got = fit(tl, graph_prefill_tokens=8192, mixed_own=True)
    assert list(got) == [*COEFFICIENTS, "prefill_pair_s", "graph_prefill_pair_s", "graph_mixed_step_s",
                         "graph_mixed_decode_token_s"]
    for key in ("overhead_s", "decode_token_s", "kv_read_token_s", "graph_prefill_token_s", "graph_prefill_pair_s",
                "graph_mixed_step_s", "graph_mixed_decode_token_s"):
        assert got[key] == pytest.approx(MIXED_OWN[key], rel=1e-6, abs=1e-13), key
    plain = fit(tl, graph_prefill_tokens=8192)
    assert np.abs(predict(tl, plain) / tl.dt_s - 1).max() > 0.05
    assert np.abs(predict(tl, got) / tl.dt_s - 1).max() < 1e-9
    runs = [tl.iloc[:450].reset_index(drop=True), tl.iloc[450:].reset_index(drop=True)]
    runs = [r.assign(t_s=r.dt_s.cumsum() - r.dt_s) for r in runs]
    reqs = [_requests(r, [(0, len(r) - 1), (10, 200), (300, len(r) - 1)]) for r in runs]
    joint = fit_metrics(runs, reqs, graph_prefill_tokens=8192, mixed_own=True)
    assert set(joint) == set(got) and min(joint.values()) >= 0
    assert np.abs(predict(tl, joint) / tl.dt_s - 1).max() < 1e-6
