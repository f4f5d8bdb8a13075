"""Host time per call of every kernel launcher at tiny shapes, where the GPU's work is negligible,
against a torch elementwise op timed in the same process (the yardstick of issue 12: <= 15 us).

    python experiments/launch_overhead.py --out DIR [--profile] [--cpu] [--kernels DIR]

Each row: median (and minimum) over 7 rounds of (wall time of N back-to-back calls) / N, the GPU
synchronised only before and after a round, so the figure is what the host pays to issue one
call. With --profile, a cProfile of each launcher's calls: its top functions by own time, in us
per launcher call. Writes DIR/launch_overhead.csv and .json; needs CUDA, except with --cpu.

--cpu (no GPU needed): the launchers' host-side Python alone, on CPU tensors. CPU tensors report
``is_cuda`` (a Python property: a few tens of ns more than the real attribute), each launcher's
first call runs the kernel in Triton's interpreter and makes a plan whose launch is a no-op
Python function, so later calls time the hit path (key, checks, outputs, views) without Triton's C
launcher. For before/after comparisons of launcher code, not a GPU figure.
--kernels DIR: import ``kvbench.kernels`` from DIR (e.g. an exported older kernels/ folder) to
time another version of the launchers with this script.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import csv
import importlib.util
import json
import os
import pathlib
import pstats
import statistics
import subprocess
import sys
import time

if "--cpu" in sys.argv:   # CPU tensors run only in Triton's interpreter, chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from checkout import REPO, use_checkout  # noqa: E402  (experiments/checkout.py)


def use_kernels(folder: pathlib.Path) -> None:
    """Import ``kvbench.kernels`` from `folder` instead of this checkout's kernels/."""
    import kvbench
    spec = importlib.util.spec_from_file_location("kvbench.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvbench.kernels"] = module
    kvbench.kernels = module
    spec.loader.exec_module(module)


use_checkout()
if "--kernels" in sys.argv:
    use_kernels(pathlib.Path(sys.argv[sys.argv.index("--kernels") + 1]).resolve())

from kvbench.kernels.decode_attention import decode_attention  # noqa: E402
from kvbench.kernels.extend_attention import extend_attention  # noqa: E402
from kvbench.kernels.kv_write import kv_write  # noqa: E402
from kvbench.kernels.linear import linear  # noqa: E402
from kvbench.kernels.page_copy import page_copy  # noqa: E402
from kvbench.kernels.rms_norm import rms_norm  # noqa: E402
from kvbench.kernels.rope_kv_write import rope_kv_write  # noqa: E402
from kvbench.kernels.silu_mul import silu_mul  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, n: int = 2000, rounds: int = 7) -> tuple[float, float]:
    """(median, minimum) over `rounds` of the host time per call of `fn`, in us."""
    for _ in range(20):
        fn()
    _sync()
    per = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        per.append((time.perf_counter() - t) / n * 1e6)
        _sync()
    return statistics.median(per), min(per)


def cases(dev):
    """(name, zero-argument call) at tiny shapes: a 2-request batch, 1 KV head group, D=64."""
    bf = torch.bfloat16
    Hq, Hkv, D, ps = 4, 1, 64, 16
    q = torch.randn(2, Hq, D, device=dev, dtype=bf)
    kc = torch.randn(64 * ps, Hkv, D, device=dev, dtype=bf)
    vc = torch.randn_like(kc)
    pt = torch.arange(8, device=dev, dtype=torch.int32).view(2, 4)
    sl = torch.tensor([40, 50], device=dev, dtype=torch.int32)
    out = torch.empty_like(q)
    kn = torch.randn(2, Hkv, D, device=dev, dtype=bf)
    slots = torch.tensor([3, 70], device=dev, dtype=torch.int32)
    qe = torch.randn(6, Hq, D, device=dev, dtype=bf)
    qsl = torch.tensor([0, 3, 6], device=dev, dtype=torch.int32)
    qkv = torch.randn(2, (Hq + 2 * Hkv) * D, device=dev, dtype=bf)
    cos = torch.randn(2, D, device=dev, dtype=bf)
    sin = torch.randn(2, D, device=dev, dtype=bf)
    x = torch.randn(2, 256, device=dev, dtype=bf)
    w = torch.randn(256, device=dev, dtype=bf)
    wl = torch.randn(128, 256, device=dev, dtype=bf)
    pool = torch.randn(1, 2, 64 * ps, Hkv, D, device=dev, dtype=bf)
    src = torch.tensor([1], device=dev, dtype=torch.int32)
    dst = torch.tensor([2], device=dev, dtype=torch.int32)
    small = torch.randn(256, device=dev)
    return [
        ("torch add_ (yardstick)", lambda: small.add_(1.0)),
        ("decode_attention 1 split", lambda: decode_attention(q, kc, vc, pt, sl, ps, num_splits=1, out=out)),
        ("decode_attention 4 splits", lambda: decode_attention(q, kc, vc, pt, sl, ps, num_splits=4, out=out)),
        ("decode_attention auto", lambda: decode_attention(q, kc, vc, pt, sl, ps, max_seq_len=64)),
        ("extend_attention", lambda: extend_attention(qe, kc, vc, pt, qsl, sl, ps)),
        ("kv_write", lambda: kv_write(kn, kn, kc, vc, slots)),
        ("rope_kv_write", lambda: rope_kv_write(qkv, cos, sin, kc, vc, slots, Hq, Hkv)),
        ("rms_norm", lambda: rms_norm(x, w, 1e-5)),
        ("rms_norm + residual", lambda: rms_norm(x, w, 1e-5, residual=x)),
        ("silu_mul", lambda: silu_mul(x)),
        ("linear (gemv)", lambda: linear(x, wl)),
        ("page_copy", lambda: page_copy(pool, src, dst, ps)),
    ]


def _first_call_s(fn) -> float:
    """Seconds a second call of fn takes (the first makes the plan)."""
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@contextlib.contextmanager
def stub_launches():
    """CPU stand-in for the GPU launch plans (--cpu): tensors report ``is_cuda``, every launcher
    module's `make_plan` returns a `Plan` whose launch is a no-op, so a launcher's second call of a
    key runs its whole hit path but Triton's C launcher. Undone on exit."""
    from kvbench.kernels import _common

    def fake_plan(kernel, jitfn, args, kwargs, front, device):
        names = jitfn.arg_names
        if any(n not in kwargs for n in names[len(args):]):
            return None
        values = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
        return _common.Plan(lambda *a: None, (None,) * 9, 0, values[front:])

    mods = [sys.modules[m] for m in list(sys.modules)
            if m.startswith("kvbench.kernels.") and hasattr(sys.modules[m], "make_plan")]
    saved = [(m, m.make_plan) for m in mods] + [(_common, _common.make_plan)]
    was_cuda, was_stream = torch.Tensor.is_cuda, _common._raw_stream
    torch.Tensor.is_cuda = property(lambda self: True)
    _common._raw_stream = lambda index: 0
    for m, _ in saved:
        m.make_plan = fake_plan
    try:
        yield
    finally:
        for m, f in saved:
            m.make_plan = f
        torch.Tensor.is_cuda, _common._raw_stream = was_cuda, was_stream


def profile(fn, n: int = 2000, top: int = 12) -> list[dict]:
    """cProfile of n calls of fn: the `top` functions by own time, each in us per call of fn."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    _sync()
    stats = pstats.Stats(pr).stats
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.items():
        where = func if file == "~" else f"{pathlib.Path(file).name}:{line}({func})"
        rows.append(dict(function=where, calls_per_call=round(ncalls / n, 2), own_us=round(tottime / n * 1e6, 3),
                         cum_us=round(cumtime / n * 1e6, 3)))
    rows.sort(key=lambda r: -r["own_us"])
    return rows[:top]


def format_profile(name: str, rows: list[dict]) -> str:
    lines = [f"==== {name}: top functions by own time, us per launcher call (cProfile inflates them)",
             f"{'own us':>8} {'cum us':>8} {'calls':>6}  function"]
    lines += [f"{r['own_us']:8.3f} {r['cum_us']:8.3f} {r['calls_per_call']:6g}  {r['function']}" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="time the launchers' Python on CPU tensors, launches stubbed")
    ap.add_argument("--kernels", type=pathlib.Path, help="import kvbench.kernels from this folder")
    ap.add_argument("--calls", type=int, default=2000, help="calls per round")
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("launch_overhead: no CUDA device (use --cpu to time the launchers' Python alone)", file=sys.stderr)
        sys.exit(2)
    dev = torch.device("cpu" if args.cpu else "cuda")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    machine = "CPU (launches stubbed)" if args.cpu else torch.cuda.get_device_name()
    kernels_dir = str(args.kernels) if args.kernels else "kernels/"
    rows = []
    profiles = {}
    with stub_launches() if args.cpu else contextlib.nullcontext():
        for name, fn in cases(dev):
            if args.cpu and "yardstick" not in name and _first_call_s(fn) > 0.01:
                print(f"{name:28s} skipped: no plan on the CPU (interpreted every call)", flush=True)
                continue
            med, low = host_us(fn, n=args.calls)
            rows.append(dict(device=machine, commit=commit, kernels=kernels_dir, launcher=name,
                             host_us=round(med, 2), host_us_min=round(low, 2)))
            print(f"{name:28s} {med:8.2f} us  (min {low:.2f})", flush=True)
            if args.profile and "yardstick" not in name:
                profiles[name] = profile(fn, n=args.calls)
    base = rows[0]["host_us"]
    for r in rows:
        r["x_torch_op"] = round(r["host_us"] / base, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "launch_overhead.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    (args.out / "launch_overhead.json").write_text(json.dumps(dict(rows=rows, profiles=profiles), indent=1))
    for name, prof in profiles.items():
        print(format_profile(name, prof))


if __name__ == "__main__":
    main()
