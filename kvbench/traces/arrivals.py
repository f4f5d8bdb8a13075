"""Arrival times: Poisson / gamma (bursty) processes, and rescaling a trace's timestamps.

Times are float64 seconds, relative to the first request (the first arrives at 0.0).
"""
from __future__ import annotations

import math

import numpy as np

from kvbench.traces.common import MAX_ARRIVAL_S
from kvbench.traces.errors import TraceError


def parse_rate(rate: float | str | None) -> float | None:
    """None (keep timestamps), a positive number of req/s, or inf (yaml ``.inf`` or ``inf``)."""
    if rate is None:
        return None
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise TraceError(f"rate must be null, a positive number (req/s) or inf, got {rate!r}") from None
    if not value > 0:
        raise TraceError(f"rate must be null, a positive number (req/s) or inf, got {rate!r}")
    return value


def arrival_times(rng: np.random.Generator, n: int, rate: float | str, burstiness: float = 1.0) -> np.ndarray:
    """[n] arrival times of a renewal process with mean rate ``rate`` req/s, first at 0.0.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)) — vLLM's ``--burstiness``:
    1.0 is Poisson (exponential gaps), < 1 is burstier (gap CV = 1/sqrt(burstiness)), > 1 is
    more regular. rate=inf puts every arrival at 0.0.
    """
    value = parse_rate(rate)
    if value is None:
        raise TraceError("a generator needs a rate (req/s, or inf), got null")
    if not burstiness > 0:
        raise TraceError(f"burstiness must be > 0 (1.0 = Poisson), got {burstiness!r}")
    if math.isinf(value) or n == 0:
        return np.zeros(n)
    gaps = rng.gamma(burstiness, 1.0 / (value * burstiness), size=n - 1)  # [n-1] seconds
    return _in_range(np.concatenate([[0.0], np.cumsum(gaps)]), rate)


def retime(times: np.ndarray, rate: float | str | None) -> np.ndarray:
    """A file trace's timestamps (seconds, any origin) made relative to the first, then scaled.

    rate=None keeps the gaps; a number scales them so the mean rate (N-1)/span — i.e. one over
    the mean gap — is ``rate`` req/s; inf puts all at 0.0. A span of 0 stays all-zero.
    """
    times = np.asarray(times, dtype=np.float64)
    if len(times) == 0:
        return times
    rel = times - times.min()  # [N] seconds, first = 0
    value = parse_rate(rate)
    if value is None:
        return rel
    if math.isinf(value):
        return np.zeros_like(rel)
    span = rel.max()
    if span == 0:
        return rel
    return _in_range(rel * ((len(rel) - 1) / span / value), rate)


def _in_range(times: np.ndarray, rate: object) -> np.ndarray:
    """times, unless the last is 2**32 s or later (float64 seconds would no longer resolve 1 us)."""
    if len(times) and not times.max() < MAX_ARRIVAL_S:
        raise TraceError(f"rate={rate!r} spreads the arrivals over {times.max():.3g} s; they must lie "
                         f"within 2**32 s (136 years): raise the rate")
    return times
