"""The launchers' plan hit paths (kernels/_common.Plan), run on the CPU: GPU launch plans are
replaced by plans that replay the kernel through Triton's interpreter with exactly the arguments
the hit path passes (data pointers as ints, mapped back to their tensors), and CPU tensors report
``is_cuda``. A hit must compute bit for bit what the checked first call computes for the same
input, follow the per-call sizes, return what the miss path returns, and never accept input the
checks refuse. (tests/kernels/test_kernel_launch_plans.py runs the real plans on a GPU.)"""
from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch

from kvbench.kernels import (_common, decode_attention as dmod, extend_attention as emod, kv_write as kmod,
                             linear as lmod, page_copy as pmod, rms_norm as rmod, rope_kv_write as ropemod,
                             silu_mul as smod)

MODS = (dmod, emod, kmod, lmod, pmod, rmod, ropemod, smod)
BF = torch.bfloat16


class _Replay:
    """A plan whose launch runs `jitfn` in the interpreter on the hit path's arguments."""

    def __init__(self, jitfn, values: tuple, front: int, registry: dict, hits: list):
        self.jitfn, self.tail, self.registry, self.hits = jitfn, values[front:], registry, hits
        self.pointers = {i for i, v in enumerate(values) if isinstance(v, torch.Tensor)}

    def __call__(self, g0, g1, g2, *front):
        args = [self.registry[a] if i in self.pointers and a.__class__ is int else a
                for i, a in enumerate(front + self.tail)]
        self.hits.append(self.jitfn)
        _common.kernel_for(self.jitfn, torch.device("cpu"))[(g0, g1, g2)](*args)


@contextlib.contextmanager
def replay_plans():
    """Launch plans on the CPU; yields the list of replayed launches (one jitfn per launch)."""
    registry, hits = {}, []
    real_ptr = torch.Tensor.data_ptr

    def data_ptr(self):   # remember which tensor a pointer came from, to replay with it
        p = real_ptr(self)
        registry[p] = self
        return p

    def make_plan(kernel, jitfn, args, kwargs, front, device):
        names = jitfn.arg_names
        values = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
        for v in values:
            if isinstance(v, torch.Tensor):
                v.data_ptr()
        return _Replay(jitfn, values, front, registry, hits)

    saved = [(m, m.make_plan, m._PLANS) for m in MODS]
    assert "data_ptr" not in vars(torch.Tensor) and "is_cuda" not in vars(torch.Tensor)   # (both TensorBase's)
    torch.Tensor.data_ptr, torch.Tensor.is_cuda = data_ptr, property(lambda self: True)
    for m in MODS:
        m.make_plan, m._PLANS = make_plan, {}
    try:
        yield hits
    finally:
        del torch.Tensor.data_ptr, torch.Tensor.is_cuda
        for m, mp, plans in saved:
            m.make_plan, m._PLANS = mp, plans


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _miss_then_hit(call, make_inputs, sizes):
    """For each size: the result of a call that misses (no plans) must equal, bit for bit, the
    results of two calls at that size after one at another size made a plan; the last of them
    must take a plan. (A split-KV count that differs from the other size's needs its own plan:
    then the first of the two makes it.) make_inputs(size) -> fresh inputs, the same per size."""
    for size in sizes:
        other = sizes[0] if size != sizes[0] else sizes[-1]
        with replay_plans() as hits:
            fresh = call(*make_inputs(size))
            assert not hits
        with replay_plans() as hits:
            call(*make_inputs(other))                # makes the plan
            assert not hits
            first = call(*make_inputs(size))         # a hit, or a plan for another split count
            n = len(hits)
            again = call(*make_inputs(size))         # a hit
            assert len(hits) > n, "the call did not take the plan"
        for out in (first, again):
            for a, b in zip(fresh, out):
                assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("row_stride", [96, 128])
def test_rms_norm_hit(residual, row_stride):
    def inputs(T):
        g = _gen(T)
        x = torch.randn(T, row_stride, dtype=BF, generator=g)[:, :96]
        r = torch.randn(T, 96, dtype=BF, generator=g) if residual else None
        return x, torch.randn(96, dtype=BF, generator=g), r

    def call(x, w, r):
        out = rmod.rms_norm(x, w, 1e-5, r)
        return (out,) if r is None else (out, r)
    _miss_then_hit(call, inputs, [3, 1, 5])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("row_stride", [40, 64])
def test_linear_hit(bias, row_stride):
    def inputs(M):
        g = _gen(M)
        x = torch.randn(M, row_stride, dtype=BF, generator=g)[:, :40]
        w = torch.randn(24, 40, dtype=BF, generator=g)
        return x, w, torch.randn(24, dtype=BF, generator=g) if bias else None

    def call(x, w, b):
        return (lmod.linear(x, w, b),)
    _miss_then_hit(call, inputs, [3, 1, 16])


def test_linear_wrong_input_refused_after_a_plan_exists():
    """linear's key stands for every check: a call that differs from a planned one in what a check
    reads (shape, stride, dtype, device of x, weight or bias) is refused as on a first call, or
    (where it is valid) computes what the checked path computes."""
    g = _gen(3)
    x, w, b = torch.randn(4, 32, dtype=BF, generator=g), torch.randn(16, 32, dtype=BF, generator=g), \
        torch.randn(16, dtype=BF, generator=g)
    with replay_plans() as hits:
        for _ in range(2):
            lmod.linear(x, w, b)
            lmod.linear(x, w)
        assert len(hits) == 2
        with pytest.raises(ValueError, match="K=32"):
            lmod.linear(x, torch.randn(16, 48, dtype=BF))
        with pytest.raises(ValueError, match="weight dtype"):
            lmod.linear(x, w.float())
        with pytest.raises(ValueError, match="x dtype"):
            lmod.linear(x.to(torch.int32), w)
        with pytest.raises(ValueError, match="weight must be contiguous"):
            lmod.linear(x, torch.randn(32, 32, dtype=BF).as_strided((16, 32), (1, 16)))
        with pytest.raises(ValueError, match="bias is"):
            lmod.linear(x, w, torch.randn(32, dtype=BF)[:8])
        with pytest.raises(ValueError, match="bias dtype"):
            lmod.linear(x, w, b.float())
        with pytest.raises(ValueError, match="weight is on"):
            lmod.linear(x, _elsewhere(w))
        with pytest.raises(ValueError, match="bias is on"):
            lmod.linear(x, w, _elsewhere(b))
        with pytest.raises(ValueError, match="x must be contiguous"):
            lmod.linear(torch.randn(32, 4, dtype=BF).t(), w)
        square = torch.randn(32, 32, dtype=BF, generator=g)
        for _ in range(2):
            lmod.linear(x, square)
        n = len(hits)
        assert n == 3
        flipped = square.t()                              # same pointer and shape, other strides
        with pytest.raises(ValueError, match="weight must be contiguous"):
            lmod.linear(x, flipped)
        square.t_()                                       # the same tensor, transposed in place
        with pytest.raises(ValueError, match="weight must be contiguous"):
            lmod.linear(x, square)
        assert len(hits) == n


def test_rope_kv_write_hit_returns_split_views():
    Hq, Hkv, D = 4, 2, 16

    def inputs(T):
        g = _gen(T)
        qkv = torch.randn(T, 40, (Hq + 2 * Hkv) * D, dtype=BF, generator=g)[:, 3]   # strided rows
        cos, sin = torch.randn(T, D, dtype=BF, generator=g), torch.randn(T, D, dtype=BF, generator=g)
        kc, vc = torch.zeros(32, Hkv, D, dtype=BF), torch.zeros(32, Hkv, D, dtype=BF)
        slots = torch.randperm(32, generator=g)[:T].to(torch.int32)
        slots[0] = -1                                                                  # skipped
        return qkv, cos, sin, kc, vc, slots

    def call(qkv, cos, sin, kc, vc, slots):
        q, k, v = ropemod.rope_kv_write(qkv, cos, sin, kc, vc, slots, Hq, Hkv)
        for view, ref in zip((q, k, v), ropemod.split_qkv(qkv, Hq, Hkv)):
            assert (view.shape, view.stride(), view.storage_offset(), view.data_ptr()) == \
                (ref.shape, ref.stride(), ref.storage_offset(), ref.data_ptr())
        return q, k, v, qkv, kc, vc
    _miss_then_hit(call, inputs, [3, 1, 6])


@pytest.mark.parametrize("kw", [dict(num_splits=1), dict(num_splits=3, out=True), dict(max_seq_len=130),
                                dict(num_splits=2, window=40, sinks=True), dict(max_seq_len=130, out="q")])
def test_decode_hit(kw):
    Hq, Hkv, D, ps = 4, 2, 32, 16

    def inputs(width):   # the batch is in the key; the page-table width and the lengths are not
        g, B = _gen(width), 3
        kc, vc = torch.randn(512, Hkv, D, dtype=BF, generator=g), torch.randn(512, Hkv, D, dtype=BF, generator=g)
        q = torch.randn(B, Hq, D, dtype=BF, generator=g)
        pt = torch.randperm(32, generator=g)[:B * width].view(B, width).to(torch.int32)
        sl = torch.randint(1, width * ps, (B,), generator=g, dtype=torch.int32)
        return q, kc, vc, pt, sl

    def call(q, kc, vc, pt, sl):
        extra = dict(kw)
        if extra.pop("sinks", False):
            extra["sinks"] = torch.linspace(-1, 1, Hq, dtype=BF)
        out = extra.pop("out", False)
        if out:
            extra["out"] = q if out == "q" else torch.full_like(q, 7.0)
        o = dmod.decode_attention(q, kc, vc, pt, sl, ps, **extra)
        assert "out" not in extra or o is extra["out"]
        return (o,)
    _miss_then_hit(call, inputs, [4, 2])


@pytest.mark.parametrize("ragged, splits", [(False, None), (True, 2), (False, 2)])
def test_extend_hit(ragged, splits):
    Hq, Hkv, D, ps = 1, 1, 32, 16

    def inputs(lens):
        g = _gen(len(lens))
        new = [max(1, n // 3) for n in lens]
        kc, vc = torch.randn(512, Hkv, D, dtype=BF, generator=g), torch.randn(512, Hkv, D, dtype=BF, generator=g)
        T = sum(new)
        q = torch.randn(T, Hq, D, dtype=BF, generator=g)
        pt = torch.arange(len(lens) * 8, dtype=torch.int32).view(len(lens), 8)
        qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
        sl = torch.tensor(lens, dtype=torch.int32)
        return q, kc, vc, pt, qsl, sl

    def call(q, kc, vc, pt, qsl, sl):
        kw = dict(prefix_splits=splits, max_seq_len=64)
        if ragged:   # the new tokens' K/V as the cache holds them
            slots = torch.cat([pt[b, 0] * ps + torch.arange(int(sl[b]) - int(qsl[b + 1] - qsl[b]), int(sl[b]))
                               for b in range(sl.shape[0])])
            kw.update(k_new=kc[slots], v_new=vc[slots])
        return (emod.extend_attention(q, kc, vc, pt, qsl, sl, ps, **kw),)
    _miss_then_hit(call, inputs, [[24, 10], [50, 5, 20]])


@pytest.mark.parametrize("which, kw", [
    ("decode", dict(num_splits=1)), ("decode", dict(num_splits=3)), ("decode", dict(max_seq_len=130, window=40)),
    ("decode", dict(num_splits=3, config=dict(FUSED_MERGE=1))), ("extend", dict(prefix_splits=1)),
    ("extend", dict(prefix_splits=2, ragged=True)), ("extend", dict(ragged=True, max_seq_len=64))])
def test_output_written_over_q(which, kw):
    """out=q (the model's call: q a strided view of its qkv buffer, dead after attention) writes
    the output over q: bit for bit what a separate output gets, on the checked path and on a plan
    hit, and the rest of the qkv buffer (k_new / v_new's columns) untouched."""
    Hq, Hkv, D, ps = 4, 2, 32, 16
    g = _gen(11)
    kc, vc = torch.randn(512, Hkv, D, dtype=BF, generator=g), torch.randn(512, Hkv, D, dtype=BF, generator=g)
    kw = dict(kw)
    ragged = kw.pop("ragged", False)
    if which == "decode":
        B = 3
        T, pt = B, torch.randperm(32, generator=g)[:B * 4].view(B, 4).to(torch.int32)
        sl = torch.randint(1, 4 * ps, (B,), generator=g, dtype=torch.int32)
    else:
        lens, new = [40, 9, 30], [6, 3, 2]
        T, pt = sum(new), torch.arange(24, dtype=torch.int32).view(3, 8)
        qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
        sl = torch.tensor(lens, dtype=torch.int32)
    qkv0 = torch.randn(T, Hq + 2 * Hkv, D, dtype=BF, generator=g)
    if ragged:   # the new tokens' K/V as the cache holds them
        slots = torch.cat([pt[b, 0] * ps + torch.arange(lens[b] - new[b], lens[b]) for b in range(3)])
        qkv0[:, Hq:Hq + Hkv], qkv0[:, Hq + Hkv:] = kc[slots], vc[slots]

    def call(qkv, over_q):
        q = qkv[:, :Hq]
        out = dict(out=q) if over_q else {}
        if which == "decode":
            return dmod.decode_attention(q, kc, vc, pt, sl, ps, **kw, **out)
        extra = dict(k_new=qkv[:, Hq:Hq + Hkv], v_new=qkv[:, Hq + Hkv:]) if ragged else {}
        return emod.extend_attention(q, kc, vc, pt, qsl, sl, ps, **kw, **extra, **out)

    want = call(qkv0.clone(), False)
    with replay_plans() as hits:
        for n in range(2):   # checked, then (without config=) through the plan
            qkv = qkv0.clone()
            o = call(qkv, True)
            assert o.data_ptr() == qkv.data_ptr() and o.shape == want.shape
            assert torch.equal(o, want) and torch.equal(qkv[:, Hq:], qkv0[:, Hq:])
        assert bool(hits) == ("config" not in kw)


def test_small_launchers_hit():
    def inputs(T):
        g = _gen(T)
        x = torch.randn(T, 64, dtype=BF, generator=g)
        k, v = torch.randn(T, 2, 16, dtype=BF, generator=g), torch.randn(T, 2, 16, dtype=BF, generator=g)
        kc, vc = torch.zeros(64, 2, 16, dtype=BF), torch.zeros(64, 2, 16, dtype=BF)
        pool = torch.randn(1, 2, 64, 2, 16, dtype=BF, generator=g)
        return x, k, v, kc, vc, torch.randperm(64, generator=g)[:T].to(torch.int32), pool

    def call(x, k, v, kc, vc, slots, pool):
        kmod.kv_write(k, v, kc, vc, slots)
        pmod.page_copy(pool, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([2, 3], dtype=torch.int32), 16)
        return smod.silu_mul(x), kc, vc, pool
    _miss_then_hit(call, inputs, [3, 1, 4])


def test_wrong_input_refused_after_a_plan_exists():
    x, w = torch.randn(4, 64, dtype=BF), torch.randn(64, dtype=BF)
    qkv, cs = torch.randn(4, 4 * 16, dtype=BF), torch.randn(4, 16, dtype=BF)
    kc = torch.zeros(32, 1, 16, dtype=BF)
    slots = torch.arange(4, dtype=torch.int32)
    with replay_plans() as hits:
        for _ in range(2):
            rmod.rms_norm(x, w, 1e-5)
            ropemod.rope_kv_write(qkv, cs, cs, kc, kc.clone(), slots, 2, 1)
        assert len(hits) == 2
        with pytest.raises(ValueError, match="weight"):
            rmod.rms_norm(x, torch.randn(128, dtype=BF)[::2], 1e-5)                # strided weight
        with pytest.raises(ValueError, match="x must have 2 dims"):
            rmod.rms_norm(x[0], w, 1e-5)
        with pytest.raises(ValueError, match="slot_mapping"):
            ropemod.rope_kv_write(qkv, cs, cs, kc, kc.clone(), torch.arange(8, dtype=torch.int32)[::2], 2, 1)
        with pytest.raises(ValueError, match="cos"):
            ropemod.rope_kv_write(qkv, cs[:3], cs, kc, kc.clone(), slots, 2, 1)
        with pytest.raises(ValueError, match="cos"):
            ropemod.rope_kv_write(qkv, cs[0], cs, kc, kc.clone(), slots, 2, 1)
        with pytest.raises(ValueError, match="qkv width"):
            ropemod.rope_kv_write(qkv, cs, cs, kc, kc.clone(), slots, 2.0, 1)
        k = torch.randn(4, 1, 16, dtype=BF)
        for _ in range(2):
            kmod.kv_write(k, k, kc, kc.clone(), slots)
        with pytest.raises(ValueError, match="slot_mapping"):                      # read unstrided
            kmod.kv_write(k, k, kc, kc.clone(), torch.arange(8, dtype=torch.int32)[::2])
        with pytest.raises(ValueError, match="v shape"):
            kmod.kv_write(k, k[:3], kc, kc.clone(), slots)
        pool = torch.zeros(1, 2, 32, 1, 16, dtype=BF)
        src, dst = torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)   # (aligned)
        for _ in range(2):
            pmod.page_copy(pool, src, dst, 16)
        with pytest.raises(ValueError, match="src_pages"):
            pmod.page_copy(pool, slots.as_strided((2,), (2,)), slots[2:4], 16)    # read unstrided
        q, pt, sl = torch.randn(2, 2, 16, dtype=BF), torch.zeros(2, 2, dtype=torch.int32), torch.tensor([3, 4])
        for _ in range(2):
            dmod.decode_attention(q, kc, kc, pt, sl, 16, num_splits=1)
        with pytest.raises(ValueError, match="seq_lens"):                          # read unstrided
            dmod.decode_attention(q, kc, kc, pt, torch.tensor([3, 0, 4])[::2], 16, num_splits=1)
        with pytest.raises(ValueError, match="num_splits"):
            dmod.decode_attention(q, kc, kc, pt, sl, 16, num_splits=1.0)
        with pytest.raises(ValueError, match="page_size"):
            dmod.decode_attention(q, kc, kc, pt, sl, 16.0, num_splits=1)
        assert len(hits) == 5                                 # (the second calls: 2 above, kv_write, page_copy, decode)


def test_rope_kv_write_view_cache_follows_the_buffer():
    """The views rope_kv_write keeps for a qkv tensor passed twice in a row are its current views:
    every call still launches (bit for bit what the same kernel computes on copies), and another
    buffer, another tensor over the same memory, or the same tensor with other rows gets views of
    its own."""
    Hq, Hkv, D, T = 2, 1, 16, 4
    g = _gen(5)
    cs, sn = torch.randn(8, D, dtype=BF, generator=g), torch.randn(8, D, dtype=BF, generator=g)
    slots = torch.arange(8, dtype=torch.int32)
    kc, vc = torch.zeros(16, Hkv, D, dtype=BF), torch.zeros(16, Hkv, D, dtype=BF)

    def fresh():
        return torch.randn(T, (Hq + 2 * Hkv) * D, dtype=BF, generator=g)

    def call(qkv):
        """one launch, checked against the same kernel's on copies (num_warps=2: another plan,
        with its own views); returns the views"""
        n, want, kr, vr = qkv.shape[0], qkv.clone(), kc.clone(), vc.clone()
        ropemod.rope_kv_write(want, cs[:n], sn[:n], kr, vr, slots[:n], Hq, Hkv, num_warps=2)
        before = len(hits)
        views = ropemod.rope_kv_write(qkv, cs[:n], sn[:n], kc, vc, slots[:n], Hq, Hkv)
        assert len(hits) == before + 1                                   # launched through the plan
        assert torch.equal(qkv, want) and torch.equal(kc, kr) and torch.equal(vc, vr)
        for view, ref in zip(views, ropemod.split_qkv(qkv, Hq, Hkv)):
            assert (view.shape, view.stride(), view.storage_offset(), view.data_ptr()) == \
                (ref.shape, ref.stride(), ref.storage_offset(), ref.data_ptr())
            assert view.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        return views

    with replay_plans() as hits:
        ropemod.rope_kv_write(fresh(), cs[:T], sn[:T], kc, vc, slots[:T], Hq, Hkv)   # makes the plan
        a = fresh()
        first, second, third = call(a), call(a), call(a)
        assert first[0] is not second[0] and all(x is y for x, y in zip(third, second))   # kept from the 2nd call
        alias = a.detach()                                  # another tensor over the same memory and rows
        assert all(view._base is alias for view in call(alias) + call(alias))
        b = fresh()                                                       # same shape, another buffer
        other = call(b)
        assert other[0] is not third[0] and other[0].data_ptr() == b.data_ptr()
        call(b)
        kept = call(b)
        b.resize_(T - 1, b.shape[1])                                      # same tensor, same pointer, fewer rows
        fewer = call(b)
        assert fewer[0] is not kept[0] and fewer[0].shape[0] == T - 1


@contextlib.contextmanager
def noop_plans():
    """Launch plans that launch nothing (a launcher's hit path runs, no kernel), CPU tensors
    reporting ``is_cuda``: for what a launcher keeps alive, which replay_plans' registry of every
    tensor it saw would hide."""
    def make_plan(kernel, jitfn, args, kwargs, front, device):
        values = tuple(args) + tuple(kwargs[n] for n in jitfn.arg_names[len(args):])
        return _common.Plan(lambda *a: None, (None,) * 9, 0, values[front:])

    saved, stream = [(m, m.make_plan, m._PLANS) for m in MODS], _common._raw_stream
    assert "is_cuda" not in vars(torch.Tensor)
    torch.Tensor.is_cuda, _common._raw_stream = property(lambda self: True), lambda index: 0
    for m in MODS:
        m.make_plan, m._PLANS = make_plan, {}
    try:
        yield
    finally:
        del torch.Tensor.is_cuda
        _common._raw_stream = stream
        for m, mp, plans in saved:
            m.make_plan, m._PLANS = mp, plans


def test_rope_kv_write_keeps_no_buffer_alive_it_was_passed_once():
    """The eager model passes a fresh projection output per layer: rope_kv_write must not keep one
    alive after its call; a buffer passed twice (whose views it keeps) only until a call passes
    another."""
    Hq, Hkv, D, T = 2, 1, 16, 4
    cs, slots = torch.randn(T, D, dtype=BF), torch.arange(T, dtype=torch.int32)
    kc, vc = torch.zeros(16, Hkv, D, dtype=BF), torch.zeros(16, Hkv, D, dtype=BF)

    def call(qkv):
        return ropemod.rope_kv_write(qkv, cs, cs, kc, vc, slots, Hq, Hkv)

    with noop_plans():
        for _ in range(2):
            call(torch.randn(T, (Hq + 2 * Hkv) * D, dtype=BF))      # a plan, then its hit path
        assert len([k for k in ropemod._PLANS if k is not None]) == 1     # (None: the last key taken)
        once = torch.randn(T, (Hq + 2 * Hkv) * D, dtype=BF)
        alive = weakref.ref(once)
        views = call(once)
        del once, views
        gc.collect()
        assert alive() is None
        twice = torch.randn(T, (Hq + 2 * Hkv) * D, dtype=BF)
        alive = weakref.ref(twice)
        first, second = call(twice), call(twice)
        assert all(x is y for x, y in zip(call(twice), second)) and first[0] is not second[0]   # kept
        del twice, first, second
        gc.collect()
        assert alive() is not None                                    # (its views are kept)
        call(torch.randn(T, (Hq + 2 * Hkv) * D, dtype=BF))           # another buffer: let go
        gc.collect()
        assert alive() is None


def _elsewhere(t: torch.Tensor) -> torch.Tensor:
    """t, reporting another GPU's index from get_device() (what the hit paths key a device on)."""
    t = t.detach()
    t.get_device = lambda: 1
    return t


def test_an_input_on_another_device_refused_after_a_plan_exists():
    """The hit paths key each tensor's device by its index: a plan made with every input on one
    device is not taken by a call with one of them elsewhere, which the checks then refuse."""
    kc = torch.zeros(32, 1, 16, dtype=BF)
    slots = torch.arange(4, dtype=torch.int32)
    k, qkv, cs = torch.randn(4, 1, 16, dtype=BF), torch.randn(4, 4 * 16, dtype=BF), torch.randn(4, 16, dtype=BF)
    q, pt, sl = torch.randn(2, 2, 16, dtype=BF), torch.zeros(2, 2, dtype=torch.int32), torch.tensor([3, 4])
    qe, qsl = torch.randn(5, 2, 16, dtype=BF), torch.tensor([0, 2, 5], dtype=torch.int32)
    calls = {
        "kv_write": lambda kc_: kmod.kv_write(k, k, kc_, kc.clone(), slots),
        "rope": lambda kc_: ropemod.rope_kv_write(qkv, cs, cs, kc_, kc.clone(), slots, 2, 1),
        "decode": lambda kc_: dmod.decode_attention(q, kc_, kc, pt, sl, 16, num_splits=1),
        "extend": lambda kc_: emod.extend_attention(qe, kc_, kc, pt, qsl, sl + 3, 16, prefix_splits=1),
    }
    with replay_plans() as hits:
        for name, call in calls.items():
            call(kc)
            n = len(hits)
            call(kc)
            assert len(hits) > n, name                               # the plan is taken
            with pytest.raises(ValueError, match="k_cache is on"):
                call(_elsewhere(kc))


def test_contiguous_caches_share_a_plan_whatever_their_size_one_strides():
    """A contiguous cache is keyed as contiguous, not on its strides: torch calls [S, 1, D] with
    any head stride contiguous. A plan made with an odd head stride and taken by a cache of the
    usual strides (or the other way round) must compute what the checked path computes."""
    g = _gen(9)
    k, slots = torch.randn(3, 1, 16, dtype=BF, generator=g), torch.tensor([5, 0, 17], dtype=torch.int32)
    q, pt, sl = torch.randn(2, 2, 16, dtype=BF, generator=g), torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), \
        torch.tensor([20, 9], dtype=torch.int32)
    data = torch.randn(32 * 16, dtype=BF, generator=g)

    def cache(head_stride):
        c = data.clone().as_strided((32, 1, 16), (16, head_stride, 1))
        assert c.is_contiguous()
        return c

    def run(head_stride):
        kc, vc = cache(head_stride), cache(head_stride)
        kmod.kv_write(k, k, kc, vc, slots)
        return kc, vc, dmod.decode_attention(q, kc, vc, pt, sl, 16, num_splits=1)

    for first, then in ((7, 16), (16, 7)):
        with replay_plans() as hits:
            want = run(then)                                  # checked
        with replay_plans() as hits:
            run(first)                                        # makes the plans
            got = run(then)
            assert len(hits) == 2                             # both took them
        assert all(torch.equal(a, b) for a, b in zip(want, got))
