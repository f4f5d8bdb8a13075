"""Pages outside a window are never read by the kernels: a hybrid pool's table for a sliding or
chunked group (NULL_PAGE before the window) through the decode kernel and its torch reference,
with every slot the request does not read poisoned with NaN (freed, cached, other tables' pages
and the NULL_PAGE entries, which index the last page). The output equals attention over the
window's tokens; without the window bound the same table reads a poisoned slot (NaN)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kernels.decode_attention import decode_attention, decode_attention_ref, key_lo_host  # noqa: E402
from strategy_cases import build  # noqa: E402

D = 16


def kv_of(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic K/V of token ids: [n, 1, D] each."""
    g = torch.Generator().manual_seed(0)
    table_k, table_v = torch.randn(256, 1, D, generator=g), torch.randn(256, 1, D, generator=g)
    return table_k[ids % 256], table_v[ids % 256]


@pytest.mark.parametrize("design", ["hybrid_unified", "hybrid_separate"])
@pytest.mark.parametrize("model, window, chunk", [("sliding", 7, 0), ("chunked", 0, 6)])
def test_the_decode_kernel_reads_only_the_windows_pages(design, model, window, chunk):
    split = {"split": [0.5, 0.5]} if design == "hybrid_separate" else {}
    s = build(design, 192, 96, model=model, page_size=2, **split)
    tokens = np.arange(100, 140, dtype=np.int32)
    assert s.admit(0, tokens, 39, 14, 14).admitted
    assert s.grow(0, 1)  # 14 computed: pages before the window leave table 0
    spec = s.tables[0]
    assert s.groups[spec.group].kind == model  # (HYBRID_MODELS: table 0 is the windowed group)
    table = s.table(0, 0)
    n = 15  # the decode of position 14
    lo = key_lo_host(n - 1, window, chunk)
    assert (table[: lo // spec.page_size] == -1).all() and (table[: lo // spec.page_size]).size > 0
    slots = spec.space_pages * spec.page_size
    k_cache = torch.full((slots, 1, D), float("nan"))
    v_cache = torch.full((slots, 1, D), float("nan"))
    pos = torch.arange(lo, n)
    pages = torch.as_tensor(table[(pos // spec.page_size).numpy()], dtype=torch.long)
    held = pages * spec.page_size + pos % spec.page_size
    k_win, v_win = kv_of(torch.as_tensor(tokens[lo:n], dtype=torch.long))
    k_cache[held], v_cache[held] = k_win, v_win  # only the window's slots hold K/V
    q = torch.randn(1, 2, D, generator=torch.Generator().manual_seed(1))
    page_table = torch.as_tensor(table, dtype=torch.int32)[None]
    seq_lens = torch.tensor([n], dtype=torch.int32)
    scores = torch.einsum("hd,nd->hn", q[0], k_win[:, 0]) / D ** 0.5
    expect = torch.einsum("hn,nd->hd", torch.softmax(scores, -1), v_win[:, 0])
    for attend in (decode_attention_ref, decode_attention):
        out = attend(q, k_cache, v_cache, page_table, seq_lens, spec.page_size, window=window, chunk=chunk)
        assert not out.isnan().any(), attend.__name__
        torch.testing.assert_close(out[0], expect, rtol=1e-4, atol=1e-4)
    unbounded = decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, spec.page_size)
    assert unbounded.isnan().all()  # the control: the table's NULL_PAGE entries would be read
