"""Recycled outputs (kernels/_common.recycled): a launcher's hit path hands out the memory of its
last output again only once nothing holds it -- not the caller's tensor, a view, a detached
alias, the storage's Python object, a DLPack capsule -- only under inference mode, never while a
CUDA graph is being captured, only on the stream it was made on, and only for the launch it was
made for. Run on the CPU: plans launch the kernels through Triton's interpreter with exactly the
hit path's arguments (pointers as ints, mapped back to their tensors through a weak registry, so
the registry holds nothing alive), CPU tensors report ``is_cuda`` and no capture is under way.
Triton's interpreter leaves reference cycles that hold a storage's Python object until the garbage
collector runs (a GPU launch takes ints): `drop` collects them."""
from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from kvbench.kernels import _common, decode_attention as dmod, extend_attention as emod

BF = torch.bfloat16
CPU = torch.device("cpu")


@contextlib.contextmanager
def interpreted_plans(capturing: bool = False):
    """Plans (real `_common.Plan`s, so the hit path unwraps them as on a GPU) whose launch runs
    the kernel in the interpreter; yields the list of launched kernels."""
    registry, launched = weakref.WeakValueDictionary(), []
    real_ptr = torch.Tensor.data_ptr

    def data_ptr(self):
        p = real_ptr(self)
        registry[p] = self
        return p

    def make_plan(kernel, jitfn, args, kwargs, front, device):
        values = tuple(args) + tuple(kwargs[n] for n in jitfn.arg_names[len(args):])
        pointers = {i for i, v in enumerate(values) if isinstance(v, torch.Tensor)}

        def launch(g0, g1, g2, stream, *rest):
            call = rest[9:]   # (after the head: function, metadata, hooks)
            launched.append(jitfn)
            _common.kernel_for(jitfn, CPU)[(g0, g1, g2)](
                *[registry[a] if i in pointers and a.__class__ is int else a for i, a in enumerate(call)])
        return _common.Plan(launch, (None,) * 9, 0, values[front:])

    mods = (dmod, emod)
    saved = [(m, m.make_plan, m._PLANS, m._SLOT) for m in mods]
    saved_common = _common._raw_stream, _common._capturing
    assert "data_ptr" not in vars(torch.Tensor) and "is_cuda" not in vars(torch.Tensor)
    torch.Tensor.data_ptr, torch.Tensor.is_cuda = data_ptr, property(lambda self: True)
    _common._raw_stream, _common._capturing = (lambda index: 7), (lambda: capturing)
    for m in mods:
        m.make_plan, m._PLANS, m._SLOT = make_plan, {}, _common.new_slot()
    try:
        yield launched
    finally:
        del torch.Tensor.data_ptr, torch.Tensor.is_cuda
        _common._raw_stream, _common._capturing = saved_common
        for m, mp, plans, slot in saved:
            m.make_plan, m._PLANS, m._SLOT = mp, plans, slot


def drop() -> None:
    gc.collect()


def decode_inputs():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D = 3, 4, 2, 32
    kc, vc = torch.randn(512, Hkv, D, dtype=BF, generator=g), torch.randn(512, Hkv, D, dtype=BF, generator=g)
    q = torch.randn(B, Hq, D, dtype=BF, generator=g)
    pt = torch.randperm(32, generator=g)[:B * 4].view(B, 4).to(torch.int32)
    sl = torch.tensor([5, 64, 33], dtype=torch.int32)
    return q, kc, vc, pt, sl


def decode(inputs, **kw):
    return dmod.decode_attention(*inputs, 16, max_seq_len=64, **kw)


def test_decode_output_memory_recycled_only_once_dropped():
    x = decode_inputs()
    with interpreted_plans() as launched, torch.inference_mode():
        xi = tuple(t.clone() for t in x)          # (inference tensors, as the engine's)
        ref = decode(xi)                             # the checked path: makes the plan
        assert not launched
        torch.testing.assert_close(ref.float(), decode(xi, backend="torch").float(), atol=2e-2, rtol=2e-2)
        a = decode(xi)                               # a hit: a new output, kept for recycling
        assert len(launched) == 1 and torch.equal(a, ref)
        pa = a.data_ptr()
        del a
        drop()
        b = decode(xi)                               # a's memory, a new tensor over it
        assert b.data_ptr() == pa and torch.equal(b, ref) and b.is_inference()
        held = {"tensor": lambda t: t, "view": lambda t: t.view(-1), "detached": lambda t: t.detach(),
                "storage": lambda t: t.untyped_storage(), "dlpack": to_dlpack}
        for name, hold in held.items():
            keep = hold(b)
            pb = b.data_ptr()
            del b
            drop()
            c = decode(xi)
            assert c.data_ptr() != pb, name          # (held: fresh memory, the held one untouched)
            assert torch.equal(c, ref), name
            del keep
            drop()
            b, c = c, None                           # (c's memory is now the slot's)
        pb = b.data_ptr()
        del b
        drop()
        assert decode(xi).data_ptr() == pb           # nothing holds it: recycled
        assert len(launched) == 3 + len(held)


def test_decode_output_not_recycled_outside_inference_mode_or_for_another_launch():
    x = decode_inputs()
    with interpreted_plans():
        decode(x)
        a = decode(x)                                # a hit under grad mode: nothing kept
        pa = a.data_ptr()
        del a
        drop()
        assert dmod._SLOT[1] is None
        with torch.inference_mode():
            a = decode(x)
            pa = a.data_ptr()
            del a                                    # (kept for this launch)
            decode(x, num_splits=2)                  # another launch: its plan
            other = decode(x, num_splits=2)          # a hit of that launch: not a's memory
            po = other.data_ptr()
            assert po != pa
            del other
            drop()
            assert decode(x, num_splits=2).data_ptr() == po   # (the slot holds the last launch's)


def test_nothing_recycled_or_kept_while_capturing():
    x = decode_inputs()
    with interpreted_plans(capturing=True) as launched, torch.inference_mode():
        decode(x)
        decode(x)
        assert len(launched) == 1 and dmod._SLOT[1] is None
    slot, hit = _common.new_slot(), ("launch",)
    with interpreted_plans(), torch.inference_mode():
        out = torch.empty(4)
        _common.keep_for_recycling(slot, hit, out, 7)
        del out
        drop()
    with interpreted_plans(capturing=True), torch.inference_mode():
        assert _common.recycled(slot, hit, 7) is None     # (kept before the capture: not handed to it)


def test_recycled_memory_is_the_launchs_stream_and_size():
    slot, hit = _common.new_slot(), ("launch",)
    with interpreted_plans(), torch.inference_mode():
        out = torch.empty(4, 8)
        _common.keep_for_recycling(slot, hit, out, 7)
        p = out.data_ptr()
        del out
        drop()
        assert _common.recycled(slot, hit, 8) is None                   # another stream
        again = _common.recycled(slot, hit, 7)
        assert again is not None and again.data_ptr() == p and again.shape == (4, 8)
        assert _common.recycled(slot, hit, 7) is None                   # (again holds it)
        again.untyped_storage().resize_(0)                              # the caller freed its memory
        del again
        drop()
        assert _common.recycled(slot, hit, 7) is None
        big = torch.empty(_common.RECYCLE_MAX_BYTES // 4 + 1)
        slot2 = _common.new_slot()
        _common.keep_for_recycling(slot2, hit, big, 7)
        assert slot2[1] is None                                         # too large to keep


@pytest.mark.parametrize("ragged", [False, True])
def test_extend_output_memory_recycled_only_once_dropped(ragged):
    g = torch.Generator().manual_seed(1)
    Hq, Hkv, D, ps = 2, 1, 32, 16
    kc, vc = torch.randn(256, Hkv, D, dtype=BF, generator=g), torch.randn(256, Hkv, D, dtype=BF, generator=g)
    pt = torch.arange(8, dtype=torch.int32).view(2, 4)
    qsl, sl = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([20, 40], dtype=torch.int32)
    q = torch.randn(5, Hq, D, dtype=BF, generator=g)
    kw = dict(max_seq_len=64)
    if ragged:
        slots = torch.cat([pt[0, 0] * ps + torch.arange(17, 20), pt[1, 0] * ps + torch.arange(38, 40)])
        kw.update(k_new=kc[slots], v_new=vc[slots])
    ref = emod.extend_attention(q, kc, vc, pt, qsl, sl, ps, backend="torch", max_seq_len=64)
    with interpreted_plans() as launched, torch.inference_mode():
        emod.extend_attention(q, kc, vc, pt, qsl, sl, ps, **kw)
        a = emod.extend_attention(q, kc, vc, pt, qsl, sl, ps, **kw)
        pa = a.data_ptr()
        kept = a.view(5, -1)
        del a
        drop()
        b = emod.extend_attention(q, kc, vc, pt, qsl, sl, ps, **kw)
        assert b.data_ptr() != pa and torch.equal(kept.view(5, Hq, D), b)   # (the view kept a's memory)
        del kept
        drop()
        tol = dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(b.float(), ref.float(), **tol)
        pb = b.data_ptr()
        del b
        drop()
        c = emod.extend_attention(q, kc, vc, pt, qsl, sl, ps, **kw)
        assert c.data_ptr() == pb and len(launched) == 3
        torch.testing.assert_close(c.float(), ref.float(), **tol)
