"""Mixed workers in the planner's pure cores: the policy's moves toward a configuration with mixed
workers (services/planner/policy.py), the configuration core's choice and its hysteresis
(services/planner/configuration.py), and the dispatcher's choice of a mixed worker to prefill a
prompt itself (services/gateway/dispatch.py)."""

from __future__ import annotations

import pytest

from common.load import SLO, IntervalLoad, LengthDist, LoadForecast, Split, WorkerLoad
from common.modes import serving_mode
from common.profile import load_profile
from services.gateway.dispatch import Dispatcher
from services.gateway.routing import WorkerView
from services.gateway.scheduling import SchedulingPolicy
from services.planner.configuration import (
    DERATING_TTL_S,
    HEADROOM,
    ObservedDerating,
    choose_configuration,
    split_capacity,
)
from services.planner.policy import DECODE, MIXED, PREFILL, PolicyConfig, ReconfigPolicy
from services.planner.split import PoolShape, compute_split

QUIET = dict(cooldown_s=0.0, persist_intervals=2, emergency_prefill_queue_tokens=10**9, emergency_kv_usage=1.0)
AGGREGATED = Split(0, 0, mixed=4, chunk_budget=512)
SHAPE = PoolShape(kv_blocks=4096, block_size=16, max_batch_size=256, prefill_token_budget=8192)
H100 = load_profile("llama3-8b-h100")
LOOSE = SLO(1.0, 0.05)


def w(wid: str, role: str, running: int = 0, switching: bool = False) -> WorkerLoad:
    return WorkerLoad(wid, role, decode_running=running, kv_blocks_total=100, switching=switching)


def moves(changes) -> list[tuple[str, str]]:
    return sorted((c.worker_id, c.to_role) for c in changes)


def test_toward_aggregation_every_worker_moves_at_once_and_prefill_may_reach_zero():
    policy = ReconfigPolicy(PolicyConfig(**QUIET))
    workers = [w("p0", PREFILL), w("p1", PREFILL), w("d0", DECODE, 5), w("d1", DECODE)]
    # No KV moves: no hysteresis, no cap of switches an interval.
    assert moves(policy.decide(0.0, workers, AGGREGATED)) == [
        ("d0", MIXED), ("d1", MIXED), ("p0", MIXED), ("p1", MIXED)]
    done = [w("p0", MIXED), w("p1", MIXED), w("d0", MIXED, 5), w("d1", MIXED)]
    assert policy.decide(1.0, done, AGGREGATED) == []  # no prefill worker is no emergency now


def test_back_to_a_split_a_prefill_worker_comes_first():
    policy = ReconfigPolicy(PolicyConfig(**QUIET))
    mixed = [w("m0", MIXED, 3), w("m1", MIXED, 1), w("m2", MIXED, 2), w("m3", MIXED, 4)]
    split = Split(1, 3)
    assert policy.decide(0.0, mixed, split) == []  # hysteresis for a move that migrates
    first = policy.decide(1.0, mixed, split)
    # The least loaded mixed worker becomes the prefill worker (its decodes migrate); the others
    # stay mixed until it is there: with no prefill worker, only mixed workers can prefill.
    assert moves(first) == [("m1", PREFILL)]
    policy.record_switch(2.0, first[0], ok=True)
    after = [w("m0", MIXED, 3), w("m1", PREFILL), w("m2", MIXED, 2), w("m3", MIXED, 4)]
    assert moves(policy.decide(2.5, after, split)) == [("m0", DECODE), ("m2", DECODE), ("m3", DECODE)]


def test_the_last_worker_that_decodes_never_leaves():
    policy = ReconfigPolicy(PolicyConfig(**{**QUIET, "persist_intervals": 1}))
    workers = [w("m0", MIXED, 3)]
    assert policy.decide(0.0, workers, Split(1, 0)) == []


def forecast(rate: float) -> LoadForecast:
    return LoadForecast(rate, LengthDist.constant(600), LengthDist.constant(200), "test")


def target_split(rate: float) -> Split:
    return compute_split(forecast(rate), H100, LOOSE, 8, kv_blocks=4096, block_size=16, max_batch_size=256,
                         prefill_token_budget=8192)


def test_the_core_keeps_the_current_family_while_it_carries_the_load():
    aggregated = Split(0, 0, mixed=8, chunk_budget=512)
    for current in (target_split(1.0), aggregated):
        c = choose_configuration(forecast(1.0), H100, LOOSE, 8, SHAPE, target_split(1.0), current)
        assert bool(c.target.mixed) == bool(current.mixed), c.why
        assert c.current is not None and c.runner_up is not None
    first = choose_configuration(forecast(1.0), H100, LOOSE, 8, SHAPE, target_split(1.0), None)
    assert first.why.startswith("first choice") and first.predicted.rate >= first.runner_up.rate
    assert set(first.record()) == {"target", "predicted", "runner_up", "current", "why"}


def test_the_core_changes_family_past_the_headroom_for_a_predicted_gain():
    split = target_split(1.0)
    best_split = max(split_capacity(forecast(1.0), H100, LOOSE, p, 8 - p, SHAPE).rate for p in range(1, 8))
    rate = best_split  # past HEADROOM of the split family's capacity
    c = choose_configuration(forecast(rate), H100, LOOSE, 8, SHAPE, target_split(rate), split)
    gain = c.predicted.rate / c.current.rate if c.current.rate else float("inf")
    assert c.target.mixed and c.why.startswith("changed") and gain >= 1.15
    assert rate > HEADROOM * c.current.rate


def test_under_a_stall_slo_small_budgets_win():
    split = compute_split(forecast(50), H100, LOOSE, 8, kv_blocks=4096, block_size=16, max_batch_size=256,
                          prefill_token_budget=8192)
    stall = SLO(1.0, 0.05, itl_s=0.032)
    choice = choose_configuration(forecast(50), H100, stall, 8, SHAPE, split, None)
    assert choice.target.mixed == 8 and choice.target.chunk_budget <= 1024
    assert H100.mixed_step_time(64, 2048, choice.target.chunk_budget) <= 0.032 + 0.01


def view(wid: str, budget: int = 512) -> WorkerView:
    return WorkerView(wid, wid, 1000, 16, chunk_budget=budget)


def test_a_mixed_worker_takes_a_prompt_whose_chunks_fit_else_it_is_disaggregated():
    d = Dispatcher(serving_mode("dopd"))
    policy = SchedulingPolicy.for_forecast(forecast(50), H100, LOOSE, 8192, 16)
    mixed = [view("m0"), view("m1")]
    d.local_ledger.sent("m0", "a", 4000, 0.0)
    chosen = d.local_worker(mixed, 600, policy, prefill_serving=True, now=0.0)
    assert chosen is not None and chosen.worker_id == "m1"  # the one with nothing queued first
    assert d.local_refusal(chosen, 600, policy) is None
    # A prompt whose chunks cannot finish within the TTFT SLO goes to a prefill worker.
    assert d.local_worker(mixed, 200_000, policy, prefill_serving=True, now=0.0) is None
    # With no prefill worker, a mixed worker takes it anyway, and admission says why it is late.
    late = d.local_worker(mixed, 200_000, policy, prefill_serving=False, now=0.0)
    assert late is not None and "mixed worker" in d.local_refusal(late, 200_000, policy)
    # No policy (no profile): a mixed worker with no prompt of its own queued, or none.
    assert d.local_worker(mixed, 600, None, prefill_serving=True, now=0.0).worker_id == "m1"
    d.local_ledger.sent("m1", "b", 10, 0.0)
    assert d.local_worker(mixed, 600, None, prefill_serving=True, now=0.0) is None


def interval(t: float, arrivals: int, ttft: float, tpot: float) -> IntervalLoad:
    return IntervalLoad(start=t, duration=1.0, arrivals=arrivals, ttft=(ttft,) * arrivals, tpot=(tpot,) * arrivals)


def test_a_family_that_misses_the_slos_where_its_model_said_it_carries_is_derated():
    slo = SLO(1.0, 0.05)
    seen = ObservedDerating()
    bad = [interval(t, 10, 0.2, 0.09) for t in range(5)]  # 10 req/s, every TPOT past the SLO
    seen.observe(10.0, "aggregated", bad[:4], slo, 40.0)
    assert seen.active(10.0) == {}  # too few settled intervals to judge
    seen.observe(10.0, "aggregated", bad, slo, 8.0)
    assert seen.active(10.0) == {}  # the model said 8 req/s: a miss at 10 teaches nothing
    seen.observe(10.0, "aggregated", bad, slo, 40.0)
    assert seen.active(10.0) == {"aggregated": pytest.approx(0.25)}
    good = [interval(t, 10, 0.2, 0.01) for t in range(5)]
    seen.observe(11.0, "split", good, slo, 40.0)
    assert "split" not in seen.active(11.0)
    assert seen.active(10.0 + DERATING_TTL_S) == {}  # forgotten


def test_a_derated_family_gives_way():
    split = target_split(1.0)
    aggregated = Split(0, 0, mixed=8, chunk_budget=512)
    plain = choose_configuration(forecast(1.0), H100, LOOSE, 8, SHAPE, split, None)
    family = "aggregated" if plain.target.mixed else "split"
    derated = choose_configuration(forecast(1.0), H100, LOOSE, 8, SHAPE, split, None, derating={family: 0.01})
    assert bool(derated.target.mixed) != bool(plain.target.mixed)
    assert derated.runner_up.limited_by == "observed" and derated.model_rates[family] > derated.runner_up.rate
    assert aggregated.name == "aggregated 512" and aggregated.rest_role == "mixed"
