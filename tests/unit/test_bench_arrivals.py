"""Arrival processes: Gamma gaps with vllm bench serve's parameters, durations, phases."""

import numpy as np
import pytest

from services.bench.arrivals import RatePhase, arrival_times, arrivals_per_second, intervals, piecewise_arrival_times


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gaps_have_mean_one_over_rate_and_variance_one_over_rate2_burstiness(burstiness):
    rate = 5.0
    gaps = intervals(np.random.default_rng(7), rate, burstiness, 200_000)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert gaps.var() == pytest.approx(1 / (rate**2 * burstiness), rel=0.05)


def test_poisson_counts_have_mean_rate_times_duration_and_equal_variance():
    counts = [len(arrival_times(4.0, 10.0, seed)) for seed in range(2000)]
    assert np.mean(counts) == pytest.approx(40, rel=0.02)
    assert np.var(counts) == pytest.approx(40, rel=0.1)  # Poisson: variance == mean


def test_burstier_arrivals_have_more_variable_counts():
    poisson = np.var([len(arrival_times(4.0, 10.0, s, burstiness=1.0)) for s in range(1000)])
    bursty = np.var([len(arrival_times(4.0, 10.0, s, burstiness=0.25)) for s in range(1000)])
    assert bursty > 2.5 * poisson  # a renewal process's count variance grows with the gaps' CV^2 (here 4)


def test_times_are_increasing_inside_the_window_and_seeded():
    a = arrival_times(3.0, 20.0, 11, start=5.0)
    assert a == sorted(a) and all(5.0 < t < 25.0 for t in a)
    assert a == arrival_times(3.0, 20.0, 11, start=5.0)
    assert a != arrival_times(3.0, 20.0, 12, start=5.0)
    assert arrival_times(3.0, 0.0, 1) == []


def test_infinite_burstiness_is_a_constant_rate():
    assert arrival_times(2.0, 3.0, 0, burstiness=float("inf")) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])


@pytest.mark.parametrize("rate,burstiness", [(0, 1), (-1, 1), (float("inf"), 1), (1, 0), (1, -0.5)])
def test_bad_parameters_are_refused(rate, burstiness):
    with pytest.raises(ValueError):
        arrival_times(rate, 1.0, 0, burstiness)


def test_piecewise_rates_give_each_phase_its_own_rate():
    phases = [RatePhase(0, 100, 1.0), RatePhase(100, 150, 10.0), RatePhase(150, 200, 2.0, burstiness=0.5)]
    per_phase = piecewise_arrival_times(phases, 3)
    for phase, times in zip(phases, per_phase, strict=True):
        assert all(phase.start < t < phase.end for t in times)
        assert len(times) == pytest.approx(phase.rate * (phase.end - phase.start), rel=0.3)
    with pytest.raises(ValueError):
        piecewise_arrival_times([RatePhase(5, 1, 1.0)], 0)


def test_arrivals_per_second_bins():
    assert arrivals_per_second([0.0, 0.5, 0.99, 1.0, 2.7, 3.5], 3.0) == [3, 1, 1]
    assert arrivals_per_second([0.2], 1.5) == [1, 0]
    assert arrivals_per_second([], 0) == []
