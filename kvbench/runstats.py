"""Statistics of values given as runs (value, count), equal to bit to numpy's on the expanded
array `np.repeat(values, counts)`, which is never built: a run's ITL gaps (one gap per output
token: 1.3*10^9 for 10^7 requests, 10 GB) are kept as ~one run per step.

- `runs_sum`: numpy's float64 `add.reduce` of a contiguous array is one pairwise summation
  over all n elements (numpy/_core/src/umath/loops_utils.h.src): n > 128 splits at n/2 rounded
  down to a multiple of 8, blocks of at most 128 are summed with 8 accumulators. The split tree
  depends only on n, so a subtree of at most `leaf` elements is expanded and summed by numpy
  itself, the rest recursed here in the same order. (Checked against numpy 2.4 on arrays of up
  to 3*10^6 random floats of mixed magnitudes; tests/test_runstats.py keeps checking it.)
- `runs_percentiles`: numpy's default ('linear') percentile: the order statistics at
  floor((n-1)q) and the next, found in the runs sorted by value, interpolated by numpy's `_lerp`
  arithmetic.
Pure functions; tests/test_runstats.py checks them against numpy on expanded arrays.
"""
from __future__ import annotations

import numpy as np

_BLOCK = 128  # numpy's PW_BLOCKSIZE


def expand(values: np.ndarray, counts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Elements [lo, hi) of np.repeat(values, counts); `ends` = np.cumsum(counts)."""
    a = int(np.searchsorted(ends, lo, side="right"))  # the run holding element lo
    b = int(np.searchsorted(ends, hi - 1, side="right")) + 1 if hi > lo else a
    c = counts[a:b].copy()
    if b > a:
        c[0] = min(int(ends[a]), hi) - lo
        if b - a > 1:
            c[-1] = hi - (int(ends[b - 2]))
    return np.repeat(values[a:b], c)


def runs_sum(values: np.ndarray, counts: np.ndarray, leaf: int = 1 << 20) -> float:
    """np.repeat(values, counts).sum() [float64], exactly, in O(leaf) memory beyond the runs."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts)
    n = int(ends[-1]) if len(ends) else 0
    return float(_pairwise(values, counts, ends, 0, n, max(leaf, _BLOCK)))


def _pairwise(values, counts, ends, lo: int, n: int, leaf: int) -> np.float64:
    """numpy's pairwise sum of elements [lo, lo + n); leaf >= 128."""
    if n <= leaf:
        return np.add.reduce(expand(values, counts, ends, lo, lo + n))
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise(values, counts, ends, lo, n2, leaf) + _pairwise(values, counts, ends, lo + n2, n - n2, leaf)


def runs_mean(values: np.ndarray, counts: np.ndarray, leaf: int = 1 << 20) -> float:
    """np.repeat(values, counts).mean(), exactly (numpy's: the sum, divided by n)."""
    n = int(np.sum(counts))
    return float(np.float64(runs_sum(values, counts, leaf)) / n)


def runs_percentiles(values: np.ndarray, counts: np.ndarray, q) -> np.ndarray:
    """np.percentile(np.repeat(values, counts), q) (method 'linear'), exactly. No NaN values."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(values, kind="stable")  # [R] (a run of count 0 adds nothing to `ends`: never picked)
    ends = counts[order]
    np.cumsum(ends, out=ends)  # [R] elements up to and including each sorted run
    n = int(ends[-1])
    quantiles = np.true_divide(np.asarray(q), 100)
    virtual = (n - 1) * quantiles
    previous = np.floor(virtual)
    nxt = previous + 1
    above = virtual >= n - 1
    previous[above], nxt[above] = -1, -1
    previous, nxt = previous.astype(np.intp), nxt.astype(np.intp)

    def at(k: np.ndarray) -> np.ndarray:  # the k-th smallest (k = -1: the largest)
        k = np.where(k < 0, n + k, k)
        return values[order[np.searchsorted(ends, k, side="right")]]

    a, b = at(previous), at(nxt)
    gamma = np.asanyarray(virtual - previous, dtype=virtual.dtype)
    diff_b_a = b - a
    out = np.add(a, diff_b_a * gamma)
    np.subtract(b, diff_b_a * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe", dtype=out.dtype.type)
    return out
