"""The planner's load predictors, behind a name -> class registry. Pure: numpy and statsmodels.

    make_predictor("arima", window=50).predict(history, horizon=1) -> LoadForecast

Each predicts, for the interval `horizon` intervals after the last one in `history`, the arrival
rate (IntervalLoad.rate) and the prompt- and output-length distributions (every quantile level of
LengthDist, and the mean). Intervals with no arrivals carry no lengths and are skipped in the
length series (base.py says why). What each fits:

    constant      nothing: the last interval's rate; the last observed length distributions.
    ewma          an EWMA (alpha 0.3) of the rate, and of each length quantile and the mean, in log
                  space (a weighted geometric mean).
    holt-winters  statsmodels Holt, damped additive trend, no season, least-squares fit on the last
                  120 points of three series: the rate, log median prompt, log median output length.
    arima         statsmodels ARIMA(0,1,1) (option `order`), MLE on the last 50 points (DOPD's window)
                  of the same three series; the parameters are refitted at one forecast in 5
                  (`refit_every`), or at once when the last point lies more than 3 standard
                  deviations off the held model's forecast (`surprise`), and filter the newer
                  windows in between (statistical.py says why).

NOTE(speed): the goal is one planner decision in 100 ms, fit included (DOPD's ARIMA takes
~0.8 s). One ARIMA or Holt fit on 50 points costs ~10-20 ms of one core here; fitting all 15
series (the rate + 7 per length distribution) would take 150-250 ms. So only the three series
that move the split are fitted: the rate (in req/s), and the median prompt and output length in
log space (positive, and a multiplicative change is one step). The rest of each distribution,
its shape (log q_i / median, log mean / median), is an EWMA: the fitted median moves all
quantiles together, and the spread follows slowly. At 1 s intervals a handful of requests make
each interval's p90/p99, so those per-interval series are mostly sampling noise that a fit of
their own would only chase. ARIMA's fit is also trimmed (statistical.py, `_fit_arima`).
Run the planner with one BLAS thread (OPENBLAS_NUM_THREADS=1): a fit makes thousands of tiny BLAS
calls, and on a busy 2-core machine OpenBLAS's threads made them several times slower.

Short or empty histories never raise: an empty history gives rate 0 and lengths of one token
(`EMPTY_LENGTH`); a series shorter than `min_points` (10) falls back to its EWMA. Every answer is
made sane in one place (`base.assemble`): rate >= 0, lengths >= 1, quantiles non-decreasing.
"""

from services.planner.predictors.base import (
    EMPTY_LENGTH,
    make_predictor,
    predictor_names,
    register_predictor,
)
from services.planner.predictors.simple import ConstantPredictor, EwmaPredictor
from services.planner.predictors.statistical import ArimaPredictor, HoltWintersPredictor

__all__ = [
    "EMPTY_LENGTH",
    "ArimaPredictor",
    "ConstantPredictor",
    "EwmaPredictor",
    "HoltWintersPredictor",
    "make_predictor",
    "predictor_names",
    "register_predictor",
]
