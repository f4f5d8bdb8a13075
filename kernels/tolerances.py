"""One per-dtype tolerance table, used by the kernel tests and the benchmark's correctness checks.

An output passes when every element satisfies ``|out - ref| <= atol + rtol * |ref|`` (as
``torch.testing.assert_close``) and nothing is NaN/inf. References are computed in fp32 from
the same low-precision inputs. Attention rounds the softmax probabilities to the K/V dtype
before the P@V product (as FlashAttention does), which is what the bf16/fp16 entries allow for.
KV write and page copy are exact copies: they are checked with ``torch.equal``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4),
    torch.float16: Tolerance(atol=4e-3, rtol=4e-3),
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {list(TOLERANCES)}") from None


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """(ok, message) for ``out`` against ``ref`` under the tolerance of ``dtype`` (default out's)."""
    tol = tolerance(dtype or out.dtype)
    o = out.detach().float().cpu()
    r = ref.detach().float().cpu()
    if o.shape != r.shape:
        return False, f"shape {tuple(o.shape)} != reference {tuple(r.shape)}"
    if o.numel() == 0:
        return True, "empty"
    if not torch.isfinite(o).all():
        bad = (~torch.isfinite(o)).nonzero()[:5].tolist()
        return False, f"non-finite output (unwritten or NaN) at {bad}"
    err = (o - r).abs()
    bound = tol.atol + tol.rtol * r.abs()
    viol = err > bound
    rel = (err.norm() / r.norm().clamp_min(1e-30)).item()
    msg = f"max_abs_err={err.max().item():.3e} rel_norm_err={rel:.3e} tol={tol}"
    if viol.any():
        idx = viol.nonzero()[:5].tolist()
        return False, f"{int(viol.sum())} elements out of tolerance, first at {idx}; {msg}"
    return True, msg


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    ok, msg = compare(out, ref, dtype)
    assert ok, msg
