"""Launch plans (kernels/_common.Plan): the second call of a launcher with the same key skips
Triton's dispatch and the launcher's checks. It must compute exactly what the first (checked,
Triton-dispatched) call computes, follow the per-call sizes (token and request counts), and still
refuse wrong input. GPU only: on the CPU the interpreter path never makes plans."""
from __future__ import annotations

import pytest
import torch

from kvbench.kernels import (decode_attention as dmod, extend_attention as emod, kv_write as kmod,
                             linear as lmod, page_copy as pmod, rms_norm as rmod, rope_kv_write as ropemod,
                             silu_mul as smod)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF = torch.bfloat16


def _pool(slots=256, hkv=2, d=64, gen=None):
    return (torch.randn(slots, hkv, d, device="cuda", dtype=BF, generator=gen),
            torch.randn(slots, hkv, d, device="cuda", dtype=BF, generator=gen))


def test_plans_made_and_reused_with_identical_results():
    g = torch.Generator(device="cuda").manual_seed(0)
    kc, vc = _pool(gen=g)
    for mod in (dmod, emod, kmod, rmod, smod, ropemod, lmod, pmod):
        mod._PLANS.clear()
    outs = []
    for _ in range(3):                                       # call 1 makes the plans, 2 and 3 use them
        q = torch.randn(3, 8, 64, device="cuda", dtype=BF, generator=torch.Generator("cuda").manual_seed(1))
        pt = torch.arange(12, device="cuda", dtype=torch.int32).view(3, 4)
        sl = torch.tensor([5, 40, 64], device="cuda", dtype=torch.int32)
        outs.append(dmod.decode_attention(q, kc, vc, pt, sl, 16, max_seq_len=64))
        outs.append(dmod.decode_attention(q, kc, vc, pt, sl, 16, num_splits=1))
        x = torch.randn(4, 256, device="cuda", dtype=BF, generator=torch.Generator("cuda").manual_seed(2))
        w = torch.randn(256, device="cuda", dtype=BF, generator=torch.Generator("cuda").manual_seed(3))
        outs.append(rmod.rms_norm(x, w, 1e-5))
        outs.append(smod.silu_mul(x))
        outs.append(lmod.linear(x, torch.ones(32, 256, device="cuda", dtype=BF)))
    assert all(len(m._PLANS) for m in (dmod, rmod, smod, lmod))
    n = len(outs) // 3
    for a, b, c in zip(outs[:n], outs[n:2 * n], outs[2 * n:]):
        assert torch.equal(a, b) and torch.equal(a, c)
    ref = dmod.decode_attention_ref(q, kc, vc, pt, sl, 16)
    torch.testing.assert_close(outs[-5].float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("T", [1, 5, 16, 33])
def test_kv_write_plan_follows_the_token_count(T):
    kc, vc = _pool()
    kc2, vc2 = kc.clone(), vc.clone()
    warm = torch.randn(7, 2, 64, device="cuda", dtype=BF)
    kmod.kv_write(warm, warm, kc, vc, torch.arange(7, device="cuda", dtype=torch.int32))  # makes the plan
    kmod.kv_write_ref(warm, warm, kc2, vc2, torch.arange(7, device="cuda", dtype=torch.int32))
    k = torch.randn(T, 2, 64, device="cuda", dtype=BF)
    v = torch.randn(T, 2, 64, device="cuda", dtype=BF)
    slots = torch.randperm(256, device="cuda")[:T].to(torch.int32)
    kmod.kv_write(k, v, kc, vc, slots)
    kmod.kv_write_ref(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_extend_plan_follows_tokens_and_requests():
    kc, vc = _pool(slots=512)
    for lens, new in (([20, 33], [4, 33]), ([70, 9, 16], [70, 1, 3]), ([20, 33], [4, 33])):
        B, T = len(lens), sum(new)
        q = torch.randn(T, 8, 64, device="cuda", dtype=BF)
        pt = torch.arange(B * 8, device="cuda", dtype=torch.int32).view(B, 8)
        qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), device="cuda", dtype=torch.int32)
        sl = torch.tensor(lens, device="cuda", dtype=torch.int32)
        out = emod.extend_attention(q, kc, vc, pt, qsl, sl, 16)
        ref = emod.extend_attention_ref(q, kc, vc, pt, qsl, sl, 16)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert emod._PLANS


def test_wrong_input_still_refused_after_a_plan_exists():
    kc, vc = _pool()
    k = torch.randn(4, 2, 64, device="cuda", dtype=BF)
    slots = torch.arange(4, device="cuda", dtype=torch.int32)
    kmod.kv_write(k, k, kc, vc, slots)
    kmod.kv_write(k, k, kc, vc, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        kmod.kv_write(k, k, kc, vc, slots[:3])              # per-call size mismatch
    with pytest.raises(ValueError, match="v shape"):
        kmod.kv_write(k, k[:3], kc, vc, slots)
    with pytest.raises(ValueError, match="dtype"):
        kmod.kv_write(k, k, kc, vc, slots.float())
    q = torch.randn(2, 8, 64, device="cuda", dtype=BF)
    pt = torch.zeros(2, 4, device="cuda", dtype=torch.int32)
    sl = torch.tensor([3, 4], device="cuda", dtype=torch.int32)
    dmod.decode_attention(q, kc, vc, pt, sl, 16)
    dmod.decode_attention(q, kc, vc, pt, sl, 16)
    with pytest.raises(ValueError, match="seq_lens"):
        dmod.decode_attention(q, kc, vc, pt, sl[:1], 16)
    with pytest.raises(ValueError, match="page_size"):
        dmod.decode_attention(q, kc, vc, pt, sl, 16.0)


def test_rms_norm_residual_and_page_copy_plans_match_the_checked_call():
    """First call checked (no plans), the second through the plan dict, the third through the
    last-key memo: the same output and the same in-place updates, bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(5, 256, device="cuda", dtype=BF, generator=g)
    w = torch.randn(256, device="cuda", dtype=BF, generator=g)
    r0 = torch.randn(5, 256, device="cuda", dtype=BF, generator=g)
    pool0 = torch.randn(2, 2, 64, 2, 64, device="cuda", dtype=BF, generator=g)
    src = torch.tensor([0, 2], device="cuda", dtype=torch.int32)
    dst = torch.tensor([1, 3], device="cuda", dtype=torch.int32)
    rmod._PLANS.clear()
    pmod._PLANS.clear()
    got = []
    for _ in range(3):
        r, pool = r0.clone(), pool0.clone()
        out = rmod.rms_norm(x, w, 1e-5, residual=r)
        pmod.page_copy(pool, src, dst, 16)
        got.append((out, r, pool))
    assert rmod._PLANS.get(None) is not None and pmod._PLANS.get(None) is not None   # (the memo was taken)
    for later in got[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got[0], later))
    want = pool0.clone()
    pmod.page_copy_ref(want, src, dst, 16)
    assert torch.equal(got[0][2], want)
