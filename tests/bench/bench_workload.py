"""Realistic allocator states for the speed benchmarks (tests/bench/).

Sizes: the default pool (131072 token slots = 16 GiB of Llama-3.1-8B K/V), max_model_len 16384,
prompts of 512 tokens (the synthetic trace's mean), decodes of 256 tokens, and a background of
running requests so that free lists, extents, hash tables and trees are not empty.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
CAPACITY, MAX_LEN, VOCAB = 131072, 16384, 32000
PROMPT, OUTPUT = 512, 256


def build_strategy(name: str, capacity: int = CAPACITY, **opts):
    """configs/strategy/<name>.yaml, instantiated on a pool of `capacity` slots."""
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "strategy" / f"{name}.yaml"), opts)
    return instantiate(cfg, capacity_tokens=capacity, max_model_len=MAX_LEN)


class Pool:
    """A strategy with a background of running requests, and fresh requests on demand.

    Every request gets fresh random ids (no accidental prefix hits) unless a prefix is given.
    """

    def __init__(self, strategy, background: int = 32, seed: int = 0) -> None:
        self.s = strategy
        self.rng = np.random.default_rng(seed)
        self._rid = itertools.count()
        self.args: dict[int, tuple] = {}  # rid → its admit arguments (rid, tokens, kv_len, num_prompt, max_new)
        self.background = []
        half = strategy.capacity // 2
        while len(self.background) < background and self.used() + PROMPT + OUTPUT <= half:
            rid = self.start(PROMPT, OUTPUT)
            self.decode(rid, 64)
            self.background.append(rid)

    def used(self) -> int:
        st = self.s.slot_states(None)
        return st.total - st.free - st.cached

    def tokens(self, n: int, prefix: np.ndarray | None = None) -> np.ndarray:
        fresh = self.rng.integers(0, VOCAB, n - (0 if prefix is None else len(prefix)), dtype=np.int32)
        return fresh if prefix is None else np.concatenate([prefix, fresh]).astype(np.int32)

    def admit(self, prompt: int, output: int, prefix: np.ndarray | None = None) -> tuple[int, tuple]:
        """A new request id and the arguments of its `admit` (not yet called)."""
        rid = next(self._rid)
        toks = self.tokens(prompt + output, prefix)
        self.args[rid] = (rid, toks, prompt + output - 1, prompt, 8192)
        return rid, self.args[rid]

    def start(self, prompt: int, output: int, prefix: np.ndarray | None = None) -> int:
        """Admit a request and compute its whole prompt (the first grow stores it, where cached)."""
        rid, args = self.admit(prompt, output, prefix)
        adm = self.s.admit(*args)
        assert adm.admitted, f"{self.s.label}: background request {rid} did not fit"
        assert self.s.grow(rid, 1)
        return rid

    def decode(self, rid: int, n: int) -> None:
        for _ in range(n):
            assert self.s.grow(rid, 1)
