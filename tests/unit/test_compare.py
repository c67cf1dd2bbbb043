"""`dopd bench compare`: the static split search, the choice of the better baseline, the goals'
verdict, and a whole comparison in virtual time through the command line."""

from __future__ import annotations

import json

import pytest

from services.cli import main as dopd
from services.comparison.compare import GOALS, Run, all_splits, best, build_doc, verdict


def run(mode, split, goodput, attainment, p90_ttft=100.0, errors=None, failed=0):
    results = {"goodput": goodput, "slo_attainment": attainment, "p90_ttft_ms": p90_ttft, "median_ttft_ms": 10.0,
               "p99_ttft_ms": 200.0, "median_tpot_ms": 8.0, "p90_tpot_ms": 9.0, "p99_tpot_ms": 12.0,
               "completed": 100, "failed": failed, "requests": 100 + failed, "errors": errors or {}}
    return Run(mode, split, results)


def test_every_split_and_the_best_by_goodput_then_attainment():
    assert all_splits(4) == [(1, 3), (2, 2), (3, 1)]
    runs = [run("static", (1, 3), 10.0, 0.9), run("static", (2, 2), 12.0, 0.8), run("static", (3, 1), 12.0, 0.85)]
    assert best(runs).split == (3, 1)


def test_dopd_is_judged_against_the_better_baseline_and_refusals_count_as_misses():
    doc = build_doc({"static": [run("static", (1, 3), 10.0, 0.90), run("static", (2, 2), 20.0, 0.95)],
                     "aggregated": [run("aggregated", None, 15.0, 0.97)],
                     "dopd": [run("dopd", (2, 2), 30.0, 0.995, p90_ttft=40.0,
                                  errors={"RESOURCE_EXHAUSTED": 3, "UNAVAILABLE": 1}, failed=4)]},
                    {"command": "x"})
    v = doc["dopd_vs_best_baseline"]
    assert v["baseline"] == "static" and doc["modes"]["static"]["split"] == "2:2"
    assert [s["split"] for s in doc["modes"]["static"]["splits_tried"]] == ["1:3", "2:2"]
    assert v["figures"]["goodput_ratio"] == pytest.approx(1.5) and v["met"]["goodput_ratio"]
    assert v["figures"]["p90_ttft_change"] == pytest.approx(-0.6) and v["met"]["p90_ttft_change"]
    assert v["figures"]["p90_tpot_change"] == pytest.approx(0.0) and not v["met"]["p90_tpot_change"]
    assert v["met"]["attainment"]
    assert doc["modes"]["dopd"]["refused"] == 3 and doc["modes"]["dopd"]["failed"] == 1


def test_a_goal_just_missed_is_missed():
    dopd = run("dopd", (1, 1), 14.9, 0.989).figures()
    base = run("static", (1, 1), 10.0, 0.9).figures()
    met = verdict(dopd, base)["met"]
    assert GOALS["goodput_ratio"] == 1.5 and not met["goodput_ratio"] and not met["attainment"]


def test_compare_in_virtual_time_writes_the_tables_and_plots(tmp_path):
    out = tmp_path / "cmp"
    rc = dopd(["bench", "compare", "--modes", "aggregated,static,dopd,dopd-no-policy,dopd-no-planner", "--engine",
               "des", "--profile", "llama3-8b-h100", "--workers", "4", "--workload", "phase-shift", "--rate", "8",
               "--duration", "10", "--slo-ttft", "300", "--slo-tpot", "40", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "compare.json").read_text())
    assert list(doc["modes"]) == ["aggregated", "static", "dopd", "dopd-no-policy", "dopd-no-planner"]
    assert [s["split"] for s in doc["modes"]["static"]["splits_tried"]] == ["1:3", "2:2", "3:1"]
    assert doc["modes"]["aggregated"]["split"] is None
    for mode, f in doc["modes"].items():
        assert f["completed"] + f["refused"] + f["failed"] == f["requests"], mode
    assert doc["dopd_vs_best_baseline"]["baseline"] in ("static", "aggregated")
    assert "dopd bench compare" in (out / "compare.md").read_text()
    for png in ("latency_cdfs.png", "goodput.png", "dopd_split.png"):
        assert (out / png).stat().st_size > 0
    # The same seed in every mode: every run served the same requests.
    counts = {json.loads((out / d / "results.json").read_text())["requests"]
              for d in ("aggregated", "static-2p2d", "dopd", "dopd-no-policy")}
    assert len(counts) == 1


def test_compare_refuses_bad_arguments(tmp_path, capsys):
    assert dopd(["bench", "compare", "--modes", "static,nope", "--profile", "llama3-8b-h100", "--workers", "4",
                 "--workload", "mix", "--slo-ttft", "300", "--slo-tpot", "40", "--out", str(tmp_path)]) == 2
    assert "unknown mode 'nope'" in capsys.readouterr().err
    assert dopd(["bench", "compare", "--workers", "4", "--workload", "mix", "--slo-ttft", "300", "--slo-tpot",
                 "40", "--out", str(tmp_path)]) == 2
    assert dopd(["bench", "--workload", "mix", "--slo-ttft", "300", "--slo-tpot", "40", "--out", str(tmp_path)]) == 2


def test_compare_measures_each_modes_distserve_goodput_by_a_rate_search(tmp_path):
    out = tmp_path / "sweep"
    rc = dopd(["bench", "compare", "--modes", "static,dopd", "--engine", "des", "--profile", "llama3-8b-h100",
               "--workers", "3", "--workload", "mix", "--rate", "4", "--duration", "8", "--slo-ttft", "300",
               "--slo-tpot", "40", "--out", str(out), "--no-progress", "--sweep-from", "4", "--sweep-runs", "3"])
    assert rc == 0
    doc = json.loads((out / "compare.json").read_text())
    static_sweeps = doc["modes"]["static"]["sweeps"]
    assert len(static_sweeps) == 2  # both splits of 3 workers (SWEPT_SPLITS at most)
    for mode in ("static", "dopd"):
        points = [p for s in doc["modes"][mode]["sweeps"] for p in s["points"]]
        assert [r for r, _ in doc["modes"][mode]["sweeps"][0]["points"]][:2] == [4.0, 8.0]  # doubling from 4
        best = doc["modes"][mode]["goodput_rate"]
        assert best == max((r for r, a in points if a >= 0.9), default=None)
    g = doc["dopd_vs_best_baseline_goodput_rate"]
    assert g["baseline"] == "static" and g["target_attainment"] == 0.9
    assert "Goodput as DistServe defines it" in (out / "compare.md").read_text()
