"""kvbench against NVIDIA Dynamo's compiled mocker replay on the same work (issue 13: "say in the
README how kvbench compares with the compiled simulator on the same work, and why"). Opt-in: not
a test, never run by CI, and the mocker is never a dependency of kvbench.

The peer: `dynamo.replay.run_trace_replay` from `ai-dynamo-runtime==1.6.1` (its native core links
AISimulate's Rust engine) plus `ai-dynamo==1.6.1` installed with --no-deps, in a scratch venv of
its own (`--install` makes it; default /tmp/dynamo-venv or $DYNAMO_VENV). If that venv cannot be
made (no package index), the mocker's rows are left out with one line on stderr and kvbench's
side still runs.

The same work on both sides: one pool of 131,072 slots (8,192 blocks of 16 tokens), 256
sequences, 8,192 tokens a step, prefix caching on, LRU: kvbench's defaults, and the mocker's
`extra_engine_args={"engine": {"num_gpu_blocks": 8192, "block_size": 16, "max_num_seqs": 256,
"max_num_batched_tokens": 8192, "enable_prefix_caching": True}}` (its other engine settings at
their defaults: vLLM-like scheduler, chunked prefill, LRU, its polynomial timing model).
- `azure_conv:N`: the first N rows of the Azure conversation trace (`all`: the whole file), as
  kvbench reads them (`kvbench.traces.azure.read_azure_rows`: times relative to the first row,
  exact to the ns), written as the mocker's Mooncake JSONL: timestamp in ms, input_length,
  output_length, one fresh hash id per 16 prompt tokens (no sharing, as kvbench gives each
  prompt its own random ids), `trace_block_size=16`.
- `mooncake:N`: the Mooncake FAST'25 synthetic trace of kvbench's overloaded benchmark
  (`tests/bench/test_replay.py`, `trace=mooncake max_model_len=200000`), its first N rows
  rewritten with 16-token hash ids: page k of a prompt is page k % 32 of its 512-token hash id
  k // 32 (id * 32 + k % 32), so equal 512-token blocks, and equal leading parts of a partial
  last one, are equal pages, as kvbench's token ids make them; a partial last page gets a fresh
  id (kvbench never matches one). `trace_block_size=16`. Slab is left out (a 200k-token
  reservation does not fit the pool). The mocker also replays the rows as they are with blocks
  of 512 (256 blocks: the old docs' row; 32x fewer blocks, so not the same work): tool
  `mocker_blocks512`.
- `mooncake_1m:N`: the same at 1,048,576 slots (65,536 blocks).
- `mooncake_fit:N`: the same in a pool that holds every page of the N requests (nothing is
  evicted or preempted), plus paged with `strategy.prefix_visibility=scheduled` (strategy
  `paged_scheduled`): a page is hittable once its step is scheduled, the mocker's rule (kvbench's
  default: once computed). The check that both count the same hits: paged_scheduled's hit rate
  equals the mocker's (0.086383 on the first 500, checked); with other pools or kvbench's default
  rule they differ a little, as the two cost models schedule and evict differently.

Measured per round, interleaved (every work, tool and strategy once a round, the order rotated
each round), each in its own child process:
- mocker, `whole_process_cpu_s`: user + sys of a child that imports dynamo and replays the file
  (os.wait4's rusage: every thread of the child); `replay_cpu_s`: process_time around the call;
- kvbench, `whole_process_cpu_s`: `python -m kvbench.cli strategy=S <work's overrides>` (what
  `kvbench strategy=S trace=azure_conv trace.limit=N` runs: trace, replay, summary, files);
- kvbench, `replay_cpu_s`: process_time of `kvbench.replay.replay` alone as
  tests/bench/test_replay.py times it (trace built first; `--warmup` replays before it).
The CSV (results/benchmarks/peer_mocker.csv, written to a temporary name, then renamed) has one
row per work, tool, strategy and measure: the median of the rounds, every run, the 1-minute load
average before each run, the machine, the commit, and what the replay reported (steps, finished,
prefix hit rates: kvbench's first-admission rate and the mocker's first-admission and
all-admission ratios), and the 16-token KV blocks the requests fill (sum of ceil((input +
output) / 16)) with the CPU time per block.

    python tests/bench/peer_mocker.py --install                     # make /tmp/dynamo-venv once
    python tests/bench/peer_mocker.py --works azure_conv:200 --rounds 1 --out /tmp/peer.csv
    python tests/bench/peer_mocker.py --works azure_conv:1 azure_conv:2000 azure_conv:10000 \\
        azure_conv:all mooncake:all mooncake_fit:500 --rounds 3 --at HEAD   # docs/benchmarks.md's run
    python tests/bench/peer_mocker.py --table                       # the CSV as markdown tables
    python tests/bench/peer_mocker.py --profile paged --works azure_conv:10000   # where paged's time goes

`--at COMMIT` runs kvbench from `git archive COMMIT` in a temporary folder (this venv, with
PYTHONPATH on it), so other people's uncommitted edits in this checkout are not measured; without
it this checkout runs, and its commit is recorded with "+dirty" if kvbench's sources differ.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "benchmarks" / "peer_mocker.csv"
VENV = Path(os.environ.get("DYNAMO_VENV", "/tmp/dynamo-venv"))
MOCKER_PINS = ["ai-dynamo-runtime==1.6.1", "ai-dynamo==1.6.1"]
AZURE_CONV = "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv"
MOONCAKE = "mooncake-fast25/synthetic_trace.jsonl"
POOL = 131072  # slots: kvbench's default kv_capacity_tokens
BLOCK = 16
SUB = 512 // BLOCK  # 16-token blocks in one of Mooncake's 512-token hash blocks
ENGINE = {"block_size": BLOCK, "max_num_seqs": 256, "max_num_batched_tokens": 8192, "enable_prefix_caching": True}
STRATEGIES = ["slab", "paged", "radix"]
# paged with pages hittable once scheduled (vLLM V1's and the mocker's rule; kvbench's default is
# once computed): run on the Mooncake checks, where its hit rate must equal the mocker's
VARIANTS = {"paged_scheduled": ["strategy=paged", "strategy.prefix_visibility=scheduled"]}


def strategy_overrides(strategy: str) -> list[str]:
    return VARIANTS.get(strategy, [f"strategy={strategy}"])
FIELDS = ["date_utc", "machine", "python", "kvbench_commit", "mocker", "work", "requests", "pool_slots", "tool",
          "strategy", "measure", "median_s", "runs_s", "load_1m", "wall_median_s", "steps", "finished", "rejected", "preemptions", "hit_rate",
          "hit_rate_all_admissions", "kv_blocks16", "ns_per_block16", "note"]

# the mocker's child: argv = trace file, trace_block_size, block_size, num_gpu_blocks
_MOCKER = r"""
import json, sys, time
from importlib.metadata import version
from dynamo.replay import run_trace_replay
path, tbs, bs, nb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
engine = dict(json.loads(sys.argv[5]), block_size=bs, num_gpu_blocks=nb)
t = time.process_time()
rep = run_trace_replay([path], extra_engine_args={"engine": engine}, trace_block_size=tbs)
cpu = time.process_time() - t
s = rep.summary
print(json.dumps(dict(replay_cpu_s=cpu, finished=s["completed_requests"], requests=s["num_requests"],
                      hit_rate=s["first_admission_prefix_cache_reused_ratio"],
                      hit_rate_all_admissions=s["prefix_cache_reused_ratio"], duration_s=s["duration_ms"] / 1e3,
                      mocker="ai-dynamo-runtime " + version("ai-dynamo-runtime"))))
"""

# kvbench's replay alone, as tests/bench/test_replay.py times it: argv = strategy, warmup, overrides...
_REPLAY = r"""
import gc, json, sys, time
from pathlib import Path
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from kvbench.replay import replay
from kvbench.run import strategy_sizes
from kvbench.scheduler import Scheduler
from kvbench.schema import register
warmup, overrides = int(sys.argv[1]), sys.argv[2:]
register()
with initialize_config_dir(config_dir={configs!r}, version_base="1.3"):
    cfg = compose("config", overrides=["progress=false", *overrides])
requests = list(instantiate(cfg.trace))
def once():
    engine = instantiate(cfg.engine)
    sizes = strategy_sizes(cfg, cfg.kv_capacity_tokens)
    st = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=cfg.kv_capacity_tokens,
                                                   max_model_len=cfg.max_model_len, **sizes)
    sched = Scheduler(st, **cfg.scheduler)
    gc.collect()
    t = time.process_time()
    result = replay(requests, sched, engine, progress=False)
    return time.process_time() - t, result
for _ in range(warmup):
    once()
cpu, result = once()
fin = result.finished
prompt = sum(s.request.prompt_len for s in fin)
print(json.dumps(dict(replay_cpu_s=cpu, finished=len(fin), rejected=len(result.recorder.rejected),
                      hit_rate=sum(s.cached_tokens for s in fin) / prompt if prompt else 0.0)))
"""

# where the replay's CPU goes (cProfile), grouped by file: argv = strategy, overrides...
_PROFILE = r"""
import cProfile, collections, json, pstats, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from kvbench.replay import replay
from kvbench.run import strategy_sizes
from kvbench.scheduler import Scheduler
from kvbench.schema import register
overrides = sys.argv[1:]
register()
with initialize_config_dir(config_dir={configs!r}, version_base="1.3"):
    cfg = compose("config", overrides=["progress=false", *overrides])
requests = list(instantiate(cfg.trace))
engine = instantiate(cfg.engine)
st = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=cfg.kv_capacity_tokens, max_model_len=cfg.max_model_len,
                                               **strategy_sizes(cfg, cfg.kv_capacity_tokens))
prof = cProfile.Profile()
prof.enable()
result = replay(requests, Scheduler(st, **cfg.scheduler), engine, progress=False)
prof.disable()
stats = pstats.Stats(prof).stats
by_file, calls = collections.Counter(), {{}}
for (file, line, name), (cc, nc, tt, ct, callers) in stats.items():
    parts = Path(file).parts
    key = "/".join(parts[-2:]) if "kvbench" in parts or "strategies" in parts else ("<builtins>" if file == "~" else "<other>")
    by_file[key] += tt
    if "strategies" in parts:
        calls[f"{{parts[-1]}}:{{name}}"] = nc
total = sum(by_file.values())
print(json.dumps(dict(total_s=total, requests=len(requests), share={{k: v / total for k, v in by_file.most_common(12)}},
                      calls_per_request={{k: v / len(requests) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:25]}})))
"""


def fail(msg: str) -> None:
    print(f"peer_mocker: {msg}", file=sys.stderr)
    sys.exit(2)


def run_child(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, str]:
    """Run `cmd`; return (user + sys CPU s of the child, every thread; its wall s; its stdout).
    Raises on failure."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        if proc.returncode != 0:
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}: {' | '.join(tail)}")
    return usage.ru_utime + usage.ru_stime, wall, text


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ---------------------------------------------------------------- the mocker's venv

def mocker_python() -> Path | None:
    py = VENV / "bin" / "python"
    if not py.is_file():
        return None
    ok = subprocess.run([str(py), "-c", "import dynamo.replay"], capture_output=True)
    return py if ok.returncode == 0 else None


def install() -> Path | None:
    """Make the scratch venv: the runtime with its dependencies, then ai-dynamo without them."""
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(VENV / "bin" / "pip"), "install", "-q", MOCKER_PINS[0]],
             [str(VENV / "bin" / "pip"), "install", "-q", "--no-deps", MOCKER_PINS[1]]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
            print(f"peer_mocker: cannot install the mocker ({' '.join(cmd[-2:])}): {last}; its rows are left out",
                  file=sys.stderr)
            return None
    return mocker_python()


# ---------------------------------------------------------------- works

class Work:
    """One trace slice: kvbench's overrides, the mocker's trace file and engine, the block count."""

    def __init__(self, spec: str, tmp: Path, traces: Path):
        name, _, n = spec.partition(":")
        if name not in ("azure_conv", "mooncake", "mooncake_1m", "mooncake_fit"):
            fail(f"--works: unknown work {name!r} (azure_conv:N, mooncake:N, mooncake_1m:N, mooncake_fit:N; "
                 f"N a count or 'all')")
        if n not in ("", "all") and not (n.isdigit() and int(n) > 0):
            fail(f"--works: {spec!r}: N must be a positive count or 'all'")
        self.name, self.limit = name, (int(n) if n.isdigit() else None)
        self.label = f"{name}:{self.limit or 'all'}"
        limit = [f"trace.limit={self.limit}"] if self.limit else []
        self.pool = 1048576 if name == "mooncake_1m" else POOL
        if name == "azure_conv":
            self.overrides = ["trace=azure_conv", *limit]
            self.strategies = STRATEGIES
            file, self.rows = self._azure(traces / AZURE_CONV, tmp)
            self.mocker = {"mocker": (file, BLOCK, BLOCK, POOL // BLOCK)}
        else:
            file16, file512, self.rows = self._mooncake(traces / MOONCAKE, tmp)
            if name == "mooncake_fit":  # every page of every request fits: nothing evicted or preempted
                self.pool = BLOCK * sum(math.ceil((i + o) / BLOCK) for i, o in self.rows)
            self.overrides = ["trace=mooncake", "max_model_len=200000", *limit]
            if self.pool != POOL:
                self.overrides.append(f"kv_capacity_tokens={self.pool}")
            self.strategies = ["paged", "radix"] + (["paged_scheduled"] if name != "mooncake" else [])
            self.mocker = {"mocker": (file16, BLOCK, BLOCK, self.pool // BLOCK)}
            if name == "mooncake":  # the trace as it is, blocks of 512: the old docs' row
                self.mocker["mocker_blocks512"] = (file512, 512, 512, self.pool // 512)
        self.requests = len(self.rows)
        self.blocks16 = sum(math.ceil((i + o) / BLOCK) for i, o in self.rows)

    def _azure(self, path: Path, tmp: Path):
        from kvbench.traces.azure import read_azure_rows

        if not path.is_file():
            fail(f"trace not found: {path} (set KVBENCH_TRACES)")
        times, prompts, outputs, _ = read_azure_rows(path, self.limit)
        out, rows, h = tmp / f"azure_conv_{self.limit or 'all'}.jsonl", [], 0
        with out.open("w") as f:
            for t, p, o in zip(times.tolist(), prompts.tolist(), outputs.tolist()):
                nb = -(-p // BLOCK)  # one fresh hash id per 16 prompt tokens: no sharing
                f.write(json.dumps({"timestamp": t * 1e3, "input_length": p, "output_length": o,
                                    "hash_ids": list(range(h, h + nb))}) + "\n")
                h += nb
                rows.append((p, o))
        return out, rows

    def _mooncake(self, path: Path, tmp: Path):
        """(the slice as 16-token blocks, the slice as it is, rows): block k of a prompt is block
        k % 32 of its hash id k // 32, so equal 512-token blocks (and equal leading parts of a
        partial last one) are equal pages, as in kvbench; a partial last page gets a fresh id,
        as kvbench never matches one."""
        if not path.is_file():
            fail(f"trace not found: {path} (set KVBENCH_TRACES)")
        lines = []
        with path.open() as src:
            for line in src:
                if line.strip():
                    if self.limit and len(lines) >= self.limit:
                        break
                    lines.append(line if line.endswith("\n") else line + "\n")
        objs = [json.loads(line) for line in lines]
        fresh = (max((max(o["hash_ids"], default=0) for o in objs), default=0) + 1) * SUB
        out16, out512, rows = tmp / f"{self.label.replace(':', '_')}_16.jsonl", tmp / f"{self.label.replace(':', '_')}_512.jsonl", []
        with out16.open("w") as f:
            for obj in objs:
                n, ids = obj["input_length"], obj["hash_ids"]
                blocks = [ids[k // SUB] * SUB + k % SUB for k in range(n // BLOCK)]
                if n % BLOCK:
                    blocks.append(fresh)
                    fresh += 1
                rows.append((n, obj["output_length"]))
                f.write(json.dumps({"timestamp": obj["timestamp"], "input_length": n,
                                    "output_length": obj["output_length"], "hash_ids": blocks}) + "\n")
        out512.write_text("".join(lines))
        return out16, out512, rows


# ---------------------------------------------------------------- kvbench's tree

def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def kvbench_tree(at: str | None, tmp: Path) -> tuple[Path, str]:
    """(the tree kvbench runs from, its commit label)."""
    if at is None:
        dirty = git("status", "--porcelain", "--", "kvbench", "strategies", "kernels", "configs")
        return REPO, git("rev-parse", "--short=12", "HEAD") + ("+dirty" if dirty else "")
    commit = git("rev-parse", "--verify", f"{at}^{{commit}}")
    tree = tmp / f"kvbench-{commit[:12]}"
    data = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tree)
    for name in ("strategies", "kernels"):  # installed as kvbench.strategies / kvbench.kernels
        link = tree / "kvbench" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)
    return tree, commit[:12]


def tree_env(tree: Path, traces: Path) -> dict:
    env = dict(os.environ, KVBENCH_TRACES=str(traces), RUST_LOG="error")
    if tree != REPO:
        env["PYTHONPATH"] = str(tree)
    return env


# ---------------------------------------------------------------- one measurement

def measure(job: tuple, work: Work, tree: Path, env: dict, mpy: Path | None, warmup: int, tmp: Path) -> dict:
    tool, strategy, measure_name = job
    if tool.startswith("mocker"):
        file, tbs, bs, nb = work.mocker[tool]
        cpu, wall, out = run_child([str(mpy), "-c", _MOCKER, str(file), str(tbs), str(bs), str(nb),
                              json.dumps({k: v for k, v in ENGINE.items() if k != "block_size"})], tmp, env)
        res = last_json(out)
        res["whole_process_cpu_s"], res["wall_s"] = cpu, wall
        res["rejected"] = res["requests"] - res["finished"]
        return res
    if measure_name == "whole_process_cpu_s":
        rundir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
        cpu, wall, _ = run_child([sys.executable, "-m", "kvbench.cli", *strategy_overrides(strategy), *work.overrides,
                            f"hydra.run.dir={rundir}"], tmp, env)
        s = json.loads((rundir / "summary.json").read_text())
        shutil.rmtree(rundir, ignore_errors=True)
        return dict(whole_process_cpu_s=cpu, wall_s=wall, steps=s["num_steps"], finished=s["finished"],
                    rejected=s["rejected"], preemptions=s["preemptions"], hit_rate=s["prefix_hit_rate"])
    code = _REPLAY.format(configs=str(tree / "configs"))
    _, _, out = run_child([sys.executable, "-c", code, str(warmup), *strategy_overrides(strategy), *work.overrides],
                          tmp, env)
    return last_json(out)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--works", nargs="+", default=None,
                    help="azure_conv:N, mooncake:N, mooncake_1m:N, mooncake_fit:N (N a count or 'all'); default azure_conv:2000")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the CSV keeps the median (default 3)")
    ap.add_argument("--warmup", type=int, default=0, help="replays before the timed one in the replay_cpu_s child")
    ap.add_argument("--at", default=None, help="run kvbench from `git archive COMMIT` (default: this checkout)")
    ap.add_argument("--install", action="store_true",
                    help=f"make the mocker's venv ({VENV}) if it is missing; alone (no --works), only that")
    ap.add_argument("--no-mocker", action="store_true", help="kvbench's side only")
    ap.add_argument("--no-replay", action="store_true", help="whole-process times only (no replay_cpu_s)")
    ap.add_argument("--profile", choices=STRATEGIES, default=None,
                    help="instead: where that strategy's replay CPU goes on each work (cProfile, by file)")
    ap.add_argument("--table", action="store_true", help="instead: print --out's rows as markdown tables")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--append", action="store_true", help="add rows to --out instead of replacing it")
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 20:
        fail(f"--rounds: {args.rounds}: must be in [1, 20]")
    if not 0 <= args.warmup <= 5:
        fail(f"--warmup: {args.warmup}: must be in [0, 5]")
    if args.table:
        if not args.out.is_file():
            fail(f"--table: no CSV at {args.out}")
        print(markdown(args.out))
        return 0
    if args.works is None:
        if args.install and not args.profile:  # (the set-up step: nothing timed, --out untouched)
            py = mocker_python() or install()
            if py is None:
                fail(f"--install: the mocker's venv at {VENV} could not be made (the line above says why)")
            print(f"peer_mocker: the mocker's venv: {py}")
            return 0
        args.works = ["azure_conv:2000"]
    from kvbench.traces import traces_dir

    traces = traces_dir().resolve()
    tmp = Path(tempfile.mkdtemp(prefix="peer-mocker-"))
    try:
        tree, commit = kvbench_tree(args.at, tmp)
        env = tree_env(tree, traces)
        works = [Work(spec, tmp, traces) for spec in args.works]
        if args.profile:
            for w in works:
                if args.profile not in w.strategies:
                    continue
                _, _, out = run_child([sys.executable, "-c", _PROFILE.format(configs=str(tree / "configs")),
                                    *strategy_overrides(args.profile), *w.overrides], tmp, env)
                res = last_json(out)
                print(f"{w.label} {args.profile} at {commit}, load {os.getloadavg()[0]:.2f}: profiled replay "
                      f"{res['total_s']:.2f} s, {w.requests} requests, {w.blocks16} blocks of 16 "
                      f"({w.blocks16 / w.requests:.1f} a request)")
                for k, v in res["share"].items():
                    print(f"  {v:6.1%}  {k}")
                for k, v in res["calls_per_request"].items():
                    print(f"  {v:10.1f} calls/request  {k}")
            return 0
        mpy = None
        if not args.no_mocker:
            mpy = mocker_python() or (install() if args.install else None)
            if mpy is None and not args.install:
                print(f"peer_mocker: no mocker venv at {VENV} (run with --install); its rows are left out",
                      file=sys.stderr)
        jobs: list[tuple[Work, tuple]] = []
        for w in works:
            if mpy is not None:
                jobs += [(w, (tool, "", "whole_process_cpu_s")) for tool in w.mocker]
            for s in (s for s in w.strategies if s in args.strategies or s in VARIANTS):
                jobs.append((w, ("kvbench", s, "whole_process_cpu_s")))
                if not args.no_replay:
                    jobs.append((w, ("kvbench", s, "replay_cpu_s")))
        runs: dict[tuple, list[tuple[dict, float]]] = {}
        for r in range(args.rounds):
            shift = r * len(jobs) // args.rounds  # rotate the order each round
            for w, job in jobs[shift:] + jobs[:shift]:
                load = os.getloadavg()[0]
                res = measure(job, w, tree, env, mpy, args.warmup, tmp)
                runs.setdefault((w.label, job), []).append((res, load))
                tool, strategy, name = job
                shown = res[name] if name in res else res["whole_process_cpu_s"]
                print(f"round {r + 1} {w.label:18} {tool:16} {strategy:6} {name:20} {shown:8.3f} s  "
                      f"load {load:.2f}  hit {res.get('hit_rate', float('nan')):.4f}", flush=True)
        rows, now = [], datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for w, job in jobs:
            tool, strategy, name = job
            got = runs[(w.label, job)]
            measures = [name] if tool == "kvbench" else ["whole_process_cpu_s", "replay_cpu_s"]
            for m in measures:
                vals = [res[m] for res, _ in got]
                med = statistics.median(vals)
                last = got[-1][0]
                rows.append(dict(
                    date_utc=now, machine=machine(), python=platform.python_version(), kvbench_commit=commit,
                    mocker=last.get("mocker", "") if tool != "kvbench" else "", work=w.label, requests=w.requests,
                    pool_slots=w.pool, tool=tool, strategy=strategy, measure=m, median_s=f"{med:.4f}",
                    runs_s=" ".join(f"{v:.3f}" for v in vals), load_1m=" ".join(f"{ld:.2f}" for _, ld in got),
                    wall_median_s=(f"{statistics.median(res['wall_s'] for res, _ in got):.4f}"
                                   if m == "whole_process_cpu_s" else ""),
                    steps=last.get("steps", ""), finished=last.get("finished", ""), rejected=last.get("rejected", ""),
                    preemptions=last.get("preemptions", ""),
                    hit_rate=f"{last['hit_rate']:.6f}" if "hit_rate" in last else "",
                    hit_rate_all_admissions=(f"{last['hit_rate_all_admissions']:.6f}"
                                             if "hit_rate_all_admissions" in last else ""),
                    kv_blocks16=w.blocks16, ns_per_block16=f"{1e9 * med / w.blocks16:.0f}",
                    note=("blocks of 512 (256 blocks): not the same work" if tool == "mocker_blocks512" else
                          f"warmup {args.warmup}" if m == "replay_cpu_s" and tool == "kvbench" else "")))
        write_csv(args.out, rows, args.append)
        print(f"wrote {len(rows)} rows to {args.out}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(path: Path) -> str:
    """The CSV as two markdown tables: CPU s (whole process / replay alone) and prefix hit rates."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    order = ["mocker", "mocker_blocks512", *STRATEGIES, *VARIANTS]
    tools = sorted({r["tool"] if r["tool"] != "kvbench" else r["strategy"] for r in rows},
                   key=lambda t: order.index(t) if t in order else len(order))
    works = list(dict.fromkeys(r["work"] for r in rows))
    cell: dict[tuple, dict] = {}
    for r in rows:
        cell.setdefault((r["work"], r["tool"] if r["tool"] != "kvbench" else r["strategy"]), {})[r["measure"]] = r
    loads = [float(x) for r in rows for x in r["load_1m"].split()]
    head = " | ".join(tools)
    out = [f"CPU s, whole process / replay alone; medians of {len(rows[0]['runs_s'].split())} interleaved rounds; "
           f"kvbench {rows[0]['kvbench_commit']}, {rows[0]['mocker'] or 'mocker'}, {rows[0]['date_utc']}, "
           f"load {min(loads):.1f}-{max(loads):.1f}", "",
           f"| work | requests | pool | blocks of 16 | {head} |", "| --- | ---: | ---: | ---: |" + " ---: |" * len(tools)]
    for w in works:
        first = next(r for r in rows if r["work"] == w)
        cells = []
        for t in tools:
            got = cell.get((w, t), {})
            whole, rep = got.get("whole_process_cpu_s"), got.get("replay_cpu_s")
            cells.append(" / ".join(f"{float(x['median_s']):.2f}" for x in (whole, rep) if x) or "–")
        out.append(f"| {w} | {first['requests']} | {first['pool_slots']} | {first['kv_blocks16']} | {' | '.join(cells)} |")
    out += ["", "prefix hit rate (cached prompt tokens at first admission / prompt tokens; the mocker's "
            "first_admission_prefix_cache_reused_ratio / prefix_cache_reused_ratio)", "",
            f"| work | {head} |", "| --- |" + " ---: |" * len(tools)]
    for w in works:
        cells = []
        for t in tools:
            r = cell.get((w, t), {}).get("whole_process_cpu_s")
            if not r or not r["hit_rate"]:
                cells.append("–")
            else:
                extra = f" / {float(r['hit_rate_all_admissions']):.6f}" if r["hit_rate_all_admissions"] else ""
                cells.append(f"{float(r['hit_rate']):.6f}{extra}")
        out.append(f"| {w} | {' | '.join(cells)} |")
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict], append: bool) -> None:
    old = []
    if append and path.is_file():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with part.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=FIELDS)
        out.writeheader()
        out.writerows(old + rows)
    part.replace(path)


if __name__ == "__main__":
    sys.exit(main())
