"""Small helpers shared by the kernel launchers: dtype/shape checks and interpreter dispatch.

Nothing here runs at import time except plain definitions and reading KVBENCH_PDL.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Dtypes the attention kernels accept for q / K / V (fp32 accumulation always).
ATTN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)

BACKENDS = ("triton", "torch")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_interpreter(device: torch.device) -> bool:
    """True when the launch must go through Triton's interpreter (CPU tensors or TRITON_INTERPRET=1)."""
    return device.type == "cpu" or env_interpret()


def kernel_for(jitfn, device: torch.device):
    """The launchable kernel for ``device``.

    ``@triton.jit`` decides between compiled and interpreted code when a module is imported, and
    Triton's own library functions (``tl.sum``, ``tl.zeros``...) are decorated when
    ``triton.language`` is first imported. CPU tensors can only run in the interpreter, so
    ``TRITON_INTERPRET=1`` must be in the environment before the first ``import triton`` of the
    process (the kernel tests set it in their conftest).
    """
    if device.type != "cpu":
        return jitfn
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(jitfn, InterpretedFunction):
        raise RuntimeError(
            "CPU tensors need Triton's interpreter, but triton was imported without TRITON_INTERPRET=1. "
            "Set TRITON_INTERPRET=1 before anything imports triton (e.g. first line of tests/conftest.py), "
            "or pass backend='torch'."
        )
    return jitfn


def dot_in_f32(dtype: torch.dtype, device: torch.device) -> bool:
    """Triton's CPU interpreter computes bf16 ``tl.dot`` wrongly (triton 3.9: garbage values), so
    in interpreter mode bf16 operands are upcast to fp32 right before each dot (after the same
    rounding to bf16 the GPU path applies). Compiled GPU code always dots in the input dtype.
    """
    return use_interpreter(device) and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no tf32) so fp32 meets its tight tolerance; for
    bf16/fp16 operands this is Triton's default and changes nothing."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: small, so the split-KV heuristic still splits tiny test shapes


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---------------------------------------------------------------------------- programmatic dependent launch
# Hopper+ can start a kernel while the one before it in the stream drains (CUDA "programmatic
# dependent launch"): its programs get scheduled and block in `gdc_wait` until the previous kernel
# has finished and its writes are visible, so launch latency overlaps the previous kernel's tail.
# Modes: "off"; "early" (each kernel releases the next one as it starts); "late" (after its main
# loop). KVBENCH_PDL or `set_pdl` choose; never in the interpreter. Measured on an H200
# (docs/kernels.md): "late" is the fastest for a decode step, "early" the slowest (waiting
# programs of the next kernel take slots the current one's programs need).
PDL_MODES = {"off": 0, "early": 1, "late": 2}
_pdl_mode = os.environ.get("KVBENCH_PDL", "late").lower()
if _pdl_mode not in PDL_MODES:
    raise ValueError(f"KVBENCH_PDL={_pdl_mode!r}: expected one of {sorted(PDL_MODES)}")


def set_pdl(mode: str) -> str:
    """Set the PDL mode for later launches (captured CUDA graphs keep theirs); returns the old one."""
    global _pdl_mode
    if mode not in PDL_MODES:
        raise ValueError(f"PDL mode {mode!r}: expected one of {sorted(PDL_MODES)}")
    was, _pdl_mode = _pdl_mode, mode
    return was


def pdl_args(device: torch.device) -> dict:
    """Launch keywords: ``PDL`` (the kernels' constexpr mode) and Triton's ``launch_pdl``."""
    mode = PDL_MODES[_pdl_mode] if device.type == "cuda" and not env_interpret() and _cuda_capability(
        device.index if device.index is not None else torch.cuda.current_device()) >= 9 else 0
    return dict(PDL=mode, launch_pdl=True) if mode else dict(PDL=0)  # (older Triton: no launch_pdl)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def pdl_early(PDL: tl.constexpr):
    """Mode "early": let the next kernel be scheduled now (it still waits for our writes)."""
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the previous kernel has finished and its writes are visible. Every load of data
    another kernel writes, and every store, must come after this."""
    if PDL > 0:
        tl.extra.cuda.gdc_wait()


def page_log2(page_size: int) -> int:
    """The PAGE_LOG2 constexpr of the attention kernels' page-table walk: log2 of a power-of-two
    page size (the walk by shift and mask), else -1 (by division)."""
    return page_size.bit_length() - 1 if page_size > 0 and not page_size & (page_size - 1) else -1


@triton.jit
def page_walk(pt_row, offs, end, page_size, PAGE_LOG2: tl.constexpr):
    """Slots of token positions `offs` (< end; the others read page 0) through a page-table row.
    PAGE_LOG2 >= 0 (page_size == 2 ** PAGE_LOG2): by shift and mask; -1: by division by the
    run-time page_size (on an H200, the division cost decode 1 x 32k 1.3 us of its 41, and the
    walk by shift is as fast as a slab's)."""
    if PAGE_LOG2 >= 0:
        page = tl.load(pt_row + (offs >> PAGE_LOG2), mask=offs < end, other=0).to(tl.int64)
        return (page << PAGE_LOG2) + (offs & ((1 << PAGE_LOG2) - 1))
    else:
        page = tl.load(pt_row + offs // page_size, mask=offs < end, other=0).to(tl.int64)
        return page * page_size + offs % page_size


@triton.jit
def tile_pages(pt_row, n0, end, BLOCK_N: tl.constexpr, PAGE_LOG2: tl.constexpr):
    """The BLOCK_N >> PAGE_LOG2 page ids of the tile [n0, n0 + BLOCK_N), n0 a multiple of the
    page (pages past `end` read page 0): one load per page, not per token."""
    NP: tl.constexpr = BLOCK_N >> PAGE_LOG2
    pidx = (n0 >> PAGE_LOG2) + tl.arange(0, NP)
    return tl.load(pt_row + pidx, mask=(pidx << PAGE_LOG2) < end, other=0)


@triton.jit
def in_range(offs, lo, hi):
    """lo <= offs < hi in one unsigned compare, for hi > lo (the tile walks' key mask: a tile that
    starts on a page boundary below lo); through int32, since int64 `seq_lens` reach lo and hi."""
    return (offs - lo).to(tl.int32).to(tl.uint32, bitcast=True) < (hi - lo).to(tl.int32).to(tl.uint32, bitcast=True)


@triton.jit
def tile_slots(page, BLOCK_N: tl.constexpr, PAGE_LOG2: tl.constexpr):
    """A tile's [BLOCK_N] slots from its `tile_pages`, by broadcast and reshape (compiled offline for
    sm_90, the reshape lands straight in the K/V load's row layout: no convert_layout, no shared memory)."""
    PS: tl.constexpr = 1 << PAGE_LOG2
    return tl.reshape((page.to(tl.int64)[:, None] << PAGE_LOG2) + tl.arange(0, PS)[None, :].to(tl.int64), [BLOCK_N])


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """A kernel's prologue: `pdl_early`, then `pdl_wait`."""
    pdl_early(PDL)
    pdl_wait(PDL)


@triton.jit
def pdl_late(PDL: tl.constexpr):
    """Mode "late", after the kernel's main work: let the next kernel be scheduled."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


# ---------------------------------------------------------------------------- cheap launches
# `kernel[grid](...)` costs 40-80 us of host time a call (Triton 3.6, H200 host; a torch elementwise
# op costs 10 there): it binds and specializes every argument, builds a cache key, checks the
# kernel's globals and calls the launch hooks, and the launchers' own checks cost as much again.
# A launcher that knows which of its inputs decide the compiled code (dtypes, the shapes and
# strides it specializes on, constexprs, pointer alignment) keys a `Plan` on exactly those: the
# first call with a key checks everything and compiles through Triton, later calls launch
# straight through Triton's C launcher (experiments/launch_overhead.py measures both).
# The hit path of a launcher, in the order it pays: one `data_ptr()` per tensor, whose int both
# checks alignment (`not (p0 | p1 | ...) & 15` over the pointers Triton specializes on; plans are
# made for aligned calls only, so the flag is no part of the key) and goes to the C launcher (an
# int skips the launcher's own data_ptr call and its cuPointerGetAttribute check); the key; a
# dict lookup; outputs by `empty_like` / `new_empty`; the launch. What a key leaves out (sizes
# that vary per call) is resolved per call, or cached per call shape in the plan's entry.
# What a key item costs (2-core CPU host, torch 2.13, ns): `.shape` / `.stride()` 160 each (a new
# object), `.dtype` 80, `.get_device()` 90 (an int: cheaper to hash and compare than `.device`'s
# object, and exact for the other inputs once the first is known to be on the GPU),
# `.is_contiguous()` 100, `.numel()` 90; slicing a torch.Size 240 (unpack it: 65); `empty_like`
# about half of `new_empty`. So: one `.shape` per tensor, unpacked; devices as indices; a tensor
# whose whole shape is in the key keyed as contiguous when it is (its strides are the shape's,
# but on size-1 dims, whose stride reads nothing); a 1-D tensor's length as its numel with its
# stride tuple (one item per dim) in the key. Hashing a 30-item key costs about as much as
# comparing it: a launcher keeps the last key it took, with its entry, under `_PLANS[None]` and
# compares before it hashes (the model's layers repeat one key per step).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def plan_hit(plans: dict, key):
    """The entry of `key` in a launcher's plan dict, or None. The last key taken is kept with its
    entry under `plans[None]` (cleared with the plans) and compared before the dict is hashed:
    the model's layers repeat one key per step."""
    last = plans.get(None)
    if last is not None and last[0] == key:
        return last[1]
    hit = plans.get(key)
    if hit is not None:
        plans[None] = (key, hit)
    return hit


def Plan(launch, head: tuple, device: int, tail: tuple):
    """One compiled kernel and the launch arguments its key fixed: a function, `plan(g0, g1, g2,
    *front)` launches it on the current stream with `front` (the per-call arguments) before them.
    A pointer argument in `front` may be a tensor or its ``data_ptr()`` (an int: cheaper). A closure,
    not an object with ``__call__``: a plain function call costs ~130 ns less a launch (CPython
    3.11); its parts are kept as ``plan.parts`` for `direct`."""
    def plan(g0: int, g1: int, g2: int, *front) -> None:
        launch(g0, g1, g2, _raw_stream(device), *head, *front, *tail)
    plan.parts = (launch, head, device, tail)
    return plan


_PLAN_CODE = Plan(None, (), 0, ()).__code__


def direct(plan) -> tuple:
    """`plan` unwrapped for a launcher's hit path: (launch, stream, device, head, tail) with
    ``launch(g0, g1, g2, stream(device), *head, *front, *tail)`` doing what ``plan(g0, g1, g2, *front)``
    does, one Python call (and one argument tuple) fewer per launch. A launch plan that is not a
    `Plan` (a test's stand-in) is called through as it is (head and tail empty). The stream
    function is the one in use now: a CPU stand-in that replaces `_raw_stream` before its plans are
    made gets its own."""
    if getattr(plan, "__code__", None) is _PLAN_CODE:
        launch, head, device, tail = plan.parts
        return launch, _raw_stream, device, head, tail
    return (lambda g0, g1, g2, stream, *front: plan(g0, g1, g2, *front)), _no_stream, 0, (), ()


def _no_stream(device: int) -> None:
    return None


def _no_hooks(hook) -> bool:
    return hook is None or not getattr(hook, "calls", True)


def make_plan(kernel, jitfn, args: tuple, kwargs: dict, front: int, device: torch.device):
    """The direct launch (a `Plan`) of `kernel` (what `jitfn[grid](*args, **kwargs)` returned) with every
    kernel argument after the first `front` fixed to this call's. None where that does not apply:
    the interpreter, launch hooks (e.g. a profiler), kernels that need scratch memory, or a Triton
    whose compiled kernels do not expose this launcher."""
    run = getattr(kernel, "run", None)
    launch = getattr(run, "launch", None)
    if device.type != "cuda" or launch is None or _raw_stream is None or getattr(run, "global_scratch_size", 1) or \
            getattr(run, "profile_scratch_size", 1) or getattr(kernel, "function", None) is None:
        return None
    from triton import knobs
    if not (_no_hooks(knobs.runtime.launch_enter_hook) and _no_hooks(knobs.runtime.launch_exit_hook)):
        return None
    names = getattr(jitfn, "arg_names", None)
    if names is None or any(n not in kwargs for n in names[len(args):]):
        return None
    values = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
    head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata,
            None, None, None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return Plan(launch, head, index, values[front:])


def aligned(*tensors) -> bool:
    """Every data pointer 16-byte aligned (what Triton specializes pointers on). A plan is only
    made for aligned inputs, so one key never stands for two specializations."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return not bits & 15


def pdl_mode_now() -> str:
    """The PDL mode later launches use (part of every plan's key)."""
    return _pdl_mode


# ---------------------------------------------------------------------------- checks
def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check(cond: bool, msg) -> None:
    """Raise ValueError(msg) unless cond; msg may be a zero-argument callable, so the message
    (an f-string over shapes) is only formatted on failure: launchers sit on the decode hot path."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None,
                 last_contiguous: bool = True) -> None:
    check(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        check(t.dim() == ndim, lambda: f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        check(t.dtype in dtypes, lambda: f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None:   # a tensor to be on the same device as (cheap), or a torch.device
        same = (t.get_device() == device.get_device() and t.device.type == device.device.type
                if isinstance(device, torch.Tensor) else t.device == device)
        check(same, lambda: f"{name} is on {t.device}, expected "
                            f"{device.device if isinstance(device, torch.Tensor) else device} (all inputs on one device)")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1:
        check(t.stride(-1) == 1, lambda: f"{name} must be contiguous in its last dim, got strides {t.stride()}")
