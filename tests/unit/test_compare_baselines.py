"""The baselines as their users run them in `dopd bench compare` (services/comparison/baselines.py):
aggregated at vLLM's chunk budget and at its best budget in hindsight, the split DistServe's
placement would choose in advance, every static split's own rate goodput, and per-GPU figures."""

from __future__ import annotations

import json

import pytest

from services.cli import main as dopd
from services.comparison.baselines import AGGREGATED_BUDGETS, APRIORI_TRACE_S, apriori_until, base_mode

SIMULATE = ["--profile", "llama3-8b-h100", "--workers", "3", "--workload", "phase-shift", "--rate", "6",
            "--duration", "20", "--slo-ttft", "300", "--slo-tpot", "40"]
COMMON = ["--engine", "des", *SIMULATE, "--no-progress"]


def test_what_is_known_in_advance():
    assert apriori_until("phase-shift", 100.0) == pytest.approx(20.0)  # the quiet chat phase
    assert apriori_until("mix", 100.0) == pytest.approx(20.0)
    assert apriori_until(None, None, 3600.0) == APRIORI_TRACE_S  # an hour's trace: its first 10 minutes
    assert apriori_until(None, None, 600.0) == pytest.approx(120.0)  # a 10-minute cut: its first fifth
    assert base_mode("aggregated-best") == "aggregated" and base_mode("static-apriori") == "static"
    assert base_mode("dopd") == "dopd"


def test_simulate_until_serves_a_prefix_of_the_same_schedule(tmp_path):
    for name, extra in (("whole", []), ("prefix", ["--until", "4"])):
        assert dopd(["simulate", "--mode", "static", *SIMULATE, "--out", str(tmp_path / name), "--no-plots",
                     "--write-requests", *extra]) == 0
    whole = [json.loads(line) for line in open(tmp_path / "whole" / "requests.jsonl")]
    prefix = [json.loads(line) for line in open(tmp_path / "prefix" / "requests.jsonl")]
    assert 0 < len(prefix) < len(whole)
    assert all(r["t_sent"] < 4 for r in prefix)
    assert [r["t_sent"] for r in prefix] == [r["t_sent"] for r in whole[:len(prefix)]]
    assert json.loads((tmp_path / "prefix" / "results.json").read_text())["config"]["until_s"] == 4


def test_compare_runs_the_baselines_as_users_run_them(tmp_path):
    out = tmp_path / "cmp"
    rc = dopd(["bench", "compare", "--modes", "aggregated,aggregated-best,static,static-apriori,dopd", *COMMON,
               "--out", str(out), "--sweep-from", "4", "--sweep-runs", "3"])
    assert rc == 0
    doc = json.loads((out / "compare.json").read_text())
    modes = doc["modes"]
    tried = modes["aggregated-best"]["budgets_tried"]
    assert [b["chunk_tokens"] for b in tried] == list(AGGREGATED_BUDGETS)
    assert modes["aggregated-best"]["goodput"] == max(b["goodput"] for b in tried)
    assert modes["aggregated-best"]["goodput"] >= modes["aggregated"]["goodput"]  # 2048 is among the budgets
    chosen = modes["static-apriori"]["chosen_on"]
    assert chosen["until_s"] == pytest.approx(4.0)
    fit = chosen["fit"]
    assert [f["split"] for f in fit] == ["1:2", "2:1"]
    assert chosen["split"] == modes["static-apriori"]["split"]
    assert chosen["split"] in {f["split"] for f in fit if f["goodput"] == max(g["goodput"] for g in fit)}
    for mode, f in modes.items():
        assert f["goodput_per_gpu"] == pytest.approx(f["goodput"] / 3), mode
        assert f["goodput_rate_per_gpu"] == pytest.approx(f["goodput_rate"] / 3), mode
    assert len(modes["static"]["sweeps"]) == 2  # every split's own rate goodput
    assert len(modes["aggregated-best"]["sweeps"]) == len(AGGREGATED_BUDGETS)
    assert set(doc["dopd_vs_peers"]) == {"aggregated", "static-apriori"}
    assert doc["dopd_vs_best_baseline"]["baseline"] in ("static", "aggregated", "aggregated-best")
    md = (out / "compare.md").read_text()
    assert "dopd against the peers as their users run them" in md and "static-apriori: split" in md
    assert (out / "aggregated-best-8192" / "results.json").exists()
