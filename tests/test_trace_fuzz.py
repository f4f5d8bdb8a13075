"""Trace loaders against malformed and odd files: every fault is one line
``<path>:<line>: <field>: <reason>``, raised before any id is built; odd but valid files (BOM,
CRLF, blank lines, header only) parse to exactly the expected requests."""
from __future__ import annotations

import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbench.request import Request
from kvbench.traces import TraceError, azure, burstgpt, mooncake
from kvbench.traces.common import MAX_TOKENS, check_limit

REPO = Path(__file__).resolve().parents[1]
AZ_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens"
BG_HEAD = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"
AZ_OK = "2023-11-16 18:15:46.6805900,374,44"
BG_OK = "5,ChatGPT,472,18,490,Conversation log"
MC_OK = '{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [4, 5]}'


def az(ts="2023-11-16 18:15:50.9951690", ctx="396", gen="109") -> str:
    return f"{ts},{ctx},{gen}"


def bg(ts="45", req="1087", resp="7") -> str:
    return f"{ts},ChatGPT,{req},{resp},0,API log"


def mc(ts="10", inp="700", out="2", ids="[4, 6]", extra="") -> str:
    return f'{{"timestamp": {ts}, "input_length": {inp}, "output_length": {out}, "hash_ids": {ids}{extra}}}'


def file_of(tmp_path: Path, name: str, lines: list[str | bytes], eol: bytes = b"\n") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + eol for x in lines))
    return path


LOADERS = {"azure": (azure, AZ_HEAD, AZ_OK, ".csv"), "burstgpt": (burstgpt, BG_HEAD, BG_OK, ".csv"),
           "mooncake": (mooncake, None, MC_OK, ".jsonl")}
BIG = [str(2**63), str(2**64), "1000000000", "9" * 25, str(MAX_TOKENS + 1)]

# (loader, case, bad line, field): each bad line goes after one good row, so the fault is at line 3
# of a CSV (after the header) and line 2 of a JSONL file.
CASES = [
    *[("azure", f"ContextTokens={v[:12]}", az(ctx=v), "ContextTokens") for v in BIG],
    *[("azure", f"GeneratedTokens={v[:12]}", az(gen=v), "GeneratedTokens") for v in BIG],
    *[("azure", f"ContextTokens={v!r}", az(ctx=v), "ContextTokens")
      for v in ("1.5", "1e3", "1_000", "+5", "-3", "0", "", "nan", "\u0661\u0662", "0x10")],
    ("azure", "undecodable byte", b"2023-11-16 18:15:50.9,39\xff6,109", "ContextTokens"),
    ("azure", "undecodable byte in time", b"2023-11-16 \xc3(18:15:50.9,396,109", "TIMESTAMP"),
    ("azure", "date only", az(ts="2023-11-16"), "TIMESTAMP"),
    ("azure", "no seconds", az(ts="2023-11-16 18:15"), "TIMESTAMP"),
    ("azure", "year 10000", az(ts="10000-01-01 00:00:00"), "TIMESTAMP"),
    ("azure", "year 0", az(ts="0000-01-01 00:00:00"), "TIMESTAMP"),
    ("azure", "30 February", az(ts="2023-02-30 00:00:00"), "TIMESTAMP"),
    ("azure", "10 fraction digits", az(ts="2023-11-16 18:15:50.0123456789"), "TIMESTAMP"),
    ("azure", "year 9999 (span > 2**32 s)", az(ts="9999-12-31 23:59:59.9999999"), "TIMESTAMP"),
    ("azure", "year 2262 (past pandas' range)", az(ts="2262-04-12 00:00:00"), "TIMESTAMP"),
    ("azure", "mixed UTC offsets", az(ts="2023-11-16 18:15:50+00:00"), "TIMESTAMP"),
    ("azure", "field over the csv limit", az(ctx="7" * 200_000), "row"),
    ("azure", "bad quoting", '2023-11-16 18:15:50,"39"6,109', "row"),
    ("azure", "too many fields", az() + ",1", "row"),
    ("azure", "too few fields", "2023-11-16 18:15:50,396", "row"),
    *[("burstgpt", f"Request tokens={v[:12]}", bg(req=v), "Request tokens") for v in BIG],
    *[("burstgpt", f"Response tokens={v[:12]}", bg(resp=v), "Response tokens") for v in BIG],
    *[("burstgpt", f"Timestamp={v[:12]}", bg(ts=v), "Timestamp")
      for v in ("1e15", "4294967296", "1e400", "inf", "nan", "-1", "1_0", "0x1p3", "", "5s")],
    ("burstgpt", "undecodable byte", b"45,Chat\xffGPT,1087,7,0,API log", "Model"),
    ("burstgpt", "field over the csv limit", bg() + "x" * 200_000, "row"),
    ("burstgpt", "bad quoting", '45,"Chat"GPT,1087,7,0,API log', "row"),
    *[("mooncake", f"input_length={v[:12]}", mc(inp=v), "input_length") for v in BIG],
    *[("mooncake", f"output_length={v[:12]}", mc(out=v), "output_length") for v in BIG],
    *[("mooncake", f"input_length={v}", mc(inp=v), "input_length")
      for v in ("700.0", "7e2", '"700"', "true", "null", "-1", "9" * 4000)],
    *[("mooncake", f"timestamp={v[:12]}", mc(ts=v), "timestamp")
      for v in ("1e15", str(2**63), "1e400", "NaN", "Infinity", "-1", '"10"', "true")],
    *[("mooncake", f"hash_ids={v[:12]}", mc(ids=v), "hash_ids")
      for v in (f"[4, {2**63}]", "[4, -1]", "[4, 6.0]", "[4, true]", "[4]", "[4, 6, 7]", '"4,6"', "null")],
    ("mooncake", "missing hash_ids", '{"timestamp": 10, "input_length": 700, "output_length": 2}', "hash_ids"),
    ("mooncake", "repeated key", mc(extra=', "input_length": 9000000'), "input_length"),
    ("mooncake", "integer of 5000 digits", mc(inp="9" * 5000), "row"),
    ("mooncake", "deeply nested", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "row"),
    ("mooncake", "undecodable byte", b'{"timestamp": 10, "input_length": 7\xfe00}', "row"),
    ("mooncake", "not JSON", '{"timestamp": 10,', "row"),
    ("mooncake", "not an object", "[1, 2]", "row"),
]


@pytest.mark.parametrize("loader, case, bad, field", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_malformed_row_is_one_located_line_before_any_id_is_built(tmp_path, loader, case, bad, field):
    load, header, good, ext = LOADERS[loader]
    lines = ([header] if header else []) + [good, bad, good]
    path = file_of(tmp_path, f"bad{ext}", lines)
    tracemalloc.start()  # numpy reports its buffers: a 10^9-token row would show up as GBs
    try:
        with pytest.raises(TraceError) as err:
            load(str(path), max_model_len=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    line = 3 if header else 2
    assert re.match(rf"{re.escape(str(path))}:{line}: {re.escape(field)}: \S", message), message
    assert "\n" not in message and len(message) < 400
    assert peak < 8 * 2**20  # nothing was built for the bad row (a 2**24-token prompt is 64 MiB)


@pytest.mark.parametrize("case, lines, line, field", [
    ("empty CSV", [], 1, "header"),
    ("missing column (no BOM skip)", ["TIMESTAMP;ContextTokens;GeneratedTokens"], 1, "header"),
    ("repeated column", ["TIMESTAMP,ContextTokens,ContextTokens,GeneratedTokens"], 1, "header"),
    ("UTF-16 file", [b"\xff\xfeT\x00I\x00"], 1, "row"),
])
def test_malformed_header(tmp_path, case, lines, line, field):
    path = file_of(tmp_path, "h.csv", lines)
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}:{line}: {field}: "):
        azure(str(path))


def test_unreadable_file(tmp_path, monkeypatch):
    path = file_of(tmp_path, "a.csv", [AZ_HEAD, AZ_OK])

    def denied(file, mode="r"):
        raise PermissionError(13, "Permission denied", str(file))
    monkeypatch.setattr("kvbench.traces.fields.open", denied, raising=False)  # root could read a chmod 0 file
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}:1: file: cannot read it \(Permission denied\)"):
        azure(str(path))


def test_outlier_timestamp_is_blamed_not_the_others(tmp_path):
    rows = [az(ts=f"2023-11-16 18:15:{s:02d}") for s in range(5)]
    path = file_of(tmp_path, "o.csv", [AZ_HEAD, *rows[:3], az(ts="1677-09-22 00:00:00"), *rows[3:]])
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}:5: TIMESTAMP: .* from line 7; "):
        azure(str(path))


# ---- odd but valid files: exact requests ---------------------------------------------------------

EDGES = {"BOM": (b"\xef\xbb\xbf", b"\n", []), "CRLF": (b"", b"\r\n", []),
         "trailing blank lines": (b"", b"\n", ["", "  ", ""]), "all three": (b"\xef\xbb\xbf", b"\r\n", ["", ""])}


def edge_file(tmp_path: Path, name: str, lines: list[str], edge: str) -> Path:
    bom, eol, tail = EDGES[edge]
    path = file_of(tmp_path, name, [*lines, *tail], eol)
    path.write_bytes(bom + path.read_bytes())
    return path


def summary(reqs: list[Request]) -> list[tuple]:
    return [(r.id, r.arrival_s, r.prompt_len, r.output_len, r.source) for r in reqs]


@pytest.mark.parametrize("edge", EDGES)
def test_odd_but_valid_files_parse_exactly(tmp_path, edge):
    a = edge_file(tmp_path, "a.csv", [AZ_HEAD, AZ_OK, az(), az(ts="2023-11-16 18:16:00", ctx="2", gen="7")], edge)
    assert summary(azure(str(a))) == [(0, 0.0, 374, 44, "a.csv:2"), (1, 4.314579, 396, 109, "a.csv:3"),
                                      (2, 13.31941, 2, 7, "a.csv:4")]
    b = edge_file(tmp_path, "b.csv", [BG_HEAD, BG_OK, bg()], edge)
    assert summary(burstgpt(str(b))) == [(0, 0.0, 472, 18, "b.csv:2"), (1, 40.0, 1087, 7, "b.csv:3")]
    m = edge_file(tmp_path, "m.jsonl", [MC_OK, mc()], edge)
    reqs = mooncake(str(m))
    assert summary(reqs) == [(0, 0.0, 600, 3, "m.jsonl:1"), (1, 0.01, 700, 2, "m.jsonl:2")]
    assert np.array_equal(reqs[0].prompt[:512], reqs[1].prompt[:512])  # hash id 4 in both
    plain = tmp_path / "plain"
    plain.mkdir()
    same = azure(str(file_of(plain, "a.csv", [AZ_HEAD, AZ_OK, az(), az(ts="2023-11-16 18:16:00", ctx="2", gen="7")])))
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(azure(str(a)), same))  # same ids


def test_empty_traces_are_empty_lists(tmp_path):
    assert azure(str(file_of(tmp_path, "h.csv", [AZ_HEAD]))) == []
    assert burstgpt(str(file_of(tmp_path, "b.csv", [BG_HEAD, "", ""]))) == []
    assert mooncake(str(file_of(tmp_path, "m.jsonl", []))) == []
    assert mooncake(str(file_of(tmp_path, "m.jsonl", ["", " "]))) == []
    full = file_of(tmp_path, "a.csv", [AZ_HEAD, AZ_OK])
    assert azure(str(full), limit=0) == [] and len(azure(str(full), limit=1)) == 1
    assert burstgpt(str(file_of(tmp_path, "f.csv", [BG_HEAD, bg(resp="0")]))) == []  # all failed


def test_timezones_convert_to_utc(tmp_path):
    path = file_of(tmp_path, "z.csv", [AZ_HEAD, az(ts="2023-11-16 18:00:00.5+01:00"), az(ts="2023-11-16T17:00:02Z")])
    assert [r.arrival_s for r in azure(str(path))] == [0.0, 1.5]


@pytest.mark.parametrize("bad", [1.5, True, -1, "3", 2.0])
def test_limit_must_be_a_non_negative_integer(tmp_path, bad):
    path = file_of(tmp_path, "a.csv", [AZ_HEAD, AZ_OK, az()])
    with pytest.raises(TraceError, match=r"trace\.limit must be null or an integer >= 0"):
        azure(str(path), limit=bad)
    assert check_limit(np.int64(2)) == 2 and check_limit(None) is None


def test_a_rate_that_spreads_arrivals_past_2_32_s_is_an_error(tmp_path):
    from kvbench.traces import synthetic

    path = file_of(tmp_path, "a.csv", [AZ_HEAD, AZ_OK, az()])
    assert [r.arrival_s for r in azure(str(path), rate=1e-9)] == [0.0, 1e9]
    with pytest.raises(TraceError, match=r"rate=1e-10 spreads the arrivals over 1e\+10 s"):
        azure(str(path), rate=1e-10)
    with pytest.raises(TraceError, match=r"rate=1e-12 spreads"):
        synthetic(num_requests=5, rate=1e-12)


# ---- over-long rows: kept, left unbuilt, rejected for their length -------------------------------

def test_rows_longer_than_max_model_len_are_unbuilt_and_rejected(tmp_path):
    from kvbench.scheduler import Scheduler
    from kvbench.strategies.paged import PagedStrategy

    big = str(MAX_TOKENS)  # the largest legal length: 64 MiB of ids if it were built
    path = file_of(tmp_path, "a.csv", [AZ_HEAD, AZ_OK, az(ctx=big), az(ts="2023-11-16 18:16:00", ctx="2", gen="7")])
    tracemalloc.start()
    try:
        reqs = azure(str(path), max_model_len=1000)
        sched = Scheduler(PagedStrategy(4096, 1000, page_size=16), max_num_seqs=4, max_num_batched_tokens=512)
        reasons = [sched.rejection(r) for r in reqs]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(r.prompt_len, r.built) for r in reqs] == [(374, True), (MAX_TOKENS, False), (2, True)]
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1].startswith(f"max_model_len: prompt + output = {MAX_TOKENS + 109} tokens")
    assert peak < 8 * 2**20 and not reqs[1].built
    # the built rows have the ids they would have without any over-long row before them
    short = azure(str(file_of(tmp_path, "s.csv", [AZ_HEAD, AZ_OK, az(ts="2023-11-16 18:16:00", ctx="2", gen="7")])))
    assert np.array_equal(reqs[0].tokens, short[0].tokens)
    assert len(reqs[1].tokens) == MAX_TOKENS + 109 and reqs[1].built  # built on first read
    assert np.array_equal(reqs[1].tokens, azure(str(path), max_model_len=1000)[1].tokens)  # deterministic


def test_mooncake_unbuilt_row_builds_the_same_blocks(tmp_path):
    path = file_of(tmp_path, "m.jsonl", [MC_OK, mc(inp="1100", ids="[4, 5, 9]")])
    lazy = mooncake(str(path), max_model_len=1000)
    eager = mooncake(str(path))
    assert [r.built for r in lazy] == [True, False]
    assert np.array_equal(lazy[0].tokens, eager[0].tokens)
    assert np.array_equal(lazy[1].tokens, eager[1].tokens)  # its blocks, and its drawn output
    assert np.array_equal(lazy[1].prompt[:600], lazy[0].prompt)  # hash ids 4, 5 lead both


# ---- hypothesis: random damage to a valid file ---------------------------------------------------

NASTY = ["", ",", '"', "\n", "\r", "\x00", "\xff", "-1", "0", "1.5", "1e400", "nan", str(2**64),
         "9" * 40, "2023-11-16", "}", "{", "[", "]", '"x"', "null", "true", " "]


@st.composite
def damaged(draw, text: str) -> bytes:
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "byte"]))
        if kind == "insert":
            data[at:at] = draw(st.sampled_from(NASTY)).encode("latin-1")
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            data[at:at] = bytes([draw(st.integers(0, 255))])
    return bytes(data)


def _fuzz(tmp_path_factory, load, text: str, data: bytes, suffix: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"t{suffix}"
    path.write_bytes(data)
    try:
        reqs = load(str(path), max_model_len=100_000)
    except TraceError as err:
        assert re.match(rf"{re.escape(str(path))}:\d+: [^:]+: \S", str(err)), str(err)
        assert "\n" not in str(err)
        return
    assert [r.id for r in reqs] == list(range(len(reqs)))
    for r in reqs:
        assert 1 <= r.prompt_len <= MAX_TOKENS and 1 <= r.output_len <= MAX_TOKENS
        assert 0.0 <= r.arrival_s < 2**32


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
AZ_TEXT = "\n".join([AZ_HEAD, AZ_OK, az(), az(ts="2023-11-16 18:16:00.0000001", ctx="2", gen="7")]) + "\n"
BG_TEXT = "\n".join([BG_HEAD, BG_OK, bg(), bg(ts="118", resp="0")]) + "\n"
MC_TEXT = "\n".join([MC_OK, mc(), mc(ts="20", inp="512", ids="[6]")]) + "\n"


@FUZZ
@given(data=damaged(AZ_TEXT))
def test_fuzz_azure(tmp_path_factory, data):
    _fuzz(tmp_path_factory, azure, AZ_TEXT, data, ".csv")


@FUZZ
@given(data=damaged(BG_TEXT))
def test_fuzz_burstgpt(tmp_path_factory, data):
    _fuzz(tmp_path_factory, burstgpt, BG_TEXT, data, ".csv")


@FUZZ
@given(data=damaged(MC_TEXT))
def test_fuzz_mooncake(tmp_path_factory, data):
    _fuzz(tmp_path_factory, mooncake, MC_TEXT, data, ".jsonl")


# ---- the command line ----------------------------------------------------------------------------

def test_cli_bad_trace_file_is_one_line_and_exit_2(tmp_path):
    bad = file_of(tmp_path, "bad.csv", [AZ_HEAD, AZ_OK, az(ctx="1000000000000")])
    proc = subprocess.run(
        [sys.executable, "-m", "kvbench.cli", "trace=azure_conv", f"trace.path={bad}", "trace.limit=5",
         "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: "), proc.stderr
    assert (f"{bad}:3: ContextTokens: expected an integer in [1, 16777216], got '1000000000000'"
            in lines[0]), lines[0]
    assert not (tmp_path / "run" / "summary.json").exists()
