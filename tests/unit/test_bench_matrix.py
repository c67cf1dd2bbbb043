"""benchmarks/bench_matrix.py's own logic: the SLO regimes it derives from the profile, one cell's
figures read from a comparison, and the table's verdict against the best fixed design."""

from __future__ import annotations

import pytest

from benchmarks.bench_matrix import markdown, regimes, summarize_cell
from common.profile import load_profile


def test_regimes_come_from_the_profile():
    p = load_profile("llama3-8b-h100")
    r = regimes("llama3-8b-h100")
    assert r["loose"] == {"ttft": 1000.0, "tpot": 50.0, "itl": None, "why": r["loose"]["why"]}
    tight = r["tight"]["tpot"]
    assert p.decode_step_time(64, 2048) * 1e3 <= tight < p.decode_step_time(64, 2048) * 1e3 + 1
    assert r["stall"]["itl"] == 2 * tight
    # What the stall SLO separates: a step with a 2,048-token chunk breaks it, one with 512 does not.
    assert p.mixed_step_time(64, 2048, 2048) * 1e3 > r["stall"]["itl"] >= p.mixed_step_time(64, 2048, 512) * 1e3


def comparison(rates: dict[str, float | None]) -> dict:
    modes = {m: {"goodput_rate_per_gpu": v, "split": "2:6" if m.startswith("static") else None,
                 "chunk_tokens": 8192 if m == "aggregated-best" else None} for m, v in rates.items()}
    return {"modes": modes}


def test_a_cell_is_judged_against_the_best_fixed_design_and_the_peers():
    cell = summarize_cell(comparison({"aggregated": 10.0, "aggregated-best": 12.0, "static": 8.0,
                                      "static-apriori": 4.0, "dopd": 9.0}))
    assert cell["best_fixed"] == "aggregated-best"
    assert cell["dopd_vs_best_fixed"] == pytest.approx(0.75)
    assert cell["dopd_vs_peers"] == {"aggregated": pytest.approx(0.9), "static-apriori": pytest.approx(2.25)}
    assert cell["aggregated_best_budget"] == 8192 and cell["static_split"] == "2:6"
    none = summarize_cell(comparison({"aggregated": None, "aggregated-best": None, "static": None,
                                      "static-apriori": None, "dopd": None}))
    assert none["dopd_vs_best_fixed"] is None and none["dopd_vs_peers"]["aggregated"] is None


def test_the_table_reports_the_geometric_mean_and_the_lowest_cell():
    cells = {}
    for name, dopd in (("a/loose", 8.0), ("b/loose", 18.0)):
        c = summarize_cell(comparison({"aggregated": 10.0, "aggregated-best": 10.0, "static": 9.0,
                                       "static-apriori": 9.0, "dopd": dopd}))
        cells[name] = {"workload": name.split("/")[0], "regime": "loose", **c}
    md = markdown({"command": "x", "workers": 8, "profile": "p", "minutes": 1.0,
                   "regimes": regimes("llama3-8b-h100"), "cells": cells})
    assert "geometric mean 1.200x over 2 cells, lowest 0.800x" in md
