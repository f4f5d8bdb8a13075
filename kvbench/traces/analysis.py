"""Prefix reuse of a trace, with an unbounded cache, at a block granularity.

Replaying requests in arrival order, a prompt's leading blocks that some earlier prompt already
had (the same ids, at the same position after the same prefix) are hits. Blocks are chained:

    key(block i) = node id of (key(block i-1), ids of block i)     # a trie over blocks

stored in a dict keyed by the block's bytes, so a hit is an exact token match, never a hash
collision. The last block of a prompt may be partial; it is a block of its own (its key is its
shorter id run), so it hits only an earlier prompt that had the very same partial run there.

This is reuse *among prompts*, a property of the trace. It is not a bound on what a server
serves from cache: a server also keeps the K/V of outputs (a multi-turn chat's next prompt
repeats them) and always computes a prompt's last token. The bound is
`kvbench.traces.belady.unbounded_hits`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from kvbench.request import Request


class PrefixReuse(NamedTuple):
    hit_tokens: int  # prompt tokens inside hit blocks
    prompt_tokens: int
    hit_blocks: int  # block references that hit
    blocks: int  # block references, ceil(prompt_len / block_size) per request
    requests_with_hit: int  # requests whose first block hits
    requests: int

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def block_hit_rate(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0


def prefix_reuse(requests: Iterable[Request], block_size: int = 16) -> PrefixReuse:
    """Count prefix hits of ``requests`` (taken in arrival order) with an unbounded cache."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    trie: dict[tuple[int, bytes], int] = {}  # (parent node, block bytes) -> node; root is 0
    hit_tokens = prompt_tokens = hit_blocks = blocks = with_hit = count = 0
    for req in sorted(requests, key=lambda r: (r.arrival_s, r.id)):
        prompt = req.prompt  # [prompt_len] int32
        node, hitting = 0, True
        for start in range(0, len(prompt), block_size):
            chunk = prompt[start:start + block_size]
            key = (node, chunk.tobytes())
            child = trie.get(key)
            if child is None:
                hitting = False
                child = trie[key] = len(trie) + 1
            elif hitting:
                hit_blocks += 1
                hit_tokens += len(chunk)
                if start == 0:
                    with_hit += 1
            node = child
            blocks += 1
        prompt_tokens += len(prompt)
        count += 1
    return PrefixReuse(hit_tokens, prompt_tokens, hit_blocks, blocks, with_hit, count)


def prefix_hit_rate(requests: Iterable[Request], block_size: int = 16, by: str = "tokens") -> float:
    """Fraction of prompt tokens (by="tokens") or block references (by="blocks") that fall in
    an already-seen prefix, unbounded cache, blocks of ``block_size`` tokens."""
    reuse = prefix_reuse(requests, block_size)
    if by == "tokens":
        return reuse.token_hit_rate
    if by == "blocks":
        return reuse.block_hit_rate
    raise ValueError(f"by must be 'tokens' or 'blocks', got {by!r}")
