"""Arrival processes (pure): Poisson, Gamma with a burstiness factor, and piecewise rates.

Gamma inter-arrival times as `vllm bench serve` draws them: shape = burstiness,
scale = 1 / (rate * burstiness). The mean gap is 1/rate whatever the burstiness; the variance
is 1 / (rate**2 * burstiness), so the squared coefficient of variation is 1/burstiness:
burstiness 1 is a Poisson process (exponential gaps), < 1 is burstier (clusters and lulls),
> 1 is more regular.

Unlike `vllm bench serve`, which draws a fixed number of requests and rescales their times to
n/rate, these processes run for a duration: the count is random (mean rate * duration).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _rng(seed_or_rng: int | np.random.Generator) -> np.random.Generator:
    return seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)


def _check(rate: float, burstiness: float) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a finite number > 0, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")


def intervals(rng: int | np.random.Generator, rate: float, burstiness: float, n: int) -> np.ndarray:
    """n inter-arrival gaps in seconds (Gamma(shape=burstiness, scale=1/(rate*burstiness)))."""
    _check(rate, burstiness)
    if math.isinf(burstiness):
        return np.full(n, 1.0 / rate)
    return _rng(rng).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_times(rate: float, duration: float, rng: int | np.random.Generator, burstiness: float = 1.0,
                  start: float = 0.0) -> list[float]:
    """Arrival times in [start, start + duration): a renewal process whose first arrival comes one
    gap after `start` (as `vllm bench serve` sends its first request after the first delay)."""
    _check(rate, burstiness)
    if duration <= 0:
        return []
    rng = _rng(rng)
    out: list[float] = []
    t = start
    end = start + duration
    while True:
        # Draw in chunks of about the expected count so one call usually suffices.
        gaps = intervals(rng, rate, burstiness, max(16, int(rate * (end - t) * 1.2) + 16))
        for gap in gaps:
            t += float(gap)
            if t >= end:
                return out
            out.append(t)


@dataclass(frozen=True)
class RatePhase:
    """From `start` to `end` seconds, arrivals at `rate` with `burstiness`."""

    start: float
    end: float
    rate: float
    burstiness: float = 1.0


def piecewise_arrival_times(phases: Sequence[RatePhase], rng: int | np.random.Generator) -> list[list[float]]:
    """Arrival times per phase (one list each, in order). The process restarts at each phase
    boundary: the first arrival of a phase comes one of its own gaps after its start."""
    rng = _rng(rng)
    out = []
    for phase in phases:
        if phase.end < phase.start:
            raise ValueError(f"phase ends ({phase.end}) before it starts ({phase.start})")
        out.append(arrival_times(phase.rate, phase.end - phase.start, rng, phase.burstiness, start=phase.start))
    return out


def arrivals_per_second(times: Sequence[float], duration: float) -> list[int]:
    """Arrival count in each whole second [i, i+1) of [0, duration) (ceil(duration) bins)."""
    bins = [0] * max(0, math.ceil(duration))
    for t in times:
        i = int(t)
        if 0 <= i < len(bins):
            bins[i] += 1
    return bins
