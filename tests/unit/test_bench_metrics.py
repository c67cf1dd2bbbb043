"""Metrics against values computed by hand (vllm bench serve's definitions; numpy's linear
percentiles), with a failed request and a one-token output."""

import math

import pytest

from services.bench.metrics import RequestResult, meets_slo, summarize


def results():
    return [
        # TPOT = (0.5 - 0.1) / 4 = 0.1
        RequestResult("a", 0.0, ttft=0.1, itls=[0.1, 0.1, 0.1, 0.1], e2e=0.5, prompt_tokens=10, output_tokens=5),
        # one output token: no TPOT, no ITL
        RequestResult("b", 0.2, ttft=0.3, itls=[], e2e=0.3, prompt_tokens=20, output_tokens=1),
        # TPOT = (1.2 - 0.2) / 2 = 0.5
        RequestResult("c", 0.4, ttft=0.2, itls=[0.4, 0.6], e2e=1.2, prompt_tokens=30, output_tokens=3),
        RequestResult("d", 0.6, ttft=None, prompt_tokens=40, output_tokens=0, ok=False, error="UNAVAILABLE"),
    ]


def test_counts_and_throughputs():
    s = summarize(results(), duration=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == {"UNAVAILABLE": 1}
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 9)  # completed requests only
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.5)
    assert s["total_token_throughput"] == pytest.approx(34.5)


def test_latency_statistics_in_ms():
    s = summarize(results(), duration=2.0)
    expected = {
        # TTFT [100, 300, 200]
        "ttft": dict(mean=200, median=200, std=math.sqrt(20000 / 3), p90=280, p99=298),
        # TPOT [100, 500]: request b has one token, so no TPOT
        "tpot": dict(mean=300, median=300, std=200, p90=460, p99=496),
        # ITL [100, 100, 100, 100, 400, 600]
        "itl": dict(mean=1400 / 6, median=100, p90=500, p99=590),
        # E2EL [500, 300, 1200]
        "e2el": dict(mean=2000 / 3, median=500, p90=1060, p99=1186),
    }
    for metric, stats in expected.items():
        for stat, value in stats.items():
            assert s[f"{stat}_{metric}_ms"] == pytest.approx(value), (metric, stat)


def test_slo_attainment_counts_every_request_and_goodput_counts_completed_ones_per_second():
    s = summarize(results(), duration=2.0, slo_ttft_ms=250, slo_tpot_ms=200)
    # a meets both; b misses TTFT (300 ms); c misses TPOT (500 ms); d failed
    assert s["slo_met"] == 1
    assert s["slo_attainment"] == pytest.approx(0.25)
    assert s["ttft_attainment"] == pytest.approx(0.5)  # a, c
    assert s["tpot_attainment"] == pytest.approx(0.5)  # a, and b (one token: no TPOT to miss)
    assert s["goodput"] == pytest.approx(0.5)
    assert (s["slo_ttft_ms"], s["slo_tpot_ms"]) == (250, 200)


def test_without_slos_every_completed_request_is_good_and_failed_ones_are_not():
    s = summarize(results(), duration=2.0)
    assert s["slo_attainment"] == pytest.approx(0.75)
    assert s["goodput"] == pytest.approx(s["request_throughput"])


def test_boundaries_meet_the_slo():
    r = RequestResult("x", 0.0, ttft=0.25, e2e=0.45, output_tokens=3)  # TPOT exactly 100 ms
    assert meets_slo(r, 250, 100)
    assert not meets_slo(r, 249.9, 100)
    assert not meets_slo(r, 250, 99.9)


def test_one_token_request_has_no_tpot():
    r = RequestResult("x", 0.0, ttft=0.3, e2e=0.3, output_tokens=1)
    assert r.tpot is None
    assert meets_slo(r, 300, 0.001)


def test_all_failed_and_empty_runs():
    failed = [RequestResult(str(i), 0.0, ttft=None, ok=False, error="DEADLINE_EXCEEDED") for i in range(3)]
    s = summarize(failed, duration=1.0, slo_ttft_ms=100, slo_tpot_ms=100)
    assert (s["completed"], s["failed"], s["slo_attainment"], s["goodput"]) == (0, 3, 0.0, 0.0)
    assert s["errors"] == {"DEADLINE_EXCEEDED": 3}
    assert s["mean_ttft_ms"] is None and s["p99_tpot_ms"] is None
    empty = summarize([], duration=1.0)
    assert (empty["requests"], empty["slo_attainment"], empty["request_throughput"]) == (0, None, 0.0)
    with pytest.raises(ValueError):
        summarize([], duration=0)
