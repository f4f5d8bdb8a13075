"""Length distributions for prompts, outputs and turns: fixed, uniform, lognormal.

Each is a small frozen dataclass with ``sample(rng, n) -> [n] int64``, configured in yaml by
``_target_`` (e.g. ``_target_: kvbench.traces.lengths.LogNormal``). Samples are clipped to
``[min, max]``; ``min`` defaults to 1 (an empty prompt or output cannot be replayed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvbench.traces.errors import TraceError


class LengthDist(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


def _clip(values: np.ndarray, low: int, high: int | None) -> np.ndarray:
    return np.clip(values, low, high if high is not None else np.iinfo(np.int64).max)


def _check_bounds(name: str, low: int, high: int | None) -> None:
    if low < 1 or (high is not None and high < low):
        raise TraceError(f"{name}: need 1 <= min <= max, got min={low}, max={high}")


@dataclass(frozen=True, slots=True)
class Fixed:
    """Always ``value`` tokens."""

    value: int

    def __post_init__(self) -> None:
        _check_bounds("Fixed", int(self.value), None)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, int(self.value), dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Uniform:
    """Uniform integers in ``[min, max]``, both inclusive."""

    min: int
    max: int

    def __post_init__(self) -> None:
        _check_bounds("Uniform", int(self.min), int(self.max))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(int(self.min), int(self.max) + 1, size=n, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Lognormal lengths with the given ``mean`` (in tokens, before clipping) and ``sigma``
    (std of log-length; 0.5 mild spread, 1.0 heavy tail), rounded, clipped to [min, max]."""

    mean: float
    sigma: float
    min: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        _check_bounds("LogNormal", int(self.min), None if self.max is None else int(self.max))
        if not (self.mean > 0 and self.sigma >= 0):
            raise TraceError(f"LogNormal: need mean > 0, sigma >= 0, got {self.mean}, {self.sigma}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean) - self.sigma**2 / 2  # E[exp(N(mu, s^2))] = exp(mu + s^2/2)
        values = np.rint(rng.lognormal(mu, self.sigma, size=n)).astype(np.int64)
        return _clip(values, int(self.min), None if self.max is None else int(self.max))


def as_dist(spec: LengthDist | int) -> LengthDist:
    """A distribution, or a plain int meaning Fixed(int)."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return Fixed(int(spec))
    if not hasattr(spec, "sample"):
        raise TraceError(f"expected a length distribution (Fixed/Uniform/LogNormal) or an int, got {spec!r}")
    return spec
