"""The predictors' registry and the plumbing they share (pure: numpy only).

History -> series: `observe(history, window)` turns the tail of a history into
    rate     one arrival rate per interval (IntervalLoad.rate; 0 for an interval with no arrivals)
    prompt   one row per interval *with* prompt lengths: its 6 quantiles (QUANTILE_LEVELS), then
    output   its mean (as LengthDist.from_samples gives them); same for output lengths

NOTE(lengths): an interval with no arrivals carries no length information, so it is *skipped* in
the length series (not carried forward). Carrying forward would put flat runs into the series that
the statistical models would read as stability; skipping keeps every row a real observation. The
price: the length series' step is "one observed interval", not one interval of time, so a horizon
of h is read as h observations ahead there. Lengths change by regime more than by clock, so this
is the better error to make.

Forecast -> LoadForecast: `assemble` is the one place that makes an answer sane: rate >= 0 and
finite, lengths >= 1, quantiles non-decreasing (cumulative max), mean >= 1; a non-finite value
falls back to the given fallback row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from common.load import QUANTILE_LEVELS, IntervalLoad, LengthDist, LoadForecast, Predictor

N_LEVELS = len(QUANTILE_LEVELS)
MEDIAN = QUANTILE_LEVELS.index(0.5)  # column of the median in a length row
ROW = N_LEVELS + 1  # quantiles, then the mean

# The answer for a history with no arrivals at all: nothing offered, and lengths of one token (the
# smallest legal length) so a planner computes the minimal split rather than dividing by zero.
EMPTY_LENGTH = 1.0


# -- registry -----------------------------------------------------------------------------------
_REGISTRY: dict[str, type] = {}


def register_predictor(name: str) -> Callable[[type], type]:
    """Class decorator: make `cls` available as `make_predictor(name, **options)`; sets cls.name.
    Registering a name again replaces the earlier class (tests register fakes this way)."""
    def add(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def predictor_names() -> list[str]:
    return sorted(_REGISTRY)


def make_predictor(name: str, **options) -> Predictor:
    """A new predictor of kind `name`, configured by `options` (its dataclass fields)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown predictor {name!r}; known: {', '.join(predictor_names())}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:  # an option the predictor does not have
        raise ValueError(f"predictor {name!r}: {e}") from None


# -- history -> series --------------------------------------------------------------------------
@dataclass(frozen=True)
class Observed:
    rate: np.ndarray  # (n,) oldest first
    prompt: np.ndarray  # (k, ROW), rows of intervals with prompt lengths, oldest first
    output: np.ndarray  # (m, ROW)


def _row(lengths: Sequence[int]) -> list[float]:
    dist = LengthDist.from_samples(lengths)
    return [*dist.quantiles, dist.mean]


def observe(history: Sequence[IntervalLoad], window: int) -> Observed:
    """The last `window` rates and the last `window` length rows (walking back from the end, so
    a long history costs no more than a short one)."""
    rates: list[float] = []
    prompt: list[list[float]] = []
    output: list[list[float]] = []
    for load in reversed(history):
        if len(rates) >= window and len(prompt) >= window and len(output) >= window:
            break
        if len(rates) < window:
            rates.append(load.rate)
        if load.prompt_lens and len(prompt) < window:
            prompt.append(_row(load.prompt_lens))
        if load.output_lens and len(output) < window:
            output.append(_row(load.output_lens))
    return Observed(np.array(rates[::-1], dtype=float),
                    np.array(prompt[::-1], dtype=float).reshape(-1, ROW),
                    np.array(output[::-1], dtype=float).reshape(-1, ROW))


def ewma(x: np.ndarray, alpha: float) -> np.ndarray:
    """The last value of s_0 = x_0, s_t = alpha x_t + (1 - alpha) s_(t-1), along axis 0. A convex
    combination of the rows, so non-decreasing rows stay non-decreasing."""
    n = len(x)
    w = alpha * (1.0 - alpha) ** np.arange(n - 1, -1, -1, dtype=float)
    w[0] = (1.0 - alpha) ** (n - 1)
    return w @ x


def log_ewma(rows: np.ndarray, alpha: float) -> np.ndarray:
    """The EWMA of length rows in log space (a weighted geometric mean); lengths below 1 read as 1."""
    return np.exp(ewma(np.log(np.maximum(rows, 1.0)), alpha))


# -- series -> LoadForecast ---------------------------------------------------------------------
def _dist(row: np.ndarray | None, fallback: np.ndarray | None) -> LengthDist:
    if row is None or not np.all(np.isfinite(row)):
        row = fallback
    if row is None or not np.all(np.isfinite(row)):
        return LengthDist.constant(EMPTY_LENGTH)
    qs = np.maximum.accumulate(np.maximum(row[:N_LEVELS], 1.0))
    return LengthDist(tuple(float(q) for q in qs), float(max(row[N_LEVELS], 1.0)))


def assemble(name: str, rate: float, prompt: np.ndarray | None, output: np.ndarray | None,
             fallback: tuple[float, np.ndarray | None, np.ndarray | None]) -> LoadForecast:
    """A sane LoadForecast from forecast values; `fallback` (rate, prompt row, output row) stands
    in for any non-finite part. A row is the 6 quantiles then the mean; None means no data."""
    if not np.isfinite(rate):
        rate = fallback[0]
    return LoadForecast(rate=float(max(rate, 0.0)) if np.isfinite(rate) else 0.0,
                        prompt=_dist(prompt, fallback[1]), output=_dist(output, fallback[2]),
                        predictor=name)


def check_horizon(horizon: int) -> None:
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")


def check_alpha(alpha: float, what: str = "alpha") -> None:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {alpha}")
