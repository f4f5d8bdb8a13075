"""experiments/prefix_saving.py's extend-against-prefill check: which steps count as over a prefix."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prefix_saving", REPO / "experiments" / "prefix_saving.py")
prefix_saving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prefix_saving)


def _pairs(chunks):  # (prefix, new) per chunk, as kvbench.batch.StepBatch counts them
    return sum(n * p + n * (n + 1) // 2 for p, n in chunks)


def _step(chunks, dt):
    return dict(prefill_tokens=sum(n for _, n in chunks), prefill_pairs=_pairs(chunks), dt_s=dt, running=len(chunks))


def test_only_chunks_over_a_prefix_are_compared_with_plain_prefills_of_the_same_size():
    # with caching: 3 cold prompts (plain, slow: first-run effects) and 3 extends over 1k cached
    cached = pd.DataFrame([_step([(0, 600)], 0.030)] * 3 + [_step([(1024, 600)], 0.0105)] * 3)
    # without caching: plain prefills of 600, and one step of two plain chunks (still plain)
    nocache = pd.DataFrame([_step([(0, 600)], 0.010)] * 3 + [_step([(0, 300), (0, 300)], 0.010)])
    assert prefix_saving.over_prefix(cached).tolist() == [False] * 3 + [True] * 3
    assert not prefix_saving.over_prefix(nocache).any()
    base = prefix_saving.by_prefill_bin(nocache[~prefix_saving.over_prefix(nocache)])
    got = prefix_saving.extend_vs_prefill(prefix_saving.by_prefill_bin(cached[prefix_saving.over_prefix(cached)]), base)
    assert list(got) == ["513-1024"]
    v = got["513-1024"]
    assert (v["steps"], v["steps_nocache"]) == (3, 4)
    assert abs(v["ratio_per_token"] - 1.05) < 1e-9 and v["verdict"] == "pass"  # 10.5 ms against 10 ms
    # every prefill step of the cached run (the old check) would have judged the cold prompts too
    old = prefix_saving.extend_vs_prefill(prefix_saving.by_prefill_bin(cached), base)["513-1024"]
    assert old["steps"] == 6 and old["ratio_per_token"] > 2


def test_a_timeline_without_prefill_pairs_counts_every_prefill_step():
    tl = pd.DataFrame(dict(prefill_tokens=[0, 5, 600]))
    assert prefix_saving.over_prefix(tl).tolist() == [False, True, True]


def test_the_marginal_cost_is_the_slope_of_prefill_cost_over_tokens_not_the_mean():
    # steps cost 1 ms (decode, batch 1) + 0.5 ms fixed + 3 us per prefill token
    def tl(ns):
        rows = [dict(prefill_tokens=0, dt_s=0.001, running=1)] * 3
        return pd.DataFrame(rows + [dict(prefill_tokens=n, dt_s=0.0015 + 3e-6 * n, running=1) for n in ns])
    runs = {"a": ({}, tl([1000, 1000]), None), "b": ({}, tl([40, 100, 400]), None)}
    fixed, slope = prefix_saving.marginal_cost(runs)
    assert abs(slope - 3e-6) < 1e-12 and abs(fixed - 5e-4) < 1e-9
    # the median cost per token of the 1,000-token prefills also holds the fixed part: 3.5 us
    p = prefix_saving.prefill_cost(runs["a"][1])
    assert abs((p.cost_s / p.prefill_tokens).median() - 3.5e-6) < 1e-12
    # one prefill size only: no line
    assert all(x != x for x in prefix_saving.marginal_cost({"a": runs["a"]}))


def test_an_extend_is_judged_against_the_cost_of_its_own_work_not_only_its_new_tokens():
    # the run without caching: steps cost 1 ms (decode, batch 1) + 0.3 ms + 2 us a token + 1 ns a
    # query-key pair, plain prefills and chunks over their own earlier chunks
    def dt(chunks):
        return 0.001 + 3e-4 + 2e-6 * sum(n for _, n in chunks) + 1e-9 * _pairs(chunks)
    dec = [dict(prefill_tokens=0, prefill_pairs=0, dt_s=0.001, running=1)] * 3
    plain = [[(0, n)] for n in (100, 300, 400, 500, 1000, 2000)] + [[(2000, 500)], [(4000, 1000)]]
    nocache = pd.DataFrame(dec + [dict(_step(c, dt(c)), running=1) for c in plain])
    work = prefix_saving.work_model(nocache)
    assert abs(work["step_ms"] - 0.3) < 1e-6 and abs(work["token_us"] - 2) < 1e-6 and abs(work["pair_ns"] - 1) < 1e-6
    assert (work["tokens_min"], work["tokens_max"]) == (100, 2000)
    # with caching: 3 extends of 500 tokens over 8k cached at their work's cost (over twice a plain
    # 500's per token), 3 over 1k at 1.3x theirs, and one outside the fitted range of prefill tokens
    ext, slow = [(8192, 500)], [(1024, 500)]
    cached = pd.DataFrame(dec + [dict(_step(ext, dt(ext)), running=1)] * 3
                          + [dict(_step(slow, 1.3 * (dt(slow) - 0.001) + 0.001), running=1)] * 3
                          + [dict(_step([(1024, 50)], 0.5), running=1)])
    fast = cached[cached.prefill_pairs != _pairs(slow)]
    # per new token, the extends over 8k fail against plain prefills of their size (more work) ...
    per_token = prefix_saving.extend_vs_prefill(
        prefix_saving.by_prefill_bin(fast[prefix_saving.over_prefix(fast)]),
        prefix_saving.by_prefill_bin(nocache[~prefix_saving.over_prefix(nocache)]))
    assert per_token["257-512"]["ratio_per_token"] > 2 and per_token["257-512"]["verdict"] == "FAIL"
    # ... and at equal work they cost exactly what the run without caching pays for it
    got = prefix_saving.extend_at_equal_work(fast, work)
    assert list(got) == ["257-512"] and got["257-512"]["steps"] == 3
    assert abs(got["257-512"]["ratio"] - 1) < 1e-9 and got["257-512"]["verdict"] == "pass"
    got = prefix_saving.extend_at_equal_work(cached[cached.prefill_pairs != _pairs(ext)], work)
    assert abs(got["257-512"]["ratio"] - 1.3) < 1e-9 and got["257-512"]["verdict"] == "FAIL"


def test_each_run_is_judged_against_its_own_strategy_without_caching():
    # paged and radix, each with and without caching; radix's layout makes every step 1.2x slower
    # (its own cost, not its cache's): radix's extends cost what radix without caching pays for
    # that work, and 1.2x what paged without caching does
    def dt(chunks, slow):
        return slow * (0.001 + 3e-4 + 2e-6 * sum(n for _, n in chunks) + 1e-9 * _pairs(chunks))

    def run(slow, chunks):
        dec = [dict(prefill_tokens=0, prefill_pairs=0, dt_s=slow * 0.001, running=1)] * 3
        tl = pd.DataFrame(dec + [dict(_step(c, dt(c, slow)), running=1) for c in chunks])
        cached = [p for c in chunks for p, _ in c[:1]]
        req = pd.DataFrame(dict(status="finished", cached_tokens=cached, ttft_s=0.01, tpot_s=0.001, prompt_len=2048))
        return {"prefix_hit_rate": 0.5}, tl, req

    plain = [[(0, n)] for n in (100, 300, 400, 500, 1000, 2000)] + [[(2000, 500)]]
    hits = [[(1024, 300)]] * 3
    runs = {"m_paged": run(1.0, hits), "m_paged_nocache": run(1.0, plain),
            "m_radix": run(1.2, hits), "m_radix_nocache": run(1.2, plain)}
    rep = prefix_saving.model_report(runs)
    assert {k: r["baseline"] for k, r in rep["runs"].items()} == {
        "m_paged": "m_paged_nocache", "m_paged_nocache": "m_paged_nocache",
        "m_radix": "m_radix_nocache", "m_radix_nocache": "m_radix_nocache"}
    for name in ("m_paged", "m_radix"):
        got = rep["runs"][name]["extend_at_equal_work"]["257-512"]
        assert abs(got["ratio"] - 1) < 1e-6 and got["verdict"] == "pass", name
    assert set(rep["baselines"]) == {"m_paged_nocache", "m_radix_nocache"}
    assert rep["commit"] is None and rep["prefill_marginal_cost_per_token_us"] > 0
    runs["m_paged"][0]["commit"], runs["m_radix"][0]["commit"] = "aa7b354", "edff341"   # runs of two commits: both named
    assert prefix_saving.model_report(runs)["commit"] == "aa7b354, edff341"
    # a sweep with paged_nocache only (before radix_nocache): radix is judged against it
    del runs["m_radix_nocache"]
    got = prefix_saving.model_report(runs)["runs"]["m_radix"]
    assert got["baseline"] == "m_paged_nocache"
    assert abs(got["extend_at_equal_work"]["257-512"]["ratio"] - 1.2) < 1e-6 and got["extend_at_equal_work"]["257-512"]["verdict"] == "FAIL"
    assert "against" in prefix_saving.markdown([prefix_saving.model_report(runs)])


def test_repeats_judge_every_pair_of_a_run_and_its_baseline():
    # two repeats of paged and paged without caching; the second repeat's run without caching is
    # 1.1x slower in every step with prefill (a slower process): the pairs give ratios 1 and 1/1.1
    def tl(chunks, slow):
        dec = [dict(prefill_tokens=0, prefill_pairs=0, dt_s=0.001, running=1)] * 3
        return pd.DataFrame(dec + [dict(_step(c, 0.001 + slow * (3e-4 + 2e-6 * sum(n for _, n in c) + 1e-9 * _pairs(c))),
                                        running=1) for c in chunks])
    plain = [[(0, n)] for n in (100, 300, 400, 500, 1000, 2000)] + [[(2000, 500)]]
    hits = [[(1024, 300)]] * 3
    sweeps = [{"m_paged": ({}, tl(hits, 1.0), None), "m_paged_nocache": ({}, tl(plain, slow), None)}
              for slow in (1.0, 1.1)]
    got = prefix_saving.across_repeats(sweeps)
    assert list(got) == ["m_paged"] and list(got["m_paged"]) == ["257-512"]
    assert sorted(round(x, 6) for x in got["m_paged"]["257-512"]) == [round(1 / 1.1, 6)] * 2 + [1.0] * 2
    reports = [dict(model="m", trace="t")] * 2
    md = prefix_saving.repeats_markdown(reports, sweeps)
    assert "## m, trace t: 2 repeats" in md and "| m_paged | 257-512 | 4 | 0.95 | 0.91-1.00 | 4 of 4 |" in md
    assert prefix_saving.repeats_markdown(reports[:1], sweeps[:1]) == ""  # one sweep: no section


def test_runs_in_small_chunks_join_the_fit_and_measure_the_pair_term():
    # the GPU's cost: 1 ms a decode step (batch 1) + 0.3 ms a step + 2 us a token + 1 ns a pair
    def dt(chunks, noise=1.0):
        return 0.001 + noise * (3e-4 + 2e-6 * sum(n for _, n in chunks) + 1e-9 * _pairs(chunks))

    def tl(steps):
        dec = [dict(prefill_tokens=0, prefill_pairs=0, dt_s=0.001, running=1)] * 3
        return pd.DataFrame(dec + [dict(_step(c, dt(c, x)), running=1) for c, x in steps])
    # the run without caching prefills whole prompts (from 100 tokens), plain but for two steps
    plain = tl([([(0, n)], 1.0) for n in (100, 300, 400, 500, 1000, 2000)] + [([(1000, 500)], 1.0), ([(2000, 500)], 1.0)])
    # the same prompts in chunks of 64 tokens, each over up to 2,816 of its own
    chunks = tl([([(p, 64)], 1.0) for p in range(0, 3072, 256)])
    cached = tl([([(p, 64)], 1.0) for p in (1024, 1536, 2048, 2560)])  # extends over a cached prefix, at the GPU's cost
    # 64 new tokens: outside the range of prefill tokens the plain run saw, so not judged against it
    assert prefix_saving.extend_at_equal_work(cached, prefix_saving.work_model(plain)) == {}
    pooled = prefix_saving.work_model(plain, chunks)
    assert (pooled["tokens_min"], pooled["tokens_max"]) == (64, 2000)
    assert abs(pooled["attended_max"] - (2816 + 32.5)) < 1e-9  # the last chunk's pairs per token
    assert abs(pooled["pair_ns"] - 1) < 1e-6 and abs(pooled["token_us"] - 2) < 1e-6
    got = prefix_saving.extend_at_equal_work(cached, pooled, [plain, chunks])["1-64"]
    assert got["steps"] == 4 and abs(got["ratio"] - 1) < 1e-6 and got["verdict"] == "pass"
    assert got["interval"][0] <= got["ratio"] <= got["interval"][1]
    # model_report: the runs of the same name in small chunks join the baseline's fit
    req = pd.DataFrame(dict(status="finished", cached_tokens=[1024], ttft_s=0.01, tpot_s=0.001, prompt_len=1100))
    runs = {"m_paged": ({}, cached, req), "m_paged_nocache": ({}, plain, req.assign(cached_tokens=0))}
    rep = prefix_saving.model_report(runs, chunked={"m_paged_nocache": [chunks]})
    assert rep["baselines"]["m_paged_nocache"]["chunked_runs"] == 1
    assert rep["baselines"]["m_paged_nocache"]["work_model_pooled"] == pooled
    assert rep["runs"]["m_paged"]["extend_at_equal_work_pooled"]["1-64"]["verdict"] == "pass"
    assert "small prefill chunks" in prefix_saving.markdown([rep])
    assert "extend_at_equal_work_pooled" not in prefix_saving.model_report(runs)["runs"]["m_paged"]
    # beside the chunks, no fit: cell by cell of prefill tokens and pairs a token (the prefix attended over)
    side = rep["runs"]["m_paged"]["side_by_side_chunked"]
    assert list(side) == ["1-64"] and list(side["1-64"]) == ["1000-1999", "2000-3999"]
    cell = side["1-64"]["1000-1999"]  # hits over 1,024 and 1,536; chunks over 1,024, 1,280, 1,536 and 1,792
    assert (cell["steps"], cell["steps_chunked"], cell["tokens"], cell["tokens_chunked"]) == (2, 4, 64, 64)
    assert abs(cell["cost_ms"] - (dt([(1280, 64)]) - 0.001) * 1e3) < 1e-9
    assert abs(cell["cost_ms_chunked"] - (dt([(1408, 64)]) - 0.001) * 1e3) < 1e-9
    assert "no fit" in prefix_saving.markdown([rep])


def test_a_sweep_without_runs_without_caching_takes_the_chunked_ones(tmp_path, monkeypatch):
    def dt(chunks):
        return 0.001 + 3e-4 + 2e-6 * sum(n for _, n in chunks) + 1e-9 * _pairs(chunks)

    def write(folder, name, chunks, cached):
        d = tmp_path / folder / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text('{"model": "m", "trace": "t", "prefix_hit_rate": 0.5}')
        dec = [dict(prefill_tokens=0, prefill_pairs=0, dt_s=0.001, running=1)] * 3
        pd.DataFrame(dec + [dict(_step(c, dt(c)), running=1) for c in chunks]).to_parquet(d / "timeline.parquet")
        pd.DataFrame(dict(status="finished", cached_tokens=[cached], ttft_s=0.01, tpot_s=0.001,
                          prompt_len=2048)).to_parquet(d / "requests.parquet")
    write("cached", "m_paged", [[(p, 48)] for p in (1024, 1536, 2048)], 1024)
    write("chunked", "m_paged_nocache", [[(p, (64, 40, 20)[i % 3])] for i, p in enumerate(range(0, 3072, 256))], 0)
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["prefix_saving", str(tmp_path / "cached"), "--out", str(out)])
    with pytest.raises(SystemExit) as e:  # no baseline at all: one line, exit 2
        prefix_saving.main()
    assert e.value.code == 2 and not out.exists()
    monkeypatch.setattr("sys.argv", ["prefix_saving", str(tmp_path / "cached"), "--chunked", str(tmp_path / "chunked"),
                                     "--out", str(out)])
    prefix_saving.main()
    rep = json.loads((out / "prefix_saving.json").read_text())[0]
    got = rep["runs"]["m_paged"]
    assert got["baseline"] == "m_paged_nocache" and "extend_at_equal_work_pooled" not in got
    assert got["side_by_side_chunked"]["1-64"]["1000-1999"]["steps"] == 2  # (beside the chunked baseline itself)
    assert got["extend_at_equal_work"]["1-64"]["steps"] == 3 and abs(got["extend_at_equal_work"]["1-64"]["ratio"] - 1) < 1e-6
