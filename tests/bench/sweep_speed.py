"""Wall and CPU time of a whole 100-run sweep on the joblib launcher (issue 13 §5: a sweep of 100
runs on 2 cores finishes at least 5x faster than at e449c43). Each round runs, in a fresh sweep
folder, and alternating between the trees named:

    kvbench -m +experiment=throughput_vs_rate hydra/launcher=parallel hydra.launcher.n_jobs=2 \\
        trace.limit=100 'trace.rate=range(1,26)' hydra.sweep.dir=<tmp>     # 4 strategies x 25 rates

(`--limit 3000`, the experiment's own trace length, times the replay-bound sweep instead).
Wall time is the command's; CPU time is user + system of the whole process tree (the loky
workers are reaped by the sweep's process, so RUSAGE_CHILDREN holds them): the less noisy
number on a shared machine. Prints each round and the medians.

    python tests/bench/sweep_speed.py                                   # this checkout, 3 rounds
    git worktree add /tmp/kv_e449 e449c43
    python tests/bench/sweep_speed.py --tree old=/tmp/kv_e449 --tree new=. --rounds 2
    python tests/bench/sweep_speed.py --tree before=/tmp/kv_before --tree new=. --rounds 1 --keep /tmp/kept
                                    # --keep: and the files of the two sweeps that differ

Another tree runs with this venv on PYTHONPATH=<tree>; its `kvbench.strategies` and
`kvbench.kernels` (installed from the top-level strategies/ and kernels/) are linked into its
kvbench/ folder if missing, so the old tree runs its own allocators, not this checkout's. Not a
test: a measurement of minutes (docs: README, "Sweep speed").
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def command(limit: int, n_jobs: int, sweep_dir: Path) -> list[str]:
    return [sys.executable, "-m", "kvbench.cli", "-m", "+experiment=throughput_vs_rate", "hydra/launcher=parallel",
            f"hydra.launcher.n_jobs={n_jobs}", f"trace.limit={limit}", "trace.rate=range(1,26)",
            f"hydra.sweep.dir={sweep_dir}"]


def tree_env(tree: Path) -> dict:
    """The environment that runs `tree`'s kvbench with this venv."""
    env = dict(os.environ)
    env.setdefault("KVBENCH_TRACES", str(REPO.parent / "shared" / "traces"))
    if tree.resolve() != REPO:
        for name in ("strategies", "kernels"):
            link = tree / "kvbench" / name
            if not link.exists():
                link.symlink_to(Path("..") / name)
        env["PYTHONPATH"] = str(tree.resolve())
    return env


def same_files(a: Path, b: Path) -> list[str]:
    """The files of two sweep folders that differ (or are in one only), timings aside: summary.json
    but its wall_time_s; run.log but its time stamps and wall time line; runs.csv but its
    wall_time_s column; .hydra/hydra.yaml and multirun.yaml but the launcher's block, the sweep
    folder and the overrides that name them, and the checkout's config folder."""
    import csv
    import io
    import json
    import re

    def norm(path: Path, root: Path) -> bytes:
        data = path.read_bytes().replace(str(root).encode(), b"<sweep>")
        data = re.sub(rb"/[^\s'\"]*kvbench-sweep-speed-[^/\s'\"]+", b"<tmp>", data)  # (where it ran)
        if path.name == "summary.json":
            obj = json.loads(data)
            obj.pop("wall_time_s", None)
            return json.dumps(obj, sort_keys=True).encode()
        if path.name == "run.log":
            data = re.sub(rb"\[\d{4}-\d\d-\d\d [\d:,]+\]", b"", data)
            return re.sub(rb"Wall time \(s\):.*", b"", data)
        if path.name == "runs.csv":
            rows = list(csv.reader(io.StringIO(data.decode())))
            if rows and "wall_time_s" in rows[0]:
                k = rows[0].index("wall_time_s")
                rows = [r[:k] + r[k + 1:] for r in rows]
            return repr(rows).encode()
        if path.name in ("hydra.yaml", "multirun.yaml"):
            text = re.sub(r"\n  launcher:\n(    .*\n)+", "\n", data.decode())
            text = re.sub(r"path: \S*/configs\n", "path: <tree>/configs\n", text)  # (the checkout's config folder)
            return re.sub(r".*hydra\.(launcher|sweep\.dir)\b.*\n", "", text).encode()
        return data

    def files(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".progress" not in p.parts}

    fa, fb = files(a), files(b)
    return sorted(str(f) for f in fa ^ fb) + sorted(str(f) for f in fa & fb if norm(a / f, a) != norm(b / f, b))


def one_round(tree: Path, limit: int, n_jobs: int, keep: Path | None = None) -> tuple[float, float, int]:
    """(wall s, CPU s of the process tree, finished runs) of one sweep into a fresh folder
    (moved to `keep` afterwards, if given)."""
    with tempfile.TemporaryDirectory(prefix="kvbench-sweep-speed-") as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run(command(limit, n_jobs, Path(tmp) / "sweep"), cwd=tmp, env=tree_env(tree),
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode != 0:
            sys.exit(f"sweep_speed: the sweep in {tree} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        runs = len(list((Path(tmp) / "sweep").glob("*/summary.json")))
        if keep is not None:
            import shutil

            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(str(Path(tmp) / "sweep"), keep)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                   help="a checkout to time (repeatable; default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=100, help="requests per run (the experiment's own: 3000)")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--keep", type=Path, help="keep each tree's last sweep folder in KEEP/LABEL and, for two "
                   "trees, list the files that differ (timings, launcher and sweep folder aside)")
    a = p.parse_args(argv)
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1])) for t in a.tree] or [("this", REPO)]
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in trees}
    print(" ".join(command(a.limit, a.n_jobs, Path("<tmp>"))[1:]), f"(load average {os.getloadavg()[0]:.1f})")
    for r in range(a.rounds):
        for label, tree in trees:
            wall, cpu, runs = one_round(tree, a.limit, a.n_jobs, a.keep / label if a.keep else None)
            times[label].append((wall, cpu))
            print(f"round {r + 1} {label:>6}: {wall:7.1f} s wall {cpu:7.1f} s CPU  {runs} runs  "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    for label, ts in times.items():
        print(f"median {label:>6}: {statistics.median(w for w, _ in ts):7.1f} s wall "
              f"{statistics.median(c for _, c in ts):7.1f} s CPU ({len(ts)} rounds)")
    if len(trees) == 2:
        (la, ta), (lb, tb) = times.items()
        print(f"{la} / {lb}: wall {statistics.median(w for w, _ in ta) / statistics.median(w for w, _ in tb):.2f}x, "
              f"CPU {statistics.median(c for _, c in ta) / statistics.median(c for _, c in tb):.2f}x")
    if len(trees) == 2 and a.keep:
        differ = same_files(a.keep / trees[0][0], a.keep / trees[1][0])
        print(f"files that differ ({len(differ)}): {', '.join(differ[:20]) or 'none'}{' ...' if len(differ) > 20 else ''}")


if __name__ == "__main__":
    main()
