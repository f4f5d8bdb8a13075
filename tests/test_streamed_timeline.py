"""Issue 13's memory work changes no number: a run whose timeline streams to a parquet file in
small row groups, whose finished requests live in flat arrays and whose ITL stays as runs gives
the same timeline, requests table and summary, bit for bit, as the in-memory path; the runs'
statistics equal numpy's on the expanded array; the lazy synthetic trace equals the eager one;
a failed run leaves no temporary file."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import kvbench.run as run_module
from kvbench.metrics import TIMELINE_DTYPES, Recorder, summarize
from kvbench.replay import replay
from kvbench.runstats import runs_mean, runs_percentiles, runs_sum
from kvbench.scheduler import Scheduler
from kvbench.schema import register
from kvbench.timeline_file import TimelineFile
from kvbench.traces.arrivals import arrival_times
from kvbench.traces.build import random_id_requests
from kvbench.traces.common import LazyTrace
from kvbench.traces.lengths import Uniform
from kvbench.traces.synthetic import synthetic
from kvbench.traces.tokens import OTHER_STREAM, stream

REPO = Path(__file__).resolve().parents[1]


def _cfg(strategy: str, *overrides: str):
    register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["progress=false", f"strategy={strategy}", "trace=synthetic",
                                            "trace.num_requests=150", "kv_capacity_tokens=32768", *overrides])


def _replay(cfg, recorder_of=None, keep_finished=True):
    st = instantiate(cfg.strategy, capacity_tokens=cfg.kv_capacity_tokens, max_model_len=cfg.max_model_len)
    rec = None if recorder_of is None else recorder_of(st.capacity)
    result = replay(instantiate(cfg.trace), Scheduler(st, **cfg.scheduler), instantiate(cfg.engine),
                    progress=False, recorder=rec, keep_finished=keep_finished)
    return result, st.capacity


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _old_requests(result) -> pd.DataFrame:
    """The requests table as the recorder built it before issue 13 (one tuple per request)."""
    rows = []
    for s in result.finished:
        r = s.request
        t = result.recorder_rows[r.id]
        first, finish = t
        ttft, e2e = first - r.arrival_s, finish - r.arrival_s
        rows.append((r.id, r.arrival_s, r.prompt_len, r.output_len, "finished", "", s.cached_tokens,
                     s.preemptions, first, finish, ttft, e2e,
                     (e2e - ttft) / (r.output_len - 1) if r.output_len > 1 else np.nan))
    for r, reason in result.recorder.rejected:
        rows.append((r.id, r.arrival_s, r.prompt_len, r.output_len, "rejected", reason,
                     0, 0, np.nan, np.nan, np.nan, np.nan, np.nan))
    cols = ["id", "arrival_s", "prompt_len", "output_len", "status", "reason", "cached_tokens",
            "preemptions", "first_token_s", "finish_s", "ttft_s", "e2e_s", "tpot_s"]
    return pd.DataFrame.from_records(rows, columns=cols).sort_values("id", ignore_index=True)


@pytest.mark.parametrize("strategy", ["paged", "radix", "slab"])
def test_streamed_run_equals_the_in_memory_run(strategy, tmp_path):
    cfg = _cfg(strategy, "max_model_len=2048")  # some prompts are longer: rejected rows too
    mem, capacity = _replay(cfg)
    sink = TimelineFile(tmp_path / "t.rows", TIMELINE_DTYPES)
    streamed, _ = _replay(cfg, lambda c: Recorder(c, sink=sink, chunk_rows=7), keep_finished=False)
    assert streamed.finished == [] and mem.finished
    assert len(mem.recorder.rejected) > 0
    rec0, rec1 = mem.recorder, streamed.recorder
    assert rec1.num_steps == rec0.num_steps == len(sink) and rec1.last_states() == rec0.last_states()
    assert pq.ParquetFile(sink.path).num_row_groups > rec0.num_steps / 100  # flushed at >= 2 x 7 rows
    t0, t1 = rec0.timeline(), rec1.timeline()
    assert t1.equals(t0) and list(t1.dtypes) == list(t0.dtypes)
    r0, r1 = rec0.requests(), rec1.requests()
    assert r1.equals(r0)
    # the in-memory recorder's table: one row per Seq and rejection, as built before issue 13
    first = {rid: (fs, fe) for rid, fs, fe in zip(r0.id, r0.first_token_s, r0.finish_s)}
    mem.recorder_rows = first
    old = _old_requests(mem)
    assert r0.equals(old) and list(r0.dtypes) == list(old.dtypes)
    # the summary: from frames and the expanded ITL, or from columns read back and ITL runs
    s0 = summarize(r0, t0, capacity, rec0.itl())
    s1 = summarize(r1, rec1.timeline_columns(), capacity, rec1.itl_runs())
    s2 = summarize(r0, rec0.timeline_columns(), capacity, rec0.itl_runs())
    assert set(s0) == set(s1) == set(s2)
    assert {k: (v, s1[k]) for k, v in s0.items() if not _same(v, s1[k])} == {}
    assert {k: (v, s2[k]) for k, v in s0.items() if not _same(v, s2[k])} == {}
    # the file is what to_parquet of the whole frame writes: same schema, pandas metadata included
    t0.to_parquet(tmp_path / "whole.parquet", index=False)
    assert pq.read_schema(sink.path).equals(pq.read_schema(tmp_path / "whole.parquet"), check_metadata=True)


def test_an_empty_recorder_makes_empty_tables(tmp_path):
    rec = Recorder(100, sink=TimelineFile(tmp_path / "t.rows", TIMELINE_DTYPES))
    rec.close()
    assert rec.num_steps == 0 and rec.last_states() is None and len(rec.timeline()) == 0
    assert list(rec.timeline().columns) == list(TIMELINE_DTYPES) and len(rec.requests()) == 0


@pytest.mark.parametrize("fail_in", ["summarize", "to_parquet"])
def test_a_failed_run_leaves_no_temporary_or_half_written_file(fail_in, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("planted failure")
    if fail_in == "summarize":
        monkeypatch.setattr(run_module, "summarize", boom)
    else:
        monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(RuntimeError, match="planted"):
        run_module.run(_cfg("slab", "trace.num_requests=20"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_run_writes_the_streamed_timeline_in_place(tmp_path):
    cfg = _cfg("paged", "trace.num_requests=30")
    summary = run_module.run(cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.yaml", "requests.parquet",
                                                          "summary.json", "timeline.parquet"]
    mem, capacity = _replay(cfg)
    t0 = mem.recorder.timeline()
    assert pd.read_parquet(tmp_path / "timeline.parquet").equals(t0)
    assert pd.read_parquet(tmp_path / "requests.parquet").equals(mem.recorder.requests())
    ref = summarize(mem.recorder.requests(), t0, capacity, mem.itl)
    assert {k: (v, summary[k]) for k, v in ref.items() if not _same(v, summary[k])} == {}


# ---- runs statistics: numpy's, on the array never expanded ----------------------------------------

@settings(max_examples=150, deadline=None)
@given(hs.lists(hs.tuples(hs.one_of(hs.sampled_from([0.0, 0.25, 1e-3, 7.0]),
                                    hs.floats(0, 1e3, allow_nan=False, allow_subnormal=False)),
                          hs.integers(0, 60)), min_size=1, max_size=80),
       hs.sampled_from([128, 200, 1000]))
def test_runs_statistics_equal_numpy_on_the_expanded_array(runs, leaf):
    values = np.array([v for v, _ in runs])
    counts = np.array([c for _, c in runs], dtype=np.int64)
    if counts.sum() == 0:
        counts[0] = 1
    full = np.repeat(values, counts)
    assert runs_sum(values, counts, leaf) == full.sum()
    assert runs_mean(values, counts, leaf) == full.mean()
    assert np.array_equal(runs_percentiles(values, counts, [50, 90, 99]), np.percentile(full, [50, 90, 99]))


def test_runs_sum_follows_numpys_pairwise_tree_on_a_long_array():
    rng = np.random.default_rng(5)
    values = rng.random(40_000) * 10.0 ** rng.integers(-6, 4, 40_000)  # mixed magnitudes: order matters
    counts = rng.integers(1, 20, 40_000)
    full = np.repeat(values, counts)
    for leaf in (128, 4096, 100_000):
        assert runs_sum(values, counts, leaf) == full.sum() and runs_mean(values, counts, leaf) == full.mean()


# ---- the lazy synthetic trace ---------------------------------------------------------------------

def _eager(n, seed, max_model_len, limit):
    """The synthetic trace as it was built before issue 13: one list of Requests."""
    other = stream(seed, OTHER_STREAM)
    times = arrival_times(other, n, 8.0, 1.0)
    prompt_lens, output_lens = Uniform(10, 300).sample(other, n), Uniform(4, 80).sample(other, n)
    return random_id_requests(times, prompt_lens, output_lens, [f"synthetic:{i}" for i in range(n)], seed,
                              32000, max_model_len, limit=limit)


@pytest.mark.parametrize("max_model_len, limit", [(None, None), (200, None), (250, 33)])
def test_lazy_synthetic_trace_equals_the_eager_list(max_model_len, limit):
    lazy = synthetic(num_requests=120, seed=4, prompt_len=Uniform(10, 300), output_len=Uniform(4, 80),
                     max_model_len=max_model_len, limit=limit)
    eager = _eager(120, 4, max_model_len, limit)
    assert isinstance(lazy, LazyTrace) and len(lazy) == len(eager)
    for a, b in zip(lazy, eager):
        assert (a.id, a.arrival_s, a.prompt_len, a.output_len, a.source, a.session, a.meta, a.built) == \
               (b.id, b.arrival_s, b.prompt_len, b.output_len, b.source, b.session, b.meta, b.built)
        assert np.array_equal(a.tokens, b.tokens) and a.tokens.dtype == b.tokens.dtype


def test_lazy_trace_gives_the_same_object_while_it_is_held():
    trace = synthetic(num_requests=10, seed=1)
    r = trace[3]
    r.output[:] = 7  # an engine that samples writes here
    assert trace[3] is r and trace[-7] is r and (trace[3].output == 7).all()
    assert [x.id for x in trace[2:9:3]] == [2, 5, 8] and trace[:0] == []
    assert synthetic(num_requests=5, limit=0) == [] and trace == list(trace)
    with pytest.raises(IndexError):
        trace[10]
