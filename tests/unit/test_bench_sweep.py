"""The goodput search: a list of rates, or doubling then bisection, bounded; run_sweep's outputs."""

import json

import pytest

from services.bench.sweep import RateSearch, run_sweep


def drive(search: RateSearch, attainment) -> list[float]:
    rates = []
    while (rate := search.next_rate()) is not None:
        rates.append(rate)
        search.record(rate, attainment(rate))
    return rates


def step(capacity: float):
    return lambda rate: 0.95 if rate <= capacity else 0.5


def test_doubling_then_bisection():
    search = RateSearch(min_rate=1.0, rel_tol=0.1)
    assert drive(search, step(5.3)) == [1, 2, 4, 8, 6, 5, 5.5]  # (5.5 - 5) / 5 <= 0.1: stop
    assert search.best() == 5


def test_the_number_of_runs_is_bounded():
    search = RateSearch(min_rate=1.0, max_runs=3, rel_tol=0.001)
    assert drive(search, step(100)) == [1, 2, 4]
    assert search.best() == 4


def test_max_rate_caps_the_doubling():
    search = RateSearch(min_rate=1.0, max_rate=5.0)
    assert drive(search, step(100)) == [1, 2, 4, 5]
    assert search.best() == 5


def test_no_goodput_when_the_lowest_rate_misses():
    search = RateSearch(min_rate=1.0)
    assert drive(search, step(0.5)) == [1]
    assert search.best() is None


def test_a_list_of_rates_runs_in_increasing_order_and_the_highest_passing_wins():
    search = RateSearch(rates=[4, 1, 2, 8, 2])
    assert drive(search, step(4)) == [1, 2, 4, 8]
    assert search.best() == 4


def test_missing_attainment_counts_as_missing_the_target():
    search = RateSearch(rates=[1, 2])
    drive(search, lambda r: None)
    assert search.best() is None


@pytest.mark.parametrize("kw", [dict(), dict(rates=[1], min_rate=1), dict(rates=[]), dict(rates=[0, 1]),
                                dict(min_rate=0), dict(min_rate=2, max_rate=1), dict(min_rate=1, max_runs=0)])
def test_bad_searches_are_refused(kw):
    with pytest.raises(ValueError):
        RateSearch(**kw)


def test_run_sweep_writes_the_summary_and_the_plot(tmp_path):
    def run_at(rate):
        return {"slo_attainment": 1.0 if rate <= 3 else 0.2, "goodput": rate, "completed": 10, "failed": 0}

    result = run_sweep(RateSearch(min_rate=1.0, rel_tol=0.2), run_at, tmp_path)
    assert result["goodput_rate"] == 3.0
    assert [r["rate"] for r in result["runs"]] == [1, 2, 4, 3, 3.5]
    assert json.loads((tmp_path / "sweep.json").read_text()) == result
    assert (tmp_path / "attainment_vs_rate.png").stat().st_size > 0
