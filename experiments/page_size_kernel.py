#!/usr/bin/env python3
"""Decode-attention kernel time against page size, on one GPU (the `page_size` experiment's
other axis: the sim tells what a page size wastes, this tells what it costs the kernel).

    python experiments/page_size_kernel.py --out results/page_size     # needs CUDA + triton

One shape (Llama-3.1-8B heads: H_q=32, H_kv=8, D=128, bf16; B requests of L tokens each), a
pool of exactly B*L slots whose pages are shuffled (a fragmented pool, as paging leaves it), and
the slab layout (one contiguous extent per request, the kernel's contiguous path) as the
baseline. Times are medians of triton.testing.do_bench. Writes kernel_page_size.csv with the
columns kvbench-report --kernel-times reads (kernel, impl, page_size, median_ms, device).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE_SIZES = [1, 8, 16, 32, 64, 128, 256]


def decode_module():
    """kvbench.kernels.decode_attention, or kernels.decode_attention from a bare checkout."""
    try:
        return importlib.import_module("kvbench.kernels.decode_attention")
    except ImportError:
        sys.path.insert(0, str(REPO))
        return importlib.import_module("kernels.decode_attention")


def main(argv: list[str] | None = None) -> None:
    import torch
    import triton

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/page_size"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=4096)
    a = p.parse_args(argv)
    dm = decode_module()
    dev = torch.device("cuda")
    B, L, Hq, Hkv, D = a.batch, a.seq_len, 32, 8, 128
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(B * L, Hkv, D, device=dev, dtype=torch.bfloat16)  # [slots, H_kv, D]
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16)  # [B, H_q, D]
    seq_lens = torch.full((B,), L, device=dev, dtype=torch.int32)  # [B]
    device = torch.cuda.get_device_name(dev)
    rows = []
    layouts = [(ps, False) for ps in PAGE_SIZES] + [(16, True)]
    for ps, contiguous in layouts:
        pages = L // ps
        if contiguous:  # slab: request b owns pages [b*P, (b+1)*P)
            table = (torch.arange(B, dtype=torch.int32)[:, None] * pages + torch.arange(pages, dtype=torch.int32)[None])
        else:
            table = torch.randperm(B * pages, generator=gen).to(torch.int32).view(B, pages)  # [B, P]
        table = table.to(dev).contiguous()
        fn = lambda: dm.decode_attention(q, k_cache, v_cache, table, seq_lens, ps, contiguous=contiguous,  # noqa: E731
                                         max_seq_len=L)
        out = fn()
        ref = dm.decode_attention_ref(q[:2], k_cache, v_cache, table[:2], seq_lens[:2], ps, contiguous=contiguous)
        err = (out[:2].float() - ref.float()).abs().max().item()
        ms = triton.testing.do_bench(fn, warmup=50, rep=300)
        rows.append(dict(device=device, kernel="decode", impl="triton-slab" if contiguous else "triton",
                         shape=f"B={B} L={L} Hq={Hq} Hkv={Hkv} D={D} bf16",
                         page_size=ps if not contiguous else "contiguous", median_ms=f"{ms:.5f}",
                         max_abs_err=f"{err:.2e}"))
        print(f"page {rows[-1]['page_size']:>10}: {ms * 1e3:8.1f} us  (max |err| vs reference {err:.1e})")
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "kernel_page_size.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {a.out / 'kernel_page_size.csv'} ({device})")


if __name__ == "__main__":
    main()
