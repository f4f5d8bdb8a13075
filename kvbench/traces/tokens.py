"""Token ids for traces: seeded random ids, and ids derived from (seed, block hash id).

All ids are int32 in [0, vocab_size). Every function here is deterministic in its arguments.
"""
from __future__ import annotations

import numpy as np

from kvbench.traces.errors import TraceError

DEFAULT_VOCAB = 32000

# Streams of one seed (np.random.default_rng([seed, stream])): independent of each other, so
# e.g. the prompt ids of the first N requests do not depend on how many outputs are drawn.
PROMPT_STREAM, OUTPUT_STREAM, OTHER_STREAM = 0, 1, 2
# Requests left unbuilt (longer than max_model_len) draw from a stream of their own, keyed by
# their row, so building one later does not depend on anything else.
LATE_STREAM = 3


def check_vocab(vocab_size: int) -> int:
    vocab_size = int(vocab_size)
    if not 2 <= vocab_size <= 2**31:
        raise TraceError(f"vocab_size must be in [2, 2**31], got {vocab_size}")
    return vocab_size


def stream(seed: int, which: int) -> np.random.Generator:
    """The seeded generator of one stream of a trace."""
    return np.random.default_rng([int(seed), which])


def random_pieces(rng: np.random.Generator, lengths: np.ndarray, vocab_size: int) -> list[np.ndarray]:
    """One random int32 id array per length, drawn in one call and split (views, no copies).

    lengths: [N] ints >= 0  ->  N arrays of shape [lengths[i]].
    The i-th piece depends only on the rng state and lengths[:i+1] (a prefix property: limit
    does not change the ids of the requests it keeps).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = rng.integers(0, vocab_size, size=int(lengths.sum()), dtype=np.int32)  # [sum(lengths)]
    return np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else []


class RandomRows:
    """The ids `random_pieces(rng, lengths, vocab_size)` would give, kept as the generator's state
    every `block` rows instead of the ids: row i's piece is drawn again on demand (the same
    draws: a generator drawing n then m ids gives the ids one draw of n + m gives), from a
    small cache of the blocks drawn last. Memory: O(rows / block) states, not sum(lengths) ids.

    Reading rows in order (a replay reads requests in arrival order) draws each block once.
    Mutates only its cache.
    """

    def __init__(self, rng: np.random.Generator, lengths: np.ndarray, vocab_size: int,
                 block: int = 512, cache: int = 8) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [N]
        self.ends = np.cumsum(self.lengths)  # [N]
        self.vocab_size, self.block, self.cache_size = vocab_size, block, cache
        self.states = []  # [ceil(N / block)] the generator's state at each block's first row
        self._cache: dict[int, np.ndarray] = {}
        n = len(self.lengths)
        for b in range(0, n, block):
            self.states.append(rng.bit_generator.state)
            rng.integers(0, vocab_size, size=int(self._span(b // block)), dtype=np.int32)  # advance

    def _start(self, b: int) -> int:
        i = b * self.block
        return int(self.ends[i - 1]) if i else 0

    def _span(self, b: int) -> int:
        last = min((b + 1) * self.block, len(self.lengths)) - 1
        return int(self.ends[last]) - self._start(b)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Row i's ids, [lengths[i]] int32 (a view of its block's ids)."""
        b, r = divmod(i, self.block)
        got = self._cache.get(b)
        if got is None:
            rng = np.random.default_rng()
            rng.bit_generator.state = self.states[b]
            ids = rng.integers(0, self.vocab_size, size=self._span(b), dtype=np.int32)
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest
            # with the block's row ends within it, as ints: [0, end of its first row, ...] (a row is
            # then two list reads, not numpy scalars)
            lo = b * self.block
            ends = (self.ends[lo:lo + self.block] - self._start(b)).tolist()
            ends.insert(0, 0)
            got = self._cache[b] = (ids, ends)
        ids, ends = got
        return ids[ends[r]:ends[r + 1]]


def late_ids(seed: int, row: int, vocab_size: int, prompt_len: int, output_len: int,
             prompt: np.ndarray | None = None, output: np.ndarray | None = None) -> np.ndarray:
    """[prompt_len + output_len] int32 ids of an unbuilt request (:class:`kvbench.request.Request`):
    a side given is used as is, a side not given is drawn from the request's own stream
    (seed, LATE_STREAM, row), so it is a pure function of its arguments."""
    rng = np.random.default_rng([int(seed), LATE_STREAM, int(row)])
    if prompt is None:
        prompt = rng.integers(0, vocab_size, size=prompt_len, dtype=np.int32)
    if output is None:
        output = rng.integers(0, vocab_size, size=output_len, dtype=np.int32)
    return np.concatenate([prompt, output]).astype(np.int32, copy=False)


# splitmix64 (Steele et al.): a cheap, well-mixed 64-bit bijection; vectorized over uint64.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN  # uint64 arithmetic wraps modulo 2**64 on arrays
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hashed_blocks(seed: int, keys: np.ndarray, block_size: int, vocab_size: int) -> np.ndarray:
    """The ids of one block per key: a pure function of (seed, key, position in block).

    keys: [U] non-negative ints  ->  [U, block_size] int32. Equal keys give equal rows, so equal
    Mooncake hash_ids become equal blocks of ids; the row of a key does not depend on which
    other keys are asked for.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    seed_key = _mix(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))  # [1]
    offsets = np.arange(block_size, dtype=np.uint64) * _GOLDEN  # [block_size]
    out = np.empty((len(keys), block_size), dtype=np.int32)
    rows_per_chunk = max(1, (1 << 21) // block_size)  # ~2M uint64 temporaries at a time
    for start in range(0, len(keys), rows_per_chunk):
        row_keys = _mix(keys[start:start + rows_per_chunk] ^ seed_key)  # [r]
        vals = _mix(row_keys[:, None] + offsets[None, :])  # [r, block_size]
        out[start:start + rows_per_chunk] = vals % np.uint64(vocab_size)
    return out
