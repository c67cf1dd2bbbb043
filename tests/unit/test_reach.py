"""services/bench/reach.py: the bounds no scheduler can beat, against hand-computed values and
against every request the simulator serves in each mode; and `dopd reach` on a comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.profile import LatencyProfile, load_profile
from services.bench.reach import Limits, cheapest_forward_s, cheapest_prefill_s, lowest_percentile, reach
from services.bench.workloads import generate
from services.cli import main as dopd
from services.comparison.compare import GOALS
from services.simulate.sim import SimConfig, simulate

# Prefill: 1 s for a token, 2 s for 10 (1/9 s a token more), 10 s for 20 (0.8 s a token more):
# 10 tokens is the cheapest a token, so 20 tokens cost least as two forwards of 10 (4 s, not 10).
HAND = {
    "name": "hand",
    "model": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float16", "vocab_size": 100,
              "max_context": 4096},
    "prefill": {"tokens": [1, 10, 20], "seconds": [1.0, 2.0, 10.0]},
    "decode": {"batch": [1, 4], "context": [100, 300], "seconds": [[0.5, 0.7], [0.6, 0.9]]},
}


@pytest.fixture
def hand() -> LatencyProfile:
    return LatencyProfile.from_dict(json.loads(json.dumps(HAND)))


HAND_LIMITS = Limits(max_batch=4, max_forward_tokens=20, max_context=300)


def test_the_cheapest_prefill_splits_a_prompt_where_two_forwards_cost_less_than_one(hand):
    cost = cheapest_prefill_s(hand, 20, HAND_LIMITS)
    assert cost[0] == 0.0
    assert cost[10] == pytest.approx(2.0)  # one forward: splitting adds a forward's fixed cost
    assert cost[20] == pytest.approx(4.0)  # 10 + 10, against 10.0 s in one forward
    assert cost[15] == pytest.approx(2.0 + 13 / 9)  # two forwards, both in the 1..10 range: 2 + (15 - 2) / 9
    assert hand.prefill_time(15) == pytest.approx(6.0)
    for longest in (-1, 21):  # no prompt is longer than the largest forward
        with pytest.raises(ValueError):
            cheapest_prefill_s(hand, longest, HAND_LIMITS)


def test_a_forward_that_costs_less_with_more_tokens_lowers_the_floor():
    """No premise on the profile's shape: where more tokens cost less (a dip in a measured
    profile), a prompt's chunk is floored by the cheapest forward that could hold it."""
    dipping = LatencyProfile.from_dict({**HAND, "prefill": {"tokens": [1, 10, 20], "seconds": [1.0, 2.0, 1.5]}})
    cost = cheapest_prefill_s(dipping, 10, Limits(max_batch=4, max_forward_tokens=20, max_context=300))
    assert cost[10] == pytest.approx(1.5)  # held in a forward of 20 tokens: 1.5 s, under prefill_time(10)
    assert cost[1] == pytest.approx(1.0)  # a forward of 1 token is the cheapest holding 1: 1.0 s
    short = cheapest_prefill_s(dipping, 10, Limits(max_batch=4, max_forward_tokens=10, max_context=300))
    assert short[10] == pytest.approx(2.0)  # no forward over 10 tokens: back to one of 10


def test_the_cheapest_prefill_on_the_h100_profile_never_exceeds_one_forward_and_grows_with_the_prompt():
    p = load_profile("llama3-8b-h100")
    cost = cheapest_prefill_s(p, 8192, Limits(max_batch=256, max_forward_tokens=8192 + 256, max_context=8192))
    one = np.array([0.0] + [p.prefill_time(n) for n in range(1, 8193)])
    assert np.all(cost <= one + 1e-15) and np.all(np.diff(cost) >= -1e-15)
    assert cost[1024] == pytest.approx(one[1024])  # short prompts: one forward is the cheapest
    assert cost[8192] < 0.95 * one[8192]  # 8,192 tokens: two forwards of 4,096 cost less than one


def test_the_cheapest_forward_is_the_least_step_over_the_runs_batches_and_contexts(hand):
    # batch 1 at a context of one token (0.5 s at 100, extrapolated down: 0.401 s), against a
    # mixed step of 2 tokens or more (prefill of 2: 1 + 1/9 s)
    assert cheapest_forward_s(hand, HAND_LIMITS) == pytest.approx(0.401)
    slow = LatencyProfile.from_dict({**HAND, "decode": {"batch": [1], "context": [100], "seconds": [[3.0]]}})
    assert cheapest_forward_s(slow, HAND_LIMITS) == pytest.approx(1 + 1 / 9)  # now the mixed step is the cheaper
    # a measured grid that dips with the batch: batch 4 at 300 tokens is 0.2 s, under batch 1;
    # past batch 4 the profile extrapolates the dip further, so the run's batch limit matters
    dips = LatencyProfile.from_dict({**HAND, "decode": {"batch": [1, 4], "context": [100, 300],
                                                         "seconds": [[0.5, 0.7], [0.3, 0.2]]}})
    assert cheapest_forward_s(dips, HAND_LIMITS) == pytest.approx(min(
        dips.decode_step_time(4, 300), dips.decode_step_time(4, 1.0), 1 + 1 / 9))
    wider = Limits(max_batch=6, max_forward_tokens=20, max_context=300)
    assert cheapest_forward_s(dips, wider) == pytest.approx(dips.decode_step_time(6, 300))
    assert cheapest_forward_s(dips, wider) < cheapest_forward_s(dips, HAND_LIMITS)
    # a row that falls with the context is least at the longest context the run allows
    falls = LatencyProfile.from_dict({**HAND, "decode": {"batch": [1], "context": [100, 300],
                                                          "seconds": [[0.05, 0.04]]}})
    far = Limits(max_batch=1, max_forward_tokens=20, max_context=900)
    assert cheapest_forward_s(falls, far) == pytest.approx(falls.decode_step_time(1, 900))  # 0.01 s


def test_lowest_percentile_is_that_of_the_smallest_kept():
    values = [10.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0]
    assert lowest_percentile(values, 90, 10) == pytest.approx(9.1)
    assert lowest_percentile(values, 90, 5) == pytest.approx(4.6)  # p90 of 1..5
    for keep in (0, 11):
        with pytest.raises(ValueError):
            lowest_percentile(values, 90, keep)


def test_reach_says_which_goals_no_scheduler_can_meet(hand):
    prompts = [20] * 9 + [1]  # p90 of the cheapest prefills of the 10 kept: 4 s (nine of 20 tokens)
    baseline = {"goodput": 1.0, "p90_ttft_ms": 10_000.0, "p90_tpot_ms": 400.0}
    out = reach(prompts, 5.0, hand, HAND_LIMITS, baseline, GOALS)
    assert out["requests"] == 10 and out["keep"] == 10  # ceil(0.99 x 10)
    f = out["figures"]
    # goodput: 1.5 x 1.0 asked; at most 10 requests by the last send at 5 s
    assert f["goodput"] == {"asks": 1.5, "bound": 2.0, "reachable": True}
    assert f["p90_ttft_ms"]["asks"] == pytest.approx(5000.0)
    assert f["p90_ttft_ms"]["bound"] == pytest.approx(4000.0) and f["p90_ttft_ms"]["reachable"]
    assert f["p90_tpot_ms"]["asks"] == pytest.approx(320.0)
    assert f["p90_tpot_ms"]["bound"] == pytest.approx(401.0)  # decode(1, 1 token): 0.5 - 0.2 x 99 / 200 s
    assert f["p90_tpot_ms"]["reachable"] is False
    tight = reach(prompts, 10.0, hand, HAND_LIMITS, {"goodput": 1.0, "p90_ttft_ms": 6000.0, "p90_tpot_ms": None},
                  GOALS)
    assert tight["figures"]["goodput"]["reachable"] is False  # 1.5 asked, 1.0 at most
    assert tight["figures"]["p90_ttft_ms"]["reachable"] is False  # 3,000 ms asked, 4,000 at least
    floor_ms = cheapest_forward_s(hand, HAND_LIMITS) * 1e3
    assert tight["figures"]["p90_tpot_ms"] == {"asks": None, "bound": pytest.approx(floor_ms), "reachable": None}
    untimed = reach(prompts, 5.0, hand, HAND_LIMITS, baseline, GOALS, tpot=False)  # the real services
    assert untimed["figures"]["p90_tpot_ms"] == {"asks": pytest.approx(320.0), "bound": None, "reachable": None}
    with pytest.raises(ValueError):
        reach([0, 5], 1.0, hand, HAND_LIMITS, baseline, GOALS)


@pytest.mark.parametrize("mode", ["aggregated", "static", "dopd"])
def test_no_request_the_simulator_serves_beats_its_bounds(mode):
    """The bounds hold for every request of every mode, chunked prefill included: aggregated's
    2,048-token chunks prefill a long prompt faster than one forward of it would (the naive
    bound, prefill_time(prompt), fails there), never faster than the cheapest split."""
    p = load_profile("llama3-8b-h100")
    reqs = generate("phase-shift", 8, 10, seed=0, burstiness=0.5, max_context=8192)
    limits = Limits(max_batch=64, max_forward_tokens=8192 + 64, max_context=8192)
    cost = cheapest_prefill_s(p, max(r.prompt_tokens for r in reqs), limits)
    out = simulate(reqs, SimConfig(p, 4, mode=mode, predictor="ewma", chunk_tokens=2048, max_batch_size=64,
                                   prefill_token_budget=8192))
    served = [r for r in out.results if r.ok]
    assert len(served) > 0.9 * len(reqs)
    eps = 1e-9
    floor = cheapest_forward_s(p, limits)
    assert all(r.ttft >= cost[r.prompt_tokens] - eps for r in served)
    assert all(r.tpot >= floor - eps for r in served if r.tpot is not None)
    if mode == "aggregated":
        assert any(r.ttft < p.prefill_time(r.prompt_tokens) - 1e-3 for r in served)


def test_the_bounds_hold_through_role_switches_and_migrations():
    """dopd on 8 workers at a load where the planner switches roles and moves running requests
    (a moved request's KV travels; a replayed one is prefilled again): no request beats its bounds.
    On llama3-8b-h100-v1 (the profile before the 2026-12-07 recalibration): this load was chosen so
    that its slower prefill makes the planner switch roles and move requests; `dopd-split`, as dopd
    would choose aggregation here and move nothing."""
    p = load_profile("llama3-8b-h100-v1")
    reqs = generate("phase-shift", 20, 30, seed=0, burstiness=0.5, max_context=8192)
    limits = Limits(max_batch=256, max_forward_tokens=8192 + 256, max_context=8192)
    out = simulate(reqs, SimConfig(p, 8, mode="dopd-split", split=(5, 3), predictor="ewma", max_batch_size=256,
                                   prefill_token_budget=8192, kv_blocks=4096))
    assert sum(s["migrated"] for s in out.switches) > 0, "no request moved: the test would not exercise a move"
    cost = cheapest_prefill_s(p, max(r.prompt_tokens for r in reqs), limits)
    floor = cheapest_forward_s(p, limits)
    served = [r for r in out.results if r.ok]
    assert all(r.ttft >= cost[r.prompt_tokens] - 1e-9 for r in served)
    assert all(r.tpot >= floor - 1e-9 for r in served if r.tpot is not None)


def test_dopd_reach_on_a_comparison_and_in_its_tables(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert dopd(["bench", "compare", "--modes", "aggregated,static,dopd", "--engine", "des", "--profile",
                 "llama3-8b-h100", "--workers", "3", "--workload", "phase-shift", "--rate", "6", "--duration", "8",
                 "--max-context", "8192", "--slo-ttft", "300", "--slo-tpot", "40", "--out", str(out),
                 "--no-progress", "--sweep-from", "6", "--sweep-runs", "2"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    bounds = doc["reach"]["run"]
    base = doc["dopd_vs_best_baseline"]["baseline"]
    assert bounds["baseline"] == base and bounds["requests"] == doc["modes"]["dopd"]["requests"]
    asks = bounds["figures"]["p90_ttft_ms"]["asks"]
    assert asks == pytest.approx(0.5 * doc["modes"][base]["p90_ttft_ms"])
    assert "## What any scheduler could reach" in (out / "compare.md").read_text()
    rows = doc["reach"]["sweeps"]
    assert [r["rate"] for r in rows] == sorted({r["rate"] for r in rows}) and rows[0]["rate"] == 6.0
    for row in rows:  # each rate's baseline is the better one there
        assert row["baseline"] in ("static", "aggregated") and 0 <= row["baseline_attainment"] <= 1
    capsys.readouterr()
    assert dopd(["reach", str(out)]) == 0
    again = json.loads((out / "reach.json").read_text())
    assert again["run"] == bounds and again["sweeps"] == rows  # the workload built again from the command
    assert "dopd reach" in capsys.readouterr().out and (out / "reach.md").exists()
    assert dopd(["reach", str(tmp_path / "nothing")]) == 2


def test_dopd_reach_gives_no_bounds_for_a_real_model(tmp_path, capsys):
    """A real model's profile is measured, not what costs its forwards (SmolLM2 on the CPU runs
    under its profile's prefill): no bound is claimed for it."""
    doc = {"config": {"command": "dopd bench compare --model smollm2 --profile smollm2-cpu1 --workers 2 "
                                 "--workload mix --rate 0.1 --slo-ttft 2000 --slo-tpot 250 --out x"},
           "modes": {"static": {"goodput": 0.1, "p90_ttft_ms": 1000.0, "p90_tpot_ms": 200.0}},
           "dopd_vs_best_baseline": {"baseline": "static"}}
    (tmp_path / "compare.json").write_text(json.dumps(doc))
    assert dopd(["reach", str(tmp_path)]) == 2
    assert "real model" in capsys.readouterr().err and not (tmp_path / "reach.json").exists()
