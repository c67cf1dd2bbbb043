"""The planner's load predictors: hand-computed constant and EWMA cases, Holt on a ramp, ARIMA on a
noisy level, and sanity (no raise, rate >= 0, ordered quantiles >= 1) on awkward histories."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from common.load import QUANTILE_LEVELS, IntervalLoad, LengthDist, LoadForecast
from services.planner.predictors import (
    EMPTY_LENGTH,
    ArimaPredictor,
    HoltWintersPredictor,
    base,
    make_predictor,
    predictor_names,
    register_predictor,
)
from services.planner.predictors.statistical import _forecast

BUILTIN = ["arima", "constant", "ewma", "holt-winters"]


def load(start: float, prompts: tuple[int, ...] = (), outputs: tuple[int, ...] | None = None,
         duration: float = 1.0, rejected: int = 0) -> IntervalLoad:
    outputs = prompts if outputs is None else outputs
    return IntervalLoad(start=start, duration=duration, arrivals=len(prompts), prompt_lens=prompts,
                        output_lens=outputs, rejected=rejected)


def rate_history(rates, prompt: int = 100, output: int = 50) -> list[IntervalLoad]:
    return [load(i, (prompt,) * int(r), (output,) * int(r)) for i, r in enumerate(rates)]


def assert_sane(fc: LoadForecast) -> None:
    assert math.isfinite(fc.rate) and fc.rate >= 0
    for dist in (fc.prompt, fc.output):
        assert all(math.isfinite(q) and q >= 1 for q in dist.quantiles)
        assert list(dist.quantiles) == sorted(dist.quantiles)
        assert math.isfinite(dist.mean) and dist.mean >= 1


# -- registry -----------------------------------------------------------------------------------
@pytest.fixture
def fake_registered():
    @register_predictor("fake-fixed")
    class Fixed:
        def __init__(self, rate: float = 7.0) -> None:
            self.rate = rate

        def predict(self, history, horizon=1):
            return LoadForecast(self.rate, LengthDist.constant(3), LengthDist.constant(4), self.name)

    yield Fixed
    base._REGISTRY.pop("fake-fixed")


def test_registry_lists_the_builtins():
    assert set(BUILTIN) <= set(predictor_names())
    for name in BUILTIN:
        assert make_predictor(name).name == name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown predictor 'prophet'.*arima, constant, ewma, holt-winters"):
        make_predictor("prophet")


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="alpha"):
        make_predictor("ewma", alpha=0.0)
    with pytest.raises(ValueError, match="ewma"):
        make_predictor("ewma", nonsense=1)
    with pytest.raises(ValueError, match="order"):
        make_predictor("arima", order=(1, 0))


def test_a_fake_registers_through_the_registry(fake_registered):
    assert "fake-fixed" in predictor_names()
    p = make_predictor("fake-fixed", rate=2.5)
    assert isinstance(p, fake_registered)
    assert p.predict([]) == LoadForecast(2.5, LengthDist.constant(3), LengthDist.constant(4), "fake-fixed")


def test_horizon_below_one_is_refused():
    for name in BUILTIN:
        with pytest.raises(ValueError, match="horizon"):
            make_predictor(name).predict([], horizon=0)


# -- hand-computed ------------------------------------------------------------------------------
def test_constant_is_the_last_interval_and_carries_lengths_over_an_empty_one():
    p = make_predictor("constant")
    history = [load(0, (1000,)), load(1, (10, 20), (5, 7)), load(2, duration=2.0, rejected=3)]
    fc = p.predict(history)
    assert fc.rate == 1.5  # 3 refused in 2 s: offered load
    assert fc.prompt == LengthDist.from_samples((10, 20))  # the last interval with arrivals
    assert fc.output == LengthDist.from_samples((5, 7))
    assert p.predict(history[:2], horizon=4).rate == 2.0  # flat for every horizon


def test_ewma_by_hand():
    p = make_predictor("ewma", alpha=0.5)
    # rates 2, 0, 4: s = 2, 1, 2.5. Lengths: only the intervals with arrivals, in log space:
    # exp(0.5 ln 10 + 0.5 ln 40) = 20 (a geometric mean), every quantile and the mean alike.
    history = [load(0, (10, 10)), load(1), load(2, (40,) * 4, (8,) * 4)]
    fc = p.predict(history)
    assert fc.rate == pytest.approx(2.5)
    assert fc.prompt.quantiles == pytest.approx((20.0,) * len(QUANTILE_LEVELS))
    assert fc.prompt.mean == pytest.approx(20.0)
    assert fc.output.mean == pytest.approx(math.sqrt(10 * 8))


def test_ewma_keeps_each_quantile_level():
    p = make_predictor("ewma", alpha=1.0)  # alpha 1: the last observation, exactly
    history = [load(0, (1, 2, 3)), load(1, (10, 20, 30, 40, 50))]
    assert p.predict(history).prompt.quantiles == pytest.approx(LengthDist.from_samples((10, 20, 30, 40, 50)).quantiles)


# -- statistical --------------------------------------------------------------------------------
def test_holt_winters_follows_a_linear_ramp():
    history = rate_history(range(1, 41))  # 1, 2, ..., 40 requests a second
    p = make_predictor("holt-winters")
    assert p.predict(history).rate == pytest.approx(41, rel=0.02)
    assert p.predict(history, horizon=5).rate == pytest.approx(45, rel=0.04)
    assert p.predict(history, horizon=1000).rate <= 80  # the damped trend, clipped to 2x the window's highest
    fc = p.predict(history)
    assert fc.prompt.quantiles == pytest.approx((100.0,) * len(QUANTILE_LEVELS))  # constant lengths stay


def test_arima_on_a_noisy_constant_rate_stays_near_it():
    rng = np.random.default_rng(7)
    history = rate_history(rng.poisson(20, size=60))
    for horizon in (1, 3):
        assert 17 <= make_predictor("arima").predict(history, horizon=horizon).rate <= 23


def test_arima_on_an_exactly_constant_series_is_that_constant():
    fc = make_predictor("arima").predict(rate_history([5] * 30, prompt=64))
    assert fc.rate == 5.0
    assert fc.prompt.quantiles == pytest.approx((64.0,) * len(QUANTILE_LEVELS))


def test_short_histories_fall_back_to_ewma():
    history = rate_history([3, 9, 6])
    ewma = make_predictor("ewma", alpha=0.3).predict(history)
    for p in (HoltWintersPredictor(fallback_alpha=0.3), ArimaPredictor(fallback_alpha=0.3)):
        assert p.predict(history).rate == pytest.approx(ewma.rate)


def test_statsmodels_warnings_are_silenced_and_answers_repeat():
    rng = np.random.default_rng(3)
    # A level shift: ARIMA's optimiser near a unit root, Holt's near its bounds.
    rates = np.concatenate([rng.poisson(2, 30), rng.poisson(30, 20)])
    history = [load(i, tuple(int(x) for x in rng.lognormal(4, 1.2, r) + 1)) for i, r in enumerate(rates)]
    for name in ("holt-winters", "arima"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = make_predictor(name).predict(history)
        assert not caught, [str(w.message) for w in caught]
        _forecast.cache_clear()  # a restarted planner: no memoised fit, same answer
        assert make_predictor(name).predict(history) == first
        assert_sane(first)


def test_the_first_fit_in_a_fresh_process_warns_nothing():
    # statsmodels' first import installs "always" filters for its warnings; the first fit must not
    # let its ConvergenceWarning out (maxiter=1 makes sure there is one).
    code = """if True:
        import warnings
        from common.load import IntervalLoad
        from services.planner.predictors import ArimaPredictor
        warnings.simplefilter("default")
        history = [IntervalLoad(i, 1, n, (10 * n + 1,) * n) for i, n in enumerate([1, 5, 2, 8, 3, 9, 1, 7, 2, 6, 30,
                                                                                  31, 29, 33, 30])]
        ArimaPredictor(maxiter=1).predict(history)
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


# -- sanity on awkward histories ----------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN)
def test_empty_history_gives_the_documented_default(name):
    fc = make_predictor(name).predict([])
    assert fc.rate == 0.0
    assert fc.prompt == fc.output == LengthDist.constant(EMPTY_LENGTH)
    assert fc.predictor == name


@pytest.mark.parametrize("name", BUILTIN)
def test_one_point_history(name):
    fc = make_predictor(name).predict([load(0, (5, 50, 500), (1, 2, 3))])
    assert_sane(fc)
    assert fc.rate == pytest.approx(3.0)
    assert fc.prompt.quantiles == pytest.approx(LengthDist.from_samples((5, 50, 500)).quantiles)


@pytest.mark.parametrize("name", BUILTIN)
def test_histories_with_empty_intervals(name):
    p = make_predictor(name)
    only_empty = [load(i) for i in range(20)]
    fc = p.predict(only_empty, horizon=2)
    assert fc.rate == 0.0 and fc.prompt == LengthDist.constant(EMPTY_LENGTH)
    rng = np.random.default_rng(11)
    sparse = [load(i, tuple(int(x) for x in rng.integers(1, 3000, size=int(n))), duration=0.5 if i % 7 else 0.0)
              for i, n in enumerate(rng.poisson(0.7, size=40))]  # many empty, some zero-length intervals
    for horizon in (1, 4):
        assert_sane(p.predict(sparse, horizon=horizon))
    assert_sane(p.predict([load(0, (0, 0)), load(1)]))  # lengths of 0 tokens: read as 1


@pytest.mark.parametrize("name", BUILTIN)
def test_quantiles_never_decrease_on_a_shifting_workload(name):
    rng = np.random.default_rng(5)
    history = []
    for i in range(60):
        median = 20 if i < 30 else 4000  # short chat, then long prompts
        n = int(rng.poisson(6))
        history.append(load(i, tuple(int(x) for x in np.maximum(1, rng.lognormal(math.log(median), 1.0, n))),
                            tuple(int(x) for x in np.maximum(1, rng.lognormal(5, 0.8, n)))))
    p = make_predictor(name)
    for end in (1, 2, 3, 12, 31, 60):
        assert_sane(p.predict(history[:end]))


def test_arima_with_refit_every_k_fits_once_in_k_forecasts(monkeypatch):
    from services.planner.predictors import statistical

    rng = np.random.default_rng(5)
    loads = [load(i, tuple(int(x) for x in rng.lognormal(4, 0.8, n) + 1)) for i, n in enumerate(rng.poisson(12, 60))]
    histories = [loads[: 40 + i] for i in range(9)]
    _forecast.cache_clear()
    full = [ArimaPredictor().predict(h) for h in histories]  # a fit at every forecast
    fits = []
    real = statistical._fit_arima_params
    monkeypatch.setattr(statistical, "_fit_arima_params", lambda *a: fits.append(a) or real(*a))
    held = ArimaPredictor(refit_every=4)
    got = [held.predict(h) for h in histories]
    assert len(fits) == 3 * 3  # rate, prompt and output, refitted at forecasts 0, 4 and 8
    for i in (0, 4, 8):  # right after a refit: the same answer as fitting every time
        assert got[i] == full[i]
    between = [i for i in range(9) if i % 4]
    # In between, the held parameters filter the newer windows: close to a fresh fit, not the same.
    assert any(got[i] != full[i] for i in between)
    for i in between:
        assert got[i].rate == pytest.approx(full[i].rate, rel=0.25)
        assert_sane(got[i])
    with pytest.raises(ValueError, match="refit_every"):
        ArimaPredictor(refit_every=0)



def test_a_surprising_last_point_refits_at_once():
    # A level shift in the rate at the last interval: the parameters held from before it would
    # smooth it away; the predictor refits at once and answers as a fresh fit does.
    rng = np.random.default_rng(8)
    rates = list(rng.poisson(10, 45))
    loads = [load(i, (100,) * int(r)) for i, r in enumerate(rates)]
    held = ArimaPredictor(refit_every=10)
    held.predict(loads)  # fits, and holds the parameters
    shifted = loads + [load(45, (100,) * 60)]
    _forecast.cache_clear()
    assert held.predict(shifted) == ArimaPredictor().predict(shifted)
    assert held._held["rate"].uses == 1  # refitted on the shifted history
