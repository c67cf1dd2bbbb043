"""The stall SLO (`--slo-itl MS`: each request's p99 inter-token gap, DynaServe's P99 TBT): a
request whose tokens come evenly on average but stall now and then meets the TPOT SLO and misses
this one; `dopd simulate` and `dopd bench compare` count it in the attainment when it is given and
report every mode's stalls."""

from __future__ import annotations

import json

import pytest

from services.bench.metrics import RequestResult, meets_slo, summarize
from services.cli import main as dopd

EVEN = [0.02] * 20  # 20 ms a token
STALLED = [0.01] * 19 + [0.5]  # the same TPOT (about 34 ms), one 500 ms stall


def request(itls: list[float], ok: bool = True) -> RequestResult:
    return RequestResult("r", 0.0, 0.1, itls, 0.1 + sum(itls), 10, len(itls) + 1, ok=ok)


def test_a_stall_misses_the_itl_slo_and_not_the_tpot_one():
    stalled = request(STALLED)
    assert stalled.p99_itl == pytest.approx(0.01 + 0.81 * 0.49)  # numpy's linear interpolation at 18.81 of 19
    assert meets_slo(stalled, 200, 40)  # TTFT 100 ms, TPOT 34.5 ms
    assert not meets_slo(stalled, 200, 40, slo_itl_ms=100)
    assert meets_slo(request(EVEN), 200, 40, slo_itl_ms=100)
    assert meets_slo(request([]), 200, 40, slo_itl_ms=1)  # one token: no gap to miss it with
    assert request(STALLED, ok=False).p99_itl is None


def test_summary_counts_the_stall_slo_and_reports_stalls():
    results = [request(EVEN), request(STALLED), request([0.03] * 5)]
    without = summarize(results, 1.0, 200, 40)
    with_itl = summarize(results, 1.0, 200, 40, slo_itl_ms=100)
    assert without["slo_attainment"] == 1.0 and without["itl_attainment"] == 1.0  # no stall SLO: all meet it
    assert with_itl["slo_itl_ms"] == 100 and with_itl["itl_attainment"] == pytest.approx(2 / 3)
    assert with_itl["slo_attainment"] == pytest.approx(2 / 3) and with_itl["slo_met"] == 2
    assert with_itl["max_itl_ms"] == pytest.approx(500.0)
    assert with_itl["median_request_p99_itl_ms"] == pytest.approx(30.0)  # of 20, 407.9 and 30 ms
    assert summarize([], 1.0)["max_itl_ms"] is None


def test_simulate_and_compare_carry_the_stall_slo(tmp_path):
    """Aggregated serving's prompt chunks share its decode steps: its stalls are longer than a
    disaggregated split's, and a stall SLO between the two costs it attainment."""
    out = tmp_path / "cmp"
    common = ["--profile", "llama3-8b-h100", "--workers", "4", "--workload", "phase-shift", "--rate", "8",
              "--duration", "10", "--slo-ttft", "1000", "--slo-tpot", "100"]
    rc = dopd(["bench", "compare", "--modes", "aggregated,static", "--engine", "des", *common, "--slo-itl", "40",
               "--static-splits", "2:2", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["config"]["slo_itl_ms"] == 40
    agg, static = doc["modes"]["aggregated"], doc["modes"]["static"]
    assert agg["max_itl_ms"] > static["max_itl_ms"]
    for f in (agg, static):
        assert f["slo_attainment"] <= f["itl_attainment"]
    run = json.loads((out / "aggregated" / "results.json").read_text())
    assert run["config"]["slo_itl_ms"] == 40
    md = (out / "compare.md").read_text()
    assert "stall (each request's p99 inter-token gap) 40 ms" in md and "p99 ITL p50 / p99, longest" in md
    rc = dopd(["simulate", "--mode", "aggregated", *common, "--out", str(tmp_path / "no-itl"), "--no-plots"])
    assert rc == 0
    plain = json.loads((tmp_path / "no-itl" / "results.json").read_text())
    assert plain["slo_itl_ms"] is None and plain["requests"] == run["requests"]
    assert plain["slo_attainment"] >= run["slo_attainment"]
