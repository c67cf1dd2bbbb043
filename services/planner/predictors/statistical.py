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
statsmodels' warnings (ConvergenceWarning, ValueWarning...) are silenced inside the fit. A fit at
every forecast (Holt; ARIMA with refit_every=1) is memoised on (model, options, the series'
values, horizon): a pure cache, so a restarted planner predicts the same. ARIMA by default holds
its parameters between refits (ArimaPredictor): a restarted planner refits at its first forecast,
so it answers as the old one did right after a refit, not always as the old one would have
between two refits.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from common.load import IntervalLoad, LoadForecast
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


def _arima_model(y: np.ndarray, order: tuple[int, int, int]):
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
    return model


def _fit_arima_params(y: np.ndarray, order: tuple[int, int, int], maxiter: int) -> np.ndarray:
    """The MLE parameters alone: `return_params` skips the results object and its extra filter."""
    return _arima_model(y, order).fit(return_params=True, method_kwargs={"maxiter": maxiter})


def _arima_forecast(y: np.ndarray, horizon: int, order: tuple[int, int, int], params: np.ndarray) -> np.ndarray:
    """Under fixed `params`, by one Kalman filter pass: [the forecast of y `horizon` steps ahead,
    the last point's one-step forecast error in standard deviations (how surprising it was)]."""
    res = _arima_model(y, order).filter(params, cov_type="none")
    return np.array([res.forecast(horizon)[-1], res.standardized_forecasts_error[0, -1]])


def _fit_arima(y: np.ndarray, horizon: int, order: tuple[int, int, int], maxiter: int) -> float:
    res = _arima_model(y, order).fit(cov_type="none", low_memory=True, method_kwargs={"maxiter": maxiter})
    return float(res.forecast(horizon)[-1])


LOG2 = float(np.log(2.0))


def _quietly(fit, *args) -> float | np.ndarray | None:
    """fit(*args) with statsmodels' warnings silenced; None if it raises or gives a non-finite value."""
    # NOTE(warnings): import statsmodels before silencing. Its first import installs "always"
    # filters for its own warnings; made inside the block below, they would outrank our "ignore"
    # (the first fit's ConvergenceWarning got out) and be undone on exit for everyone else.
    import statsmodels.tsa.arima.model  # noqa: F401
    import statsmodels.tsa.holtwinters  # noqa: F401

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            out = fit(*args)
    except Exception:  # noqa: BLE001 -- any failed fit (LinAlgError, ValueError...) falls back
        return None
    return out if np.all(np.isfinite(out)) else None


@functools.lru_cache(maxsize=256)
def _forecast(kind: str, option: tuple, values: tuple[float, ...], horizon: int) -> float | None:
    y = np.asarray(values, dtype=float)
    return _quietly(_fit_holt if kind == "holt" else _fit_arima, y, horizon, *option)


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

    def _fit_forecast(self, series: str, y: np.ndarray, horizon: int) -> float | None:
        """The fitted model's forecast of `series` (rate, prompt or output), None if the fit failed."""
        return _forecast(self.kind, self._option(), tuple(y.tolist()), horizon)

    def _series(self, series: str, y: np.ndarray, horizon: int, lo: float, hi: float) -> float:
        """The forecast of series y, clipped to [lo, hi]: a guard against a wild fit."""
        if len(y) < self.min_points:
            return float(ewma(y, self.fallback_alpha))
        if np.ptp(y) == 0:
            return float(y[-1])
        out = self._fit_forecast(series, y, horizon)
        return float(ewma(y, self.fallback_alpha)) if out is None else min(max(out, lo), hi)

    def _lengths(self, series: str, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        if not len(rows):
            return None
        logs = np.log(np.maximum(rows, 1.0))
        center = logs[:, MEDIAN]
        shape = ewma(logs - center[:, None], self.shape_alpha)
        # The median stays within half the smallest and twice the largest median in the window.
        return np.exp(self._series(series, center, horizon, center.min() - LOG2, center.max() + LOG2) + shape)

    def predict(self, history: Sequence[IntervalLoad], horizon: int = 1) -> LoadForecast:
        check_horizon(horizon)
        obs = observe(history, self.window)
        # The rate stays within [0, twice the window's highest rate].
        rate = self._series("rate", obs.rate, horizon, 0.0, 2.0 * obs.rate.max()) if len(obs.rate) else 0.0
        # The fallback for a non-finite forecast: the EWMA forecast of the same history.
        fallback = (float(ewma(obs.rate, self.fallback_alpha)) if len(obs.rate) else 0.0,
                    log_ewma(obs.prompt, self.fallback_alpha) if len(obs.prompt) else None,
                    log_ewma(obs.output, self.fallback_alpha) if len(obs.output) else None)
        return assemble(self.name, rate, self._lengths("prompt", obs.prompt, horizon),
                        self._lengths("output", obs.output, horizon),
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
    kept forecasting the old prompt lengths: prompt p50 MAPE 344% vs 108% on phase-shift.

    Refitting at one forecast in 5 (with a refit at any surprise) forecast as well as refitting
    every time on the benchmark's workloads and on the Azure traces (the "arima refit 1" rows of
    docs/results/bench_predictors.txt and bench_predictors_azure.txt: every error within a point
    or two, but for the output median of the 141-s Azure run, 74.7% vs 70.3%) at about half the
    cost a forecast, and took the hour of the Azure conversation trace in virtual time from 141.0 s
    to 91.5 s (docs/results/des_azure_hour/speed_2026-12-01.txt)."""

    order: tuple[int, int, int] = (0, 1, 1)
    maxiter: int = 25
    refit_every: int = 5
    surprise: float = 3.0
    kind: ClassVar[str] = "arima"
    # series -> its held parameters (_Held): state that changes answers only within `refit_every`
    # forecasts of a fit (a fresh predictor fits at its first forecast).
    _held: dict[str, _Held] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.order) != 3 or any(int(k) < 0 for k in self.order):
            raise ValueError(f"order must be three integers >= 0, got {self.order}")
        if self.refit_every < 1:
            raise ValueError(f"refit_every must be >= 1, got {self.refit_every}")
        object.__setattr__(self, "order", tuple(int(k) for k in self.order))

    def _option(self) -> tuple:
        return (self.order, self.maxiter)

    def _fit_forecast(self, series: str, y: np.ndarray, horizon: int) -> float | None:
        # NOTE(speed): the MLE is ~3/4 of a forecast's cost (about a dozen Kalman filter passes,
        # against one to forecast). The window slides one point an interval, so the parameters
        # move little from one interval to the next: with refit_every = k they are fitted at one
        # forecast in k, and the forecasts in between filter the current window under them.
        # Except after a surprise: a regime change (prompts ten times longer, say) is exactly when
        # the old parameters are wrong (a heavily smoothing fit kept forecasting the old lengths:
        # phase-shift's prompt p50 MAPE 235% at k = 5, against 108% refitting every time). So
        # a last point more than `surprise` standard deviations off the held model's one-step
        # forecast (0.3% of points under the model itself) refits at once.
        if self.refit_every == 1:
            return super()._fit_forecast(series, y, horizon)
        held = self._held.get(series)
        if held is not None and held.uses < self.refit_every:
            out = _quietly(_arima_forecast, y, horizon, self.order, held.params)
            if out is not None and abs(out[1]) <= self.surprise:
                held.uses += 1
                return float(out[0])
        params = _quietly(_fit_arima_params, y, self.order, self.maxiter)
        if params is None:  # failed: fall back now, and try again next time
            self._held.pop(series, None)
            return None
        self._held[series] = _Held(params, uses=1)
        out = _quietly(_arima_forecast, y, horizon, self.order, params)
        return None if out is None else float(out[0])


@dataclass
class _Held:
    """ARIMA parameters held between refits."""

    params: np.ndarray
    uses: int = 0  # forecasts made with these parameters
