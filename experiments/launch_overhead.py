"""Host time per call of every kernel launcher at tiny shapes, where the GPU's work is negligible,
against a torch elementwise op timed in the same process (the yardstick of issue 12: <= 15 us).

    python experiments/launch_overhead.py --out DIR [--profile] [--cpu] [--kernels DIR] [--compare DIR]
        [--rounds 7] [--calls 2000] [--gpu-calls 200] [--processes N]

Each row: median (and minimum) over --rounds (7) rounds of (wall time of N back-to-back calls) / N, the GPU
synchronised only before and after a round, so the figure is what the host pays to issue one
call -- as long as the host is the slower side. Where the GPU takes longer per call than the host,
the launch queue fills and the host waits for the GPU, so the same wall time is the GPU's: timing
CUDA events around such a round cannot tell which (the stream's span is the round's either way).
So each row also has ``gpu_us``: the GPU's own time per call, from events around --gpu-calls (200)
calls issued while the stream is held by a spin kernel (``torch.cuda._sleep``, long enough that
the host has issued every call before the GPU starts the first: checked, and the calls halved
until it holds), i.e. the calls run back to back with no host gap; median over the rounds.
``bound`` says which side the host figure is: "host" where gpu_us < 0.9 host_us, else "GPU" (the
host figure is then, or may be, the GPU's time, not the launcher's cost). ``torch_op_us``: the
yardstick (a torch ``add_`` on a 256-element tensor) timed in the same rounds, taking its turn in
each, and ``x_torch_op`` = host_us / torch_op_us (the host's speed drifts within a run and differs
between processes by up to ~1.5x: a yardstick timed once at the start is no baseline for a row
timed later). Calls run under ``torch.inference_mode()`` with inputs made there, as the engine
runs its steps (views and allocations cost less than under grad mode); --grad-mode times them
under grad mode (as runs before this option did).
With --profile, a cProfile of each launcher's calls: its top functions by own time, in us
per launcher call. Writes DIR/launch_overhead.csv and .json; needs CUDA, except with --cpu
(no GPU column there).

--cpu (no GPU needed): the launchers' host-side Python alone, on CPU tensors. CPU tensors report
``is_cuda`` (a Python property: a few tens of ns more than the real attribute), each launcher's
first call runs the kernel in Triton's interpreter and makes a plan whose launch does nothing,
so later calls time the hit path (key, outputs, views) without Triton's C launcher (whose
per-tensor ``data_ptr()`` call and pointer check a hit path that passes ints avoids: not counted).
Timed in this thread's CPU time (wall time on a loaded machine swings with other processes).
For before/after comparisons of launcher code, not a GPU figure.
--processes N: the whole measurement in N fresh processes, one after another (DIR/process<k>/); the
rows of all in DIR/launch_overhead.csv (column ``process``) and per row the median and the worst
over them in DIR/launch_overhead_summary.csv (printed). The host's speed, and which launcher is
slow, differ between processes.
--kernels DIR: import ``kvbench.kernels`` from DIR (e.g. an exported older kernels/ folder) to
time another version of the launchers with this script.
--compare DIR: time the launchers of DIR (``git archive OLD kernels | tar -x -C /tmp/old`` gives
/tmp/old/kernels) too, each round in turn with this checkout's: a before/after in one process.
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
from types import SimpleNamespace

if "--cpu" in sys.argv:   # CPU tensors run only in Triton's interpreter, chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from checkout import use_checkout  # noqa: E402  (experiments/checkout.py)


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
from kvbench.provenance import git_commit  # noqa: E402



def launchers(package: str = "kvbench.kernels") -> SimpleNamespace:
    """The launcher functions of a kernels package (this checkout's, or one `load_kernels` made)."""
    names = ("decode_attention", "extend_attention", "kv_write", "linear", "page_copy", "rms_norm",
             "rope_kv_write", "silu_mul")
    return SimpleNamespace(**{n: getattr(importlib.import_module(f"{package}.{n}"), n) for n in names})


def load_kernels(folder: pathlib.Path, package: str = "kvbench_base_kernels") -> str:
    """Import the kernels/ folder `folder` (e.g. `git archive` of an older commit) as `package`
    next to this checkout's, for --compare; returns the package name."""
    spec = importlib.util.spec_from_file_location(package, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return package


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fns, n: int = 2000, rounds: int = 7, clock=time.perf_counter) -> list[tuple[float, float]]:
    """(median, minimum) over `rounds` of the host time per call of each of `fns`, in us; the
    functions take turns round by round, so a change of machine load hits them alike. `clock`:
    wall time (a GPU's launches: the host may wait for the GPU), or --cpu's thread CPU time (time
    sliced away to other processes of a loaded machine is not counted)."""
    for fn in fns:
        for _ in range(20):
            fn()
    _sync()
    per = [[] for _ in fns]
    for _ in range(rounds):
        for fn, times in zip(fns, per):
            t = clock()
            for _ in range(n):
                fn()
            times.append((clock() - t) / n * 1e6)
            _sync()
    return [(statistics.median(times), min(times)) for times in per]


def _spin_cycles_per_us() -> float:
    """Clock cycles of ``torch.cuda._sleep`` per us on this GPU (measured: boost clocks vary)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)   # (warm)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    end.synchronize()
    return 2_000_000 / (start.elapsed_time(end) * 1e3)


def _queued_us(fn, n: int, spin_cycles: int) -> float | None:
    """GPU us per call of fn: n calls issued behind a spin kernel, timed by events around them;
    None unless the GPU was still spinning when the host had issued the last call (then the GPU
    ran them back to back, without waiting for the host)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(spin_cycles)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    queued = not start.query()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n if queued else None


def gpu_us(fns, host: list[float], n: int = 200, rounds: int = 7) -> list[float | None]:
    """Median over `rounds` of the GPU's own time per call of each of `fns` (`_queued_us`), the
    spin sized from `host` (their host us per call); the calls per round are halved (down to 10)
    where the host could not issue them all before the spin ended (a full launch queue blocks
    it). None where it never could. Taking turns round by round, as `host_us`."""
    rate = _spin_cycles_per_us()
    per = [[] for _ in fns]
    calls = [n] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            while calls[i] >= 10:
                # 3x the host's time for the calls (a slower round than the timed ones) + 1 ms
                t = _queued_us(fn, calls[i], int(rate * (3 * calls[i] * host[i] + 1000)))
                if t is not None:
                    per[i].append(t)
                    break
                calls[i] //= 2
    return [statistics.median(times) if times else None for times in per]


def cases(dev, k: SimpleNamespace):
    """(name, zero-argument call) of the launchers in `k` at tiny shapes: a 2-request batch, 1 KV
    head group, D=64. The "as model" rows call attention as kvbench/model.py does (q, and extend's
    k_new/v_new, strided views of one qkv output; sm_scale, contiguous, max_seq_len and the bounds
    passed by keyword; the output written over q, out=q, as the model does since 2026-11-30)."""
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
    # as the model calls attention: q, k, v strided views of one projection output, bounds passed
    qkv_d = torch.randn(2, Hq + 2 * Hkv, D, device=dev, dtype=bf)
    qkv_e = torch.randn(6, Hq + 2 * Hkv, D, device=dev, dtype=bf)
    qd, qm, km, vm = qkv_d[:, :Hq], qkv_e[:, :Hq], qkv_e[:, Hq:Hq + Hkv], qkv_e[:, Hq + Hkv:]
    model = dict(sm_scale=D ** -0.5, contiguous=False, max_seq_len=64, window=0, chunk=0)
    return [
        ("torch add_ (yardstick)", lambda: small.add_(1.0)),
        ("decode_attention 1 split", lambda: k.decode_attention(q, kc, vc, pt, sl, ps, num_splits=1, out=out)),
        ("decode_attention 4 splits", lambda: k.decode_attention(q, kc, vc, pt, sl, ps, num_splits=4, out=out)),
        ("decode_attention auto", lambda: k.decode_attention(q, kc, vc, pt, sl, ps, max_seq_len=64)),
        ("extend_attention", lambda: k.extend_attention(qe, kc, vc, pt, qsl, sl, ps)),
        ("decode_attention as model", lambda: k.decode_attention(qd, kc, vc, pt, sl, ps, out=qd, **model)),
        ("extend_attention as model", lambda: k.extend_attention(qm, kc, vc, pt, qsl, sl, ps, k_new=km, v_new=vm,
                                                                 out=qm, **model)),
        ("decode_attention as model, own out", lambda: k.decode_attention(qd, kc, vc, pt, sl, ps, **model)),
        ("extend_attention as model, own out", lambda: k.extend_attention(qm, kc, vc, pt, qsl, sl, ps, k_new=km,
                                                                          v_new=vm, **model)),
        ("kv_write", lambda: k.kv_write(kn, kn, kc, vc, slots)),
        ("rope_kv_write", lambda: k.rope_kv_write(qkv, cos, sin, kc, vc, slots, Hq, Hkv)),
        ("rms_norm", lambda: k.rms_norm(x, w, 1e-5)),
        ("rms_norm + residual", lambda: k.rms_norm(x, w, 1e-5, residual=x)),
        ("silu_mul", lambda: k.silu_mul(x)),
        ("linear (gemv)", lambda: k.linear(x, wl)),
        ("page_copy", lambda: k.page_copy(pool, src, dst, ps)),
    ]


def _first_call_s(fn) -> float:
    """Seconds a second call of fn takes (the first makes the plan)."""
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _launch_stand_in(*args) -> None:
    """--cpu's launch: nothing. (Triton's C launcher calls ``data_ptr()`` and cuPointerGetAttribute
    for each tensor it gets, which a hit path that passes pointers as ints saves: not counted here.)"""


class _InterpretedTuner:
    """--cpu's stand-in for linear's autotuner (``_gemv_tuned``, ``_gemv_m1_tuned``: Triton's autotuner benchmarks on a
    GPU): launches the module's plain kernel in the interpreter with its INTERPRET_CONFIG, and
    reports that config as the best, so linear's GPU branch (and its plan) runs on CPU tensors."""

    def __init__(self, module, jitfn) -> None:
        import triton
        self._module, self._jitfn = module, jitfn
        self.best_config = triton.Config(dict(module.INTERPRET_CONFIG))

    def __getitem__(self, grid):
        cfg = self._module.INTERPRET_CONFIG

        def launch(*args, **kwargs):
            g = grid(cfg) if callable(grid) else grid
            return self._jitfn[g](*args, **kwargs, **cfg)
        return launch


@contextlib.contextmanager
def stub_launches(packages: tuple[str, ...]):
    """CPU stand-in for the GPU launch plans (--cpu): tensors report ``is_cuda``, every launcher
    module of `packages` (names ending in ".") makes plans with `_launch_stand_in` as their launch
    (a `Plan` of the module's own package, as its hit path expects), linear's autotuner runs its
    interpreter config (`_InterpretedTuner`), so a launcher's second call of a key runs its whole
    hit path but Triton's C launcher. Undone on exit."""

    def fake_plan_for(common):
        def fake_plan(kernel, jitfn, args, kwargs, front, device):
            names = jitfn.arg_names
            if any(n not in kwargs for n in names[len(args):]):
                return None
            values = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
            return common.Plan(_launch_stand_in, (None,) * 9, 0, values[front:])
        return fake_plan

    mods = [sys.modules[m] for m in list(sys.modules)
            if m.startswith(packages) and hasattr(sys.modules[m], "make_plan")]
    commons = {p: sys.modules[f"{p}_common"] for p in packages}
    saved = [(m, {n: getattr(m, n) for n in ("make_plan", "_gemv_tuned", "_gemv_m1_tuned", "use_interpreter")
                           if hasattr(m, n)})
             for m in mods]
    streams = [(c, c._raw_stream) for c in commons.values()]
    torch.Tensor.is_cuda = property(lambda self: True)
    for c in commons.values():
        c._raw_stream = lambda index: 0
    for m, _ in saved:
        m.make_plan = fake_plan_for(next(c for p, c in commons.items() if m.__name__.startswith(p)))
        if hasattr(m, "_gemv_tuned"):
            m._gemv_tuned = _InterpretedTuner(m, m._gemv_kernel)
            if hasattr(m, "_gemv_m1_tuned"):
                m._gemv_m1_tuned = _InterpretedTuner(m, m._gemv_m1_kernel)
            m.use_interpreter = lambda device: False
    try:
        yield
    finally:
        for m, old in saved:
            for n, f in old.items():
                setattr(m, n, f)
        for c, st in streams:
            c._raw_stream = st
        del torch.Tensor.is_cuda


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


def _child_argv(argv: list[str], out: pathlib.Path) -> list[str]:
    """argv without --processes and --out (either spelling), with --out `out`."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--processes", "--out"):
            skip = True
        elif not a.startswith(("--processes=", "--out=")):
            rest.append(a)
    return rest + ["--out", str(out)]


def in_processes(args) -> None:
    """--processes N: the measurement in N fresh processes (the host's speed, and which launcher
    is slow, differ between processes), rows gathered into DIR/launch_overhead.csv with a
    `process` column, and per row the median and the worst over the processes in
    DIR/launch_overhead_summary.csv (printed)."""
    import pandas as pd
    frames, status = [], 0
    for k in range(args.processes):
        out = args.out / f"process{k}"
        print(f"---- process {k + 1}/{args.processes}", flush=True)
        rc = subprocess.run([sys.executable, __file__, *_child_argv(sys.argv[1:], out)]).returncode
        if rc:
            print(f"launch_overhead: process {k} exited with {rc}", file=sys.stderr)
            status = 1
            if not (out / "launch_overhead.csv").is_file():
                sys.exit(rc)
        frames.append(pd.read_csv(out / "launch_overhead.csv").assign(process=k))
    rows = pd.concat(frames, ignore_index=True)
    rows.to_csv(args.out / "launch_overhead.csv", index=False)
    g = rows.groupby(["kernels", "launcher"], sort=False)
    summary = pd.DataFrame(dict(host_us_median=g.host_us.median(), host_us_worst=g.host_us.max(),
                                gpu_us_median=g.gpu_us.median(), x_torch_op_median=g.x_torch_op.median(),
                                x_torch_op_worst=g.x_torch_op.max(), torch_op_us_median=g.torch_op_us.median(),
                                processes=g.size())).reset_index()
    summary.to_csv(args.out / "launch_overhead_summary.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.round(2).to_string(index=False))
    if status:
        sys.exit(status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="time the launchers' Python on CPU tensors, launches stubbed")
    ap.add_argument("--kernels", type=pathlib.Path, help="import kvbench.kernels from this folder")
    ap.add_argument("--compare", type=pathlib.Path,
                    help="also time the launchers of this kernels/ folder (e.g. an older commit's), round by round "
                         "in turn with this checkout's")
    ap.add_argument("--calls", type=int, default=2000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gpu-calls", type=int, default=200, help="calls per round of the GPU-time measurement")
    ap.add_argument("--grad-mode", action="store_true",
                    help="time under grad mode (as earlier runs of this script did), not torch.inference_mode "
                         "(the engine's)")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the whole measurement in this many fresh processes, one after another (DIR/process<k>/), "
                         "and summarize each row over them (median and worst)")
    args = ap.parse_args()
    if args.processes > 1:
        return in_processes(args)
    if not args.cpu and not torch.cuda.is_available():
        print("launch_overhead: no CUDA device (use --cpu to time the launchers' Python alone)", file=sys.stderr)
        sys.exit(2)
    if args.compare is not None and not (args.compare / "__init__.py").is_file():
        print(f"launch_overhead: --compare {args.compare}: no kernels package there (__init__.py)", file=sys.stderr)
        sys.exit(2)
    dev = torch.device("cpu" if args.cpu else "cuda")
    commit = git_commit() or "unknown"
    machine = "CPU (launches stubbed)" if args.cpu else torch.cuda.get_device_name()
    versions = [(str(args.kernels) if args.kernels else "kernels/", "kvbench.kernels")]
    if args.compare is not None:
        versions.append((str(args.compare), load_kernels(args.compare.resolve())))
    rows, failed = [], []
    profiles = {}
    # the engine steps under torch.inference_mode (activations are inference tensors): views and
    # outputs cost less there than under grad mode (CPU: a view ~0.55 against ~1.1 us)
    mode = contextlib.nullcontext() if args.grad_mode else torch.inference_mode()
    kits = [launchers(p) for _, p in versions]   # (imported before stub_launches looks for them)
    with mode, stub_launches(tuple(f"{p}." for _, p in versions)) if args.cpu else contextlib.nullcontext():
        by_version = [cases(dev, k) for k in kits]
        yardstick = by_version[0][0][1]
        for name, _ in by_version[0]:
            # (a launcher an older kernels/ folder lacks: its row only for the versions that have it)
            have = [(v, dict(cs)[name]) for v, cs in zip(versions, by_version) if name in dict(cs)]
            fns = [fn for _, fn in have]
            try:
                first = max(_first_call_s(fn) for fn in fns)
            except Exception as e:   # (reported; the other rows are still timed, the exit status is 1)
                print(f"{name:34s} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                failed.append(name)
                continue
            if args.cpu and "yardstick" not in name and first > 0.01:
                print(f"{name:34s} skipped: no plan on the CPU (interpreted every call)", flush=True)
                continue
            # the yardstick takes its turn in every launcher's rounds: the host's speed drifts over a
            # run (and differs between processes by up to ~1.5x), so each row's ratio is to the torch
            # op timed in the same rounds
            *host, (yard, _) = host_us(fns + [yardstick], n=args.calls, rounds=args.rounds,
                                       clock=time.thread_time if args.cpu else time.perf_counter)
            gpu = [None] * len(fns) if args.cpu else gpu_us(fns, [m for m, _ in host], n=args.gpu_calls,
                                                            rounds=args.rounds)
            for ((folder, _), _), (med, low), g in zip(have, host, gpu):
                bound = "" if g is None else "host" if g < 0.9 * med else "GPU"
                rows.append(dict(device=machine, commit=commit, kernels=folder, launcher=name,
                                 host_us=round(med, 2), host_us_min=round(low, 2),
                                 gpu_us=None if g is None else round(g, 2), bound=bound,
                                 torch_op_us=round(yard, 2), x_torch_op=round(med / yard, 2)))
                gtxt = "" if g is None else f"  GPU {g:6.2f} us ({bound}-bound)"
                print(f"{name:34s} {med:8.2f} us  (min {low:6.2f}){gtxt}  x{med / yard:5.2f} torch op ({yard:.2f} us)  "
                      f"{folder}", flush=True)
            if args.profile and "yardstick" not in name:
                profiles[name] = profile(fns[0], n=args.calls)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "launch_overhead.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    (args.out / "launch_overhead.json").write_text(json.dumps(dict(rows=rows, profiles=profiles), indent=1))
    for name, prof in profiles.items():
        print(format_profile(name, prof))
    if failed:
        print(f"launch_overhead: failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
