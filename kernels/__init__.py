"""Triton kernels shared by every KV-cache strategy (slab, paged, radix).

One kernel set for all strategies, so that a difference in a result is the allocator's:

- ``kv_write``          scatter new K/V into pool slots (slot mapping)
- ``decode_attention``  one query token per request through the page table (split-KV)
- ``extend_attention``  prefill / prefix-cache extend: new tokens over a cached prefix, causal
- ``page_copy``         copy whole pages (copy-on-write)

and the model runner's fused layer pieces (the same for every strategy too):

- ``rope_kv_write``     rotary embedding of q and k fused with the KV write
- ``rms_norm``          RMSNorm, optionally fused with the residual add
- ``silu_mul``          SwiGLU's silu(gate) * up
- ``linear``            projections of decode-sized batches (<= 16 rows)

Layout: ``kv_pool: [num_layers, 2, num_slots, H_kv, D]`` with ``num_slots = num_pages *
page_size``; token ``i`` of a request lives in slot
``page_table[i // page_size] * page_size + i % page_size``.

Import the submodules directly (``from kvbench.kernels.decode_attention import
decode_attention``); this package imports nothing at import time on purpose.
"""
