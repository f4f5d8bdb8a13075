"""CPU time of one replay slice in this checkout and in other trees, interleaved (issue 13's
"20x faster than today" on the overloaded Mooncake replay): each round runs each strategy once in
each tree, every run in its own process, and checks that every tree finished the same requests
with the same prefix-hit tokens (the same work). The timer is the replay's CPU alone, the trace
built before it, as `test_replay.py` times it.

    git worktree add /tmp/kv_64008c7 64008c7        # "today" when issues 12 and 13 were filed
    python tests/bench/replay_vs_tree.py --tree before=/tmp/kv_64008c7 --tree now=. --rounds 3

Another tree runs with this venv and its own allocators (`sweep_speed.tree_env`). Not a test: a
measurement of minutes (docs/benchmarks.md, section 4).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_speed import REPO, tree_env  # noqa: E402
from test_replay import SLICES  # noqa: E402

# run inside the tree (cwd): its own configs, trace loader, scheduler, strategies and engine
ONE_RUN = r"""
import gc, json, sys, time
from pathlib import Path
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
try:
    from kvbench.schema import register
    register()
except ImportError:  # (trees older than the config schema)
    pass
import kvbench.strategies as strategies
from kvbench.replay import replay
from kvbench.scheduler import Scheduler
overrides = json.loads(sys.argv[1])
with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
    cfg = compose("config", overrides=overrides)
requests = list(instantiate(cfg.trace))
try:
    from kvbench.run import strategy_sizes
    sizes = strategy_sizes(cfg, cfg.kv_capacity_tokens)
except ImportError:
    sizes = {}
strategy = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=cfg.kv_capacity_tokens,
                                                     max_model_len=cfg.max_model_len, **sizes)
engine = instantiate(cfg.engine)
gc.collect()
t = time.process_time()
result = replay(requests, Scheduler(strategy, **cfg.scheduler), engine, progress=False)
cpu = time.process_time() - t
print(json.dumps(dict(cpu_s=cpu, finished=len(result.finished), strategies=strategies.__path__[0],
                      hit_tokens=int(sum(s.cached_tokens for s in result.finished)))))
"""


def one_run(tree: Path, overrides: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", ONE_RUN, json.dumps(overrides)], cwd=tree, env=tree_env(tree),
                         capture_output=True, text=True)
    if out.returncode:  # (one line: the run's last error line)
        print(f"replay_vs_tree: {tree}: {(out.stderr.strip().splitlines() or [f'exit {out.returncode}'])[-1]}",
              file=sys.stderr)
        sys.exit(2)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                   help="a checkout to time (repeatable; default: this one)")
    p.add_argument("--slice", default="mooncake_overloaded", choices=sorted(SLICES))
    p.add_argument("--strategies", default="paged,radix")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    trees = []
    for t in a.tree:
        label, _, path = t.partition("=")
        if not label or not path or not (Path(path) / "kvbench" / "replay.py").is_file():
            p.error(f"--tree {t!r}: not LABEL=PATH of a kvbench checkout")
        trees.append((label, Path(path).resolve()))
    trees = trees or [("this", REPO)]
    names = a.strategies.split(",")
    unknown = [s for s in names if not (REPO / "configs" / "strategy" / f"{s}.yaml").is_file()]
    if unknown or a.rounds < 1:
        p.error(f"unknown strategies {unknown}" if unknown else f"--rounds must be >= 1, got {a.rounds}")
    cpu: dict[tuple[str, str], list[float]] = {(s, label): [] for s in names for label, _ in trees}
    work: dict[str, set] = {s: set() for s in names}
    for r in range(a.rounds):
        for s in names:
            for label, tree in trees:
                res = one_run(tree, ["progress=false", f"strategy={s}", *SLICES[a.slice]])
                cpu[s, label].append(res["cpu_s"])
                work[s].add((res["finished"], res["hit_tokens"]))
                print(f"round {r + 1} {s:>8} {label:>8}: {res['cpu_s']:7.2f} s CPU  finished {res['finished']}  "
                      f"hit tokens {res['hit_tokens']}  ({res['strategies']})", flush=True)
    for s in names:
        meds = {label: statistics.median(cpu[s, label]) for label, _ in trees}
        base = meds[trees[0][0]]
        print(f"median {s:>8}: " + ", ".join(f"{label} {m:.2f} s ({base / m:.1f}x)" for label, m in meds.items()))
        if len(work[s]) != 1:
            print(f"replay_vs_tree: {s}: the trees did different work (finished, hit tokens): {sorted(work[s])}",
                  file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
