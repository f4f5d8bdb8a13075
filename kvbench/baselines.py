"""Metric regression baselines: seeded replays whose deterministic results are kept in git.

Each case is one strategy on one trace slice, run through the real config path
(`kvbench.run.run` on `engine=sim`). Its memory and scheduling metrics are deterministic: the
trace is seeded and the clock is simulated. They are stored in `results/baselines/<case>.json`,
keys sorted, floats rounded to 6 significant digits (numpy sums may differ in the last bits
between platforms), so a change that makes a strategy worse shows up in the diff of that file.

    python -m kvbench.baselines                                  # compare every case (exit 1 on change)
    python -m kvbench.baselines --case paged-shared_prefix       # one case
    python -m kvbench.baselines --update --reason "why they moved"   # rewrite what changed

`--update` writes only the files that changed and appends one line to
`results/baselines/CHANGELOG.md`: date, each changed case with the digest of its new metrics,
and the reason. `tests/test_baselines.py` compares every case in CI and checks that every
file's digest is in the changelog, so a baseline changes only together with its reason.
Cases on the shared Azure trace are skipped (with a message) where the traces are missing.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_DIR = REPO / "results" / "baselines"
CHANGELOG = BASELINE_DIR / "CHANGELOG.md"
CONFIGS = REPO / "configs"
DIGITS = 6  # significant digits kept of every float
UPDATE_HINT = 'python -m kvbench.baselines --update --reason "<one line: why the numbers moved>"'

#: summary.json keys kept in a baseline (all deterministic under engine=sim); wall time is not.
METRICS = (
    "num_requests", "finished", "rejected", "rejected_reasons", "preemptions", "num_steps",
    "prefix_hit_rate", "waste_frac", "peak_running", "mean_running", "duration_s",
    "request_throughput", "output_throughput", "total_token_throughput",
    *(f"mem_{s}_{k}" for s in ("token_states", "reserved", "internal_frag", "external_frag", "cached", "free")
      for k in ("frac", "peak_frac")),
    *(f"{m}_{q}_s" for m in ("ttft", "tpot", "e2e") for q in ("mean", "p50", "p99")),
    "kv_capacity_tokens",
)


@dataclass(frozen=True)
class Case:
    """One seeded replay: a strategy config on a trace config, with overrides."""

    strategy: str  # configs/strategy/<strategy>.yaml
    trace: str  # configs/trace/<trace>.yaml
    overrides: tuple[str, ...]
    shared_trace: str | None = None  # file under the shared traces folder that it needs
    variant: str | None = None  # appended to the name: what the overrides change (an eviction policy)

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.trace}" + (f"-{self.variant}" if self.variant else "")

    @property
    def path(self) -> Path:
        return BASELINE_DIR / f"{self.name}.json"

    def all_overrides(self) -> list[str]:
        return ["progress=false", f"strategy={self.strategy}", f"trace={self.trace}", *self.overrides]


# shared_prefix: 16 system prompts x 32 questions at 32 req/s into a pool of 24k slots: cached
#   prefixes are evicted, requests are preempted, slab(max) runs 3 at a time.
# azure_conv: the first 1500 rows at 20 req/s into the default pool (131072 slots): no sharing,
#   paging preempts, slab(max) wastes most of the pool.
_SHARED_PREFIX = ("kv_capacity_tokens=24576", "max_model_len=8192", "trace.rate=32")
_AZURE_CONV = ("trace.limit=1500", "trace.rate=20")
_AZURE_FILE = "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv"
#: every strategy yaml (a new one needs its baselines: the test says which command makes them)
STRATEGIES = tuple(sorted(p.stem for p in (CONFIGS / "strategy").glob("*.yaml")))
# eviction: every policy (Belady is offline: no yaml gives it the trace's future) in the strategies
#   that take one, on 64 multi-turn chats in a 16k pool (the trace has 99k distinct tokens: cached
#   turns are evicted, and the policies differ in what the next turn finds; on shared_prefix the
#   radix policies all evict the same one-use question leaves). LRU too: the other cases run no
#   multi-turn trace. priority gets no per-request priorities here: paged's equals paged's LRU.
_MULTI_TURN = ("kv_capacity_tokens=16384",)
EVICTION_POLICIES = ("lru", "fifo", "lfu", "slru", "arc", "s3fifo", "priority")
CASES: tuple[Case, ...] = tuple(
    [Case(s, "shared_prefix", _SHARED_PREFIX) for s in STRATEGIES]
    + [Case(s, "azure_conv", _AZURE_CONV, _AZURE_FILE) for s in STRATEGIES]
    + [Case(s, "multi_turn", (*_MULTI_TURN, f"strategy.eviction={e}"), variant=e)
       for s in ("paged", "radix") for e in EVICTION_POLICIES]
)


# ---- one case ----------------------------------------------------------------------------------
def missing_input(case: Case) -> str | None:
    """Why `case` cannot run here (its shared trace file is missing), or None. Pure."""
    if case.shared_trace is None:
        return None
    from kvbench.traces import traces_dir

    path = traces_dir() / case.shared_trace
    if path.is_file():
        return None
    return (f"{case.name}: shared trace {path} not found (set KVBENCH_TRACES to the folder that "
            f"holds azure-llm-inference-2023/)")


def round_sig(x: object) -> object:
    """Floats to DIGITS significant digits (ints, strings, None and dicts of them kept)."""
    if isinstance(x, dict):
        return {str(k): round_sig(v) for k, v in x.items()}
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    x = float(x)
    if not math.isfinite(x):
        return str(x)  # JSON has no nan/inf
    if x.is_integer() and abs(x) < 2**53:
        return float(x)
    return float(f"{x:.{DIGITS}g}")


def compute(case: Case) -> dict:
    """Replay `case` now and return its baseline record (what the file holds)."""
    from hydra import compose, initialize_config_dir

    from kvbench.run import run
    from kvbench.schema import register

    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=case.all_overrides())
    with tempfile.TemporaryDirectory(prefix="kvbench-baseline-") as tmp:
        summary = run(cfg, Path(tmp))
    missing = [k for k in METRICS if k not in summary]
    if missing:
        raise KeyError(f"{case.name}: summary.json lacks {missing}; update METRICS in {__file__}")
    return {"case": case.name, "overrides": case.all_overrides()[1:], "label": summary["label"],
            "metrics": {k: round_sig(summary[k]) for k in METRICS}}


def dumps(record: dict) -> str:
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def digest(record: dict) -> str:
    """Short fingerprint of a record's metrics: what the changelog line names."""
    return hashlib.sha256(json.dumps(record["metrics"], sort_keys=True).encode()).hexdigest()[:10]


def load(case: Case) -> dict | None:
    return json.loads(case.path.read_text()) if case.path.exists() else None


# ---- comparison --------------------------------------------------------------------------------
def differences(old: dict | None, new: dict) -> list[tuple[str, object, object]]:
    """(metric, baseline, now) for every metric or setting that differs. Pure."""
    if old is None:
        return [("(no baseline file)", None, "new")]
    out = []
    for key in ("overrides", "label"):
        if old.get(key) != new.get(key):
            out.append((key, old.get(key), new.get(key)))
    a, b = old.get("metrics", {}), new["metrics"]
    for key in sorted(set(a) | set(b)):
        if a.get(key, "(absent)") != b.get(key, "(absent)"):
            out.append((key, a.get(key, "(absent)"), b.get(key, "(absent)")))
    return out


def _change(was: object, now: object) -> str:
    if isinstance(was, (int, float)) and isinstance(now, (int, float)) and not isinstance(was, bool):
        if was:
            return f"{(now - was) / abs(was):+.2%}"
        return "from 0"
    return ""


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def format_differences(name: str, diffs: list[tuple[str, object, object]]) -> str:
    rows = [("metric", "baseline", "now", "change")]
    rows += [(k, json.dumps(a), json.dumps(b), _change(a, b)) for k, a, b in diffs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{name}: {len(diffs)} difference(s) from {_shown(BASELINE_DIR / f'{name}.json')}"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ---- changelog ---------------------------------------------------------------------------------
def changelog_digests() -> set[str]:
    """Every `case@digest` named in the changelog."""
    if not CHANGELOG.exists():
        return set()
    found = set()
    for line in CHANGELOG.read_text().splitlines():
        for word in line.replace(",", " ").split():
            if "@" in word and not word.startswith("@"):
                found.add(word.strip("`"))
    return found


def append_changelog(changed: list[tuple[str, str]], reason: str, now: datetime.datetime) -> str:
    if not CHANGELOG.exists():
        CHANGELOG.write_text(
            "# Baseline history\n\n"
            "One line per update of `results/baselines/` (written by `python -m kvbench.baselines "
            "--update --reason ...`):\ndate, each changed case as `case@digest` of its new metrics, "
            "and why. `tests/test_baselines.py` checks that every baseline file's digest is here.\n\n")
    cases = ", ".join(f"`{name}@{d}`" for name, d in changed)
    line = f"- {now:%Y-%m-%d %H:%M} UTC · {cases} · {reason}\n"
    with CHANGELOG.open("a") as f:
        f.write(line)
    return line


# ---- command -----------------------------------------------------------------------------------
def select(names: list[str] | None) -> list[Case]:
    if not names:
        return list(CASES)
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases are: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvbench.baselines", description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="only this case (repeatable); default: all")
    ap.add_argument("--update", action="store_true", help="rewrite the baseline files that changed")
    ap.add_argument("--reason", help="one line: why the baselines change (required with --update)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)
    cases = select(args.case)
    if args.list:
        for c in cases:
            print(f"{c.name:28s} {' '.join(c.all_overrides()[1:])}")
        return 0
    if args.update and (not args.reason or not args.reason.strip() or "\n" in args.reason):
        print(f"refusing to update without a one-line --reason: {UPDATE_HINT}", file=sys.stderr)
        return 2

    changed: list[tuple[Case, dict]] = []
    for case in cases:
        why = missing_input(case)
        if why:
            print(f"skipped {why}")
            continue
        new = compute(case)
        diffs = differences(load(case), new)
        if diffs:
            print(format_differences(case.name, diffs))
            changed.append((case, new))
        else:
            print(f"{case.name}: same as baseline")

    if not changed:
        print("baselines unchanged")
        return 0
    if not args.update:
        print(f"\n{len(changed)} case(s) differ from {_shown(BASELINE_DIR)}/. If the change is intended, "
              f"run:\n  {UPDATE_HINT}", file=sys.stderr)
        return 1
    BASELINE_DIR.mkdir(parents=True, exist_ok=True)
    for case, new in changed:
        case.path.write_text(dumps(new))
    line = append_changelog([(c.name, digest(r)) for c, r in changed], args.reason.strip(),
                            datetime.datetime.now(datetime.timezone.utc))
    print(f"wrote {len(changed)} file(s) under {_shown(BASELINE_DIR)}/ and appended to "
          f"CHANGELOG.md:\n{line}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
