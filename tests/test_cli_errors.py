"""Odd input (issue 11): every class gets one line on stderr and exit code 2 (130 for Ctrl-C),
or correct behaviour. Exit codes through the real CLI (subprocess); config ranges in-process."""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kvbench.run import OutputError, run
from kvbench.schema import ConfigError, register, validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SMALL = ["trace.num_requests=5", "progress=false"]


def kvbench(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbench.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def one_line_error(out: subprocess.CompletedProcess, expect: str, rc: int = 2) -> None:
    assert out.returncode == rc, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("kvbench: error: ") and expect in out.stderr, out.stderr


def composed(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---- Hydra's own errors: one line, exit 2 ------------------------------------------------------
HYDRA_CASES = [
    (["kv_capacity_tokens=abc"],
     "Value 'abc' of type 'str' could not be converted to Integer (key kv_capacity_tokens)"),
    (["kv_capacity_tokens=1e20"], "Value '1e+20' of type 'float' could not be converted to Integer"),
    (["strategy.reservation=oracle"], "Could not override 'strategy.reservation': Key 'reservation' is not in struct"),
    (["a=b=c"], "cannot parse the override 'a=b=c'"),
    (["trace="], "Could not find 'trace/' (choose from: azure_code, azure_conv, "),
    (["hydra/launcher=nope"], "Could not find 'hydra/launcher/nope' (choose from: basic, "),
]
if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
    HYDRA_CASES.append((["-m", "hydra/launcher=ray_cluster"],
                        "the Hydra plugin hydra_ray_launcher is not installed (pip install hydra-ray-launcher)"))


def cli_main(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """kvbench.cli.main in this process (no interpreter start-up): its exit code and output."""
    from kvbench import cli

    monkeypatch.setattr(sys, "argv", ["kvbench", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it to 1; monkeypatch restores it
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_.value.code, out.out, out.err)


@pytest.mark.parametrize("args, expect", HYDRA_CASES, ids=[" ".join(a) for a, _ in HYDRA_CASES])
def test_hydra_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, expect):
    one_line_error(cli_main(monkeypatch, capsys, *args, *SMALL, f"hydra.run.dir={tmp_path}",
                            f"hydra.sweep.dir={tmp_path}"), expect)
    assert not list(tmp_path.rglob("summary.json"))


def test_a_hydra_error_through_the_real_cli_exits_2(tmp_path):
    one_line_error(kvbench("strategy.reservation=oracle", f"hydra.run.dir={tmp_path}"),
                   "To append to your config use +strategy.reservation=oracle")


# ---- values out of range: ConfigError at config time -------------------------------------------
RANGE_CASES = [
    (["kv_capacity_gb=inf"], "kv_capacity_gb=inf: must be a finite number > 0 or null"),
    (["kv_capacity_gb=1", "model.num_layers=0"], "model.num_layers=0: must be an integer >= 1"),
    (["model.num_kv_heads=0"], "model.num_kv_heads=0: must be an integer >= 1"),
    (["model.dtype=int4"], "model.dtype='int4': must be one of bfloat16, float16, float32, float8_e4m3fn, "
                            "float8_e5m2 (aliases: float8 = float8_e4m3fn, fp8 = float8_e4m3fn)"),
    (["+scheduler.foo=1"], "scheduler.foo: not a parameter of Scheduler"),
    (["scheduler.max_num_seqs=0"], "scheduler.max_num_seqs=0: must be an integer >= 1"),
    (["engine.overhead_s=nan"], "engine.overhead_s=nan: must be a finite number >= 0"),
    (["engine.overhead_s=inf"], "engine.overhead_s=inf: must be a finite number >= 0"),
    (["engine.decode_token_s=-1e-5"], "engine.decode_token_s=-1e-05: must be a finite number >= 0"),
    (["engine=gpu", "engine.blas=cublasLt"], "engine.blas='cublasLt': must be one of cublaslt, cublas, default"),
    (["strategy.page_size=1.5"], "strategy.page_size=1.5: must be an integer >= 1"),
    (["strategy.page_size=0"], "strategy.page_size=0: must be an integer >= 1"),
    (["strategy.prefix_caching=abc"], "strategy.prefix_caching='abc': must be true or false"),
    (["+strategy.foo=1"], "strategy.foo: not a parameter of PagedStrategy"),
    (["strategy=slab", "strategy.reservation=oracl"], "strategy.reservation='oracl': must be one of max, pow2, oracle"),
    (["trace=azure_conv", "trace.limit=1.5"], "trace.limit=1.5: must be an integer >= 0 or null"),
    (["trace.rate=-1"], "trace.rate=-1: must be a number > 0 (inf allowed)"),
    (["trace.num_requests=0"], "trace.num_requests=0: must be an integer >= 1"),
    (["kv_capacity_tokens=0"], "kv_capacity_tokens=0: must be an integer >= 1 or null"),
    (["max_model_len=0"], "max_model_len=0: must be an integer >= 1"),
    (["trace.prompt_len.min=100", "trace.prompt_len.max=10"], "trace.prompt_len: min=100 > max=10"),
]


@pytest.mark.parametrize("overrides, expect", RANGE_CASES, ids=[" ".join(o) for o, _ in RANGE_CASES])
def test_values_out_of_range_are_config_errors_naming_key_value_and_range(overrides, expect):
    with pytest.raises(ConfigError) as err:
        validate(composed(*overrides))
    assert str(err.value).startswith(expect), str(err.value)


@pytest.mark.parametrize("group, name", [(g, p.stem) for g in ("strategy", "trace", "engine", "model", "logger")
                                         for p in sorted((CONFIGS / g).glob("*.yaml"))])
def test_every_shipped_config_is_in_range(group, name):
    extra = {"burstgpt": ["trace.path=x.csv"], "recorded": ["engine.timeline=x.parquet"]}.get(name, [])
    validate(composed(f"{group}={name}", *extra))


def test_a_pool_of_2_31_pages_or_more_is_refused_before_anything_is_built(tmp_path):
    cfg = composed("strategy=slab", f"kv_capacity_tokens={2**31}", *SMALL)
    with pytest.raises(ConfigError, match=r"has 2147483648 pages: must be 1 to 2147483647 \(int32 page tables\)"):
        run(cfg, tmp_path)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "requests.parquet").exists()


def test_a_config_error_through_the_cli_is_one_line_and_leaves_its_reason(tmp_path):
    one_line_error(kvbench("engine.overhead_s=nan", *SMALL, f"hydra.run.dir={tmp_path}"), "engine.overhead_s=nan")
    assert (tmp_path / "error.txt").read_text().startswith("kvbench: error: engine.overhead_s=nan: must be")
    assert "engine.overhead_s=nan" in (tmp_path / "run.log").read_text()
    assert not (tmp_path / "summary.json").exists()


# ---- empty traces, experiments without -m, -m after an override ---------------------------------
def test_a_trace_without_requests_is_an_error_not_a_table_of_dashes(tmp_path):
    one_line_error(kvbench("trace.limit=0", *SMALL, f"hydra.run.dir={tmp_path}"),
                   "trace 'synthetic' has no requests: nothing to replay")
    assert not (tmp_path / "summary.json").exists()
    header_only = tmp_path / "empty.csv"
    header_only.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(ValueError, match="no requests|no rows|empty"):  # ConfigError or the loader's TraceError
        run(composed("trace=azure_conv", f"trace.path={header_only}", "progress=false"), tmp_path / "r")
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.parametrize("arg", ["experiment=page_size", "+experiment=page_size"])  # `+`: the older spelling
def test_an_experiment_without_multirun_is_refused(monkeypatch, capsys, arg):
    out = cli_main(monkeypatch, capsys, arg)
    one_line_error(out, "'experiment=page_size' is a sweep: run it with -m (kvbench -m experiment=page_size)")


def test_multirun_flag_after_the_overrides_still_sweeps(tmp_path):
    out = kvbench("strategy=slab,radix", *SMALL, f"hydra.sweep.dir={tmp_path}", "-m")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list(tmp_path.glob("*/summary.json"))) == 2


# ---- run dirs that cannot be written ------------------------------------------------------------
def test_an_unwritable_run_dir_is_one_line_before_any_replay(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    one_line_error(kvbench(*SMALL, f"hydra.run.dir={blocker / 'run'}"), f"cannot write {blocker / 'run'}")
    # in-process: the replay never starts when the dir cannot be written
    import kvbench.run as run_module

    monkeypatch.setattr(run_module, "replay", lambda *a, **k: pytest.fail("replayed into an unwritable dir"))
    with pytest.raises(OutputError, match="cannot write .*a_file/run2: Not a directory"):
        run(composed(*SMALL), blocker / "run2")


# ---- Ctrl-C -------------------------------------------------------------------------------------
def test_ctrl_c_exits_130_quietly_and_leaves_no_partial_output(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "kvbench.cli", "trace.num_requests=200000", "trace.rate=2000",
                             "progress=false", f"hydra.run.dir={run_dir}"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # a shell's background job (e.g. `.ci/run &`) ignores SIGINT, and a child
                            # inherits that: Python would then never raise KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (run_dir / "run.log").exists() or "kvbench" not in (run_dir / "run.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "kvbench: interrupted\n"
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == [".hydra", ".lock", "error.txt", "run.log"], left  # no table, no marker, no temporary file
    assert (run_dir / "error.txt").read_text().startswith("kvbench: interrupted")


def test_the_cli_runs_where_no_hydra_plugin_is_installed(tmp_path):
    """`pip install -e .` alone installs no `hydra_plugins` package (hydra-joblib-launcher, in the
    test extras, does): the README's run command from another folder must still work, the
    repository's own launcher included."""
    code = ("import sys; sys.modules['hydra_plugins'] = None  # as if no Hydra plugin were installed\n"
            "from kvbench.cli import main; main()")
    for args in (["trace.limit=5", f"hydra.run.dir={tmp_path / 'one'}"],
                 ["-m", "hydra/launcher=parallel", "strategy=slab,paged", "trace.limit=5",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "one" / "summary.json").exists()
    assert sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json")) == ["0_slab-max_synthetic",
                                                                                         "1_paged-16_synthetic"]


def test_a_ctrl_c_inside_a_weakref_callback_is_raised_again_not_printed(monkeypatch, capsys):
    """CPython drops an exception raised in a weakref callback ("Exception ignored", a traceback
    on stderr) and runs on: a Ctrl-C there was lost (a flaky sweep Ctrl-C test). With the CLI's
    unraisable hook the same KeyboardInterrupt reaches the main thread, and nothing is printed."""
    import weakref

    from kvbench.cli import _ctrl_c_in_a_callback

    class Obj:
        pass

    def ctrl_c(_ref):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "unraisablehook", _ctrl_c_in_a_callback)
    # (as in a terminal: a background job, e.g. `.ci/run &`, starts with SIGINT ignored, and then
    # nothing can interrupt the main thread)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    obj = Obj()
    ref = weakref.ref(obj, ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            del obj  # the callback runs here; the interrupt comes a moment later
            for _ in range(2000):
                time.sleep(0.001)
    finally:
        signal.signal(signal.SIGINT, before)
    assert ref() is None
    err = capsys.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err
    # anything else is still reported as CPython does
    def boom(_ref):
        raise ValueError("in a callback")
    obj = Obj()
    ref = weakref.ref(obj, boom)
    del obj
    assert "ValueError: in a callback" in capsys.readouterr().err


def test_a_graph_warmup_bounded_below_the_schedulers_batch_is_named():
    """engine.max_num_seqs under the scheduler's (gpu_refit_runs.sh's short warm-up) gets a warning
    line naming both limits; the default (the engine's limit is the scheduler's) and a warm-up of
    none get none."""
    from kvbench.cli import warmup_gap
    gap = warmup_gap(composed("engine=gpu", "engine.cuda_graphs=true", "engine.graph_warmup=all", "engine.max_num_seqs=16"))
    assert gap is not None and "engine.max_num_seqs=16 < scheduler.max_num_seqs=256" in gap
    assert warmup_gap(composed("engine=gpu", "engine.cuda_graphs=true", "engine.graph_warmup=all")) is None
    assert warmup_gap(composed("engine=gpu", "engine.cuda_graphs=true", "engine.graph_warmup=none", "engine.max_num_seqs=16")) is None
    assert warmup_gap(composed("engine=gpu", "engine.cuda_graphs=true", "engine.graph_warmup=all", "engine.max_num_seqs=16",
                               "scheduler.max_num_seqs=16")) is None
    assert warmup_gap(composed("engine=gpu", "engine.max_num_seqs=16")) is None   # no graphs
    assert warmup_gap(composed()) is None   # the sim
