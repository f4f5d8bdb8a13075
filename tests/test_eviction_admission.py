"""Cache admission options (paged and radix): not caching generated tokens, not caching short
requests; both change what a later request hits, and a refused option value fails at build."""
from __future__ import annotations

import numpy as np
import pytest

from kvbench.strategies.paged import PagedStrategy
from kvbench.strategies.radix import RadixStrategy

T = np.arange(100, 117, dtype=np.int32)  # 17 ids: a 9-id prompt and 8 outputs (16 with K/V)


def _later_hit(cls, page_size, **opts) -> int:
    """Request 0 computes 9 prompt + 7 output positions and leaves; request 1's prompt is
    those 16 ids: how many come from cache."""
    s = cls(64, 64, page_size=page_size, **opts)
    assert s.admit(0, T, 16, 9, 9).admitted
    for _ in range(7):
        assert s.grow(0, 1)
    s.release(0)
    s.check_invariants()
    adm = s.admit(1, T, 16, 16, 16)
    s.check_invariants()
    return adm.cached_tokens


@pytest.mark.parametrize("cls, ps, everything, prompt_only", [
    (PagedStrategy, 4, 12, 8),  # pages 0-3 hashed (the hit stops at 3: one id left to compute); prompt: 0-1
    (RadixStrategy, 1, 15, 9),
    (RadixStrategy, 4, 12, 8),
])
def test_what_a_later_request_hits(cls, ps, everything, prompt_only):
    assert _later_hit(cls, ps) == everything
    assert _later_hit(cls, ps, cache_outputs=False) == prompt_only
    assert _later_hit(cls, ps, min_cache_len=10) == 0  # a 9-id prompt is too short to cache
    assert _later_hit(cls, ps, min_cache_len=9) == everything
    assert _later_hit(cls, ps, cache_outputs=False, min_cache_len=9) == prompt_only
    assert _later_hit(cls, ps, prefix_caching=False) == 0  # (radix: SGLang's --disable-radix-cache)


@pytest.mark.parametrize("cls", [PagedStrategy, RadixStrategy])
@pytest.mark.parametrize("opts", [dict(min_cache_len=100), dict(prefix_caching=False)])
def test_uncached_pages_are_free_after_release(cls, opts):
    s = cls(64, 64, page_size=4, **opts)
    assert s.admit(0, T, 16, 9, 9).admitted and s.grow(0, 7)
    s.release(0)
    st = s.slot_states(None)
    assert st.cached == 0 and st.free == 64
    assert not s.caches_prefixes if "prefix_caching" in opts else s.caches_prefixes
    assert cls(64, 64, page_size=4).label + "-nocache" == cls(64, 64, page_size=4, prefix_caching=False).label
    with pytest.raises(ValueError, match="host_tier_tokens > 0 needs prefix_caching: true"):
        cls(64, 64, page_size=4, prefix_caching=False, host_tier_tokens=16)
    assert cls(64, 64, page_size=4).label + "-noout-min5" == cls(64, 64, page_size=4, cache_outputs=False,
                                                                min_cache_len=5).label
    with pytest.raises(ValueError, match="min_cache_len must be >= 0"):
        cls(64, 64, min_cache_len=-1)
