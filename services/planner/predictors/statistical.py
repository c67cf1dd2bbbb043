"""Predictors that fit a statsmodels model each decision: Holt (damped additive trend) and ARIMA.

Each fits three series, not fifteen (see the package docstring for why): the rate, and the log
median of the prompt and of the output lengths. The rest of each length distribution -- its
shape, log(q_i / median) at every level and log(mean / median) -- is an EWMA (`shape_alpha`), so
the forecast distribution is exp(fitted log median + smoothed shape): positive, and its quantiles
ordered, since an EWMA of ordered rows is ordered.

Falling back: a series shorter than `min_points`, or a fit that raises or gives a non-finite
value, is answered by the EWMA of that series (`fallback_alpha`); a constant series by its value
(statsmodels cannot fit it). A fitted forecast is clipped: the rate to [0, 2 x the window's
highest], the median length to [half the lowest, twice the highest median in the window].
statsmodels' warnings (ConvergenceWarning, ValueWarning...) are silenced inside the fit. Fitted
forecasts are memoised on (model, options, the series' values, horizon): a pure cache, so a
restarted planner predicts the same.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from services.planner.load import IntervalLoad, LoadForecast
from services.planner.predictors.base import (
    MEDIAN,
    assemble,
    check_alpha,
    check_horizon,
    ewma,
    log_ewma,
    observe,
    register_predictor,
)


def _fit_holt(y: np.ndarray, horizon: int, damped: bool) -> float:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    # NOTE: fit(use_brute=False), no grid search for the optimiser's starting values, saves ~40% of
    # the time and matched on mix, but after phase-shift's level shifts it found worse optima
    # (prompt p50 MAPE 164% vs 120% at 1 s). The grid stays.
    model = ExponentialSmoothing(y, trend="add", damped_trend=damped, initialization_method="estimated")
    return float(model.fit().forecast(horizon)[-1])


def _fit_arima(y: np.ndarray, horizon: int, order: tuple[int, int, int], maxiter: int) -> float:
    from statsmodels.tsa.arima.model import ARIMA

    # NOTE(speed): statsmodels' defaults cost 15-20 ms a fit on 50 points, and now and then a
    # second or more: near a unit root, the stationary initialisation (a Lyapunov solve on every
    # likelihood evaluation) crawls. So: an approximate diffuse initial state, the scale
    # concentrated out of the likelihood (one parameter fewer to search), no parameter covariance,
    # no smoother (low_memory; out-of-sample forecasts need only the filter), and at most
    # `maxiter` L-BFGS iterations. One-step mean absolute errors stayed within 4% of the
    # defaults' (either way) on the benchmark's series. A constant term only without
    # differencing (statsmodels refuses "c" with d > 0).
    model = ARIMA(y, order=order, trend="c" if order[1] == 0 else "n", concentrate_scale=True)
    model.initialize_approximate_diffuse()
    res = model.fit(cov_type="none", low_memory=True, method_kwargs={"maxiter": maxiter})
    return float(res.forecast(horizon)[-1])


LOG2 = float(np.log(2.0))


@functools.lru_cache(maxsize=256)
def _forecast(kind: str, option: tuple, values: tuple[float, ...], horizon: int) -> float | None:
    # NOTE(warnings): import statsmodels before silencing. Its first import installs "always"
    # filters for its own warnings; made inside the block below, they would outrank our "ignore"
    # (the first fit's ConvergenceWarning got out) and be undone on exit for everyone else.
    import statsmodels.tsa.arima.model  # noqa: F401
    import statsmodels.tsa.holtwinters  # noqa: F401

    y = np.asarray(values, dtype=float)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            out = _fit_holt(y, horizon, *option) if kind == "holt" else _fit_arima(y, horizon, *option)
    except Exception:  # noqa: BLE001 -- any failed fit (LinAlgError, ValueError...) falls back
        return None
    return out if np.isfinite(out) else None


@dataclass(frozen=True)
class _Fitted:
    """What Holt and ARIMA share: the series, the fallbacks and the length shape."""

    window: int = 50
    min_points: int = 10
    shape_alpha: float = 0.2
    fallback_alpha: float = 0.3
    name: ClassVar[str]
    kind: ClassVar[str]

    def __post_init__(self) -> None:
        check_alpha(self.shape_alpha, "shape_alpha")
        check_alpha(self.fallback_alpha, "fallback_alpha")
        if self.window < 3 or self.min_points < 3:
            raise ValueError(f"window and min_points must be >= 3, got {self.window}, {self.min_points}")

    def _option(self) -> tuple:
        raise NotImplementedError

    def _series(self, y: np.ndarray, horizon: int, lo: float, hi: float) -> float:
        """The forecast of series y, clipped to [lo, hi]: a guard against a wild fit."""
        if len(y) < self.min_points:
            return float(ewma(y, self.fallback_alpha))
        if np.ptp(y) == 0:
            return float(y[-1])
        out = _forecast(self.kind, self._option(), tuple(y.tolist()), horizon)
        return float(ewma(y, self.fallback_alpha)) if out is None else min(max(out, lo), hi)

    def _lengths(self, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        if not len(rows):
            return None
        logs = np.log(np.maximum(rows, 1.0))
        center = logs[:, MEDIAN]
        shape = ewma(logs - center[:, None], self.shape_alpha)
        # The median stays within half the smallest and twice the largest median in the window.
        return np.exp(self._series(center, horizon, center.min() - LOG2, center.max() + LOG2) + shape)

    def predict(self, history: Sequence[IntervalLoad], horizon: int = 1) -> LoadForecast:
        check_horizon(horizon)
        obs = observe(history, self.window)
        # The rate stays within [0, twice the window's highest rate].
        rate = self._series(obs.rate, horizon, 0.0, 2.0 * obs.rate.max()) if len(obs.rate) else 0.0
        # The fallback for a non-finite forecast: the EWMA forecast of the same history.
        fallback = (float(ewma(obs.rate, self.fallback_alpha)) if len(obs.rate) else 0.0,
                    log_ewma(obs.prompt, self.fallback_alpha) if len(obs.prompt) else None,
                    log_ewma(obs.output, self.fallback_alpha) if len(obs.output) else None)
        return assemble(self.name, rate, self._lengths(obs.prompt, horizon), self._lengths(obs.output, horizon),
                        fallback)


@register_predictor("holt-winters")
@dataclass(frozen=True)
class HoltWintersPredictor(_Fitted):
    """Holt's linear method (statsmodels ExponentialSmoothing, additive trend, damped by default,
    parameters and initial state fitted by least squares) over the last `window` points, with no
    seasonal term: intervals are seconds, and the only natural season (a day) is far longer than
    any window a planner fits."""

    window: int = 120
    damped: bool = True
    kind: ClassVar[str] = "holt"

    def _option(self) -> tuple:
        return (self.damped,)


@register_predictor("arima")
@dataclass(frozen=True)
class ArimaPredictor(_Fitted):
    """statsmodels ARIMA(p, d, q), state-space MLE, over the last `window` points (DOPD: 50), a
    constant term when d == 0. Order (0,1,1), the model of a level that wanders under noise (its
    forecast is an exponential smoothing whose weight the fit chooses): walking forward over the
    benchmark's workloads at 1 s it beat (1,0,1) and (1,1,1) on every error and costs half the
    time (one free parameter). (1,0,1) reverts to the window's mean, so after a phase shift it
    kept forecasting the old prompt lengths: prompt p50 MAPE 344% vs 108% on phase-shift."""

    order: tuple[int, int, int] = (0, 1, 1)
    maxiter: int = 25
    kind: ClassVar[str] = "arima"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.order) != 3 or any(int(k) < 0 for k in self.order):
            raise ValueError(f"order must be three integers >= 0, got {self.order}")
        object.__setattr__(self, "order", tuple(int(k) for k in self.order))

    def _option(self) -> tuple:
        return (self.order, self.maxiter)
