"""The dispatch core (services/gateway/dispatch.py) that the gateway and the simulator share: the
path by mode and policy, the decode order and its seats, the prefill choice, lost workers last,
and the refusal of a seat wait that cannot end in time. The gateway's integration tests and the
simulator's (whose figures did not move when it took this core over) cover both drivers."""

from __future__ import annotations

import pytest

from common.load import SLO
from common.modes import serving_mode
from common.profile import load_profile
from services.gateway.dispatch import LOST_WORKER_S, NO_SEAT, Dispatcher
from services.gateway.lifecycle import RequestCore
from services.gateway.routing import WorkerView
from services.gateway.scheduling import Path, SchedulingPolicy
from services.simulate.cluster import Cluster
from services.simulate.events import EventLoop

PROFILE = load_profile("llama3-8b-h100")
SLO_40 = SLO(1.0, 0.040)


def seats(admission: bool = True) -> SchedulingPolicy:
    return SchedulingPolicy(long_above=1000, ultra_short_up_to=16, batch_token_cap=2048, batch_wait_cap_s=0.05,
                            slo=SLO_40, profile=PROFILE, admission=admission, mean_output=200)


def view(worker_id: str, free: int = 100) -> WorkerView:
    return WorkerView(worker_id, worker_id, free, 16)


def test_path_by_mode_and_policy():
    policy = seats()
    assert Dispatcher(serving_mode("aggregated")).path(5000, policy) is Path.ULTRA_SHORT
    assert Dispatcher(serving_mode("static")).path(10, None) is Path.LONG
    dopd = Dispatcher(serving_mode("dopd"))
    assert dopd.path(5000, policy) is Path.LONG and dopd.path(500, policy) is Path.SHORT
    assert dopd.path(10, policy) is Path.ULTRA_SHORT


def test_decode_order_balances_and_puts_lost_workers_last():
    d = Dispatcher(serving_mode("static"))
    workers = [view("a"), view("b"), view("c", free=1)]
    d.join_decode("a", "r1", 100, 10)
    assert [w.worker_id for w in d.decode_order(workers, 100, 10, None, now=0.0)] == ["b", "a", "c"]
    d.lost("b", now=0.0)
    assert [w.worker_id for w in d.decode_order(workers, 100, 10, None, now=1.0)] == ["a", "c", "b"]
    assert [w.worker_id for w in d.decode_order(workers, 100, 10, None, now=LOST_WORKER_S)] == ["b", "a", "c"]
    d.leave_decode("a", "r1")
    assert not any(d.decode_load.counts.values())


def test_seats_fill_and_a_hopeless_wait_is_refused_with_why():
    d = Dispatcher(serving_mode("dopd"))
    policy = seats()
    worker = view("d0", free=100_000)
    held = 0
    while d.has_seat(worker, 4000, 400, policy):
        d.join_decode("d0", f"r{held}", 4000, 400)
        held += 1
    assert held > 1  # a batch of long contexts fills its seats within 40 ms a step
    assert d.decode_order([worker], 4000, 400, policy, now=0.0) == []
    assert NO_SEAT in d.no_seat(policy)
    why = d.hopeless_seat_wait([worker], 4000, 400, policy, queued=0, budget_s=0.001)
    assert why is not None and "a seat is predicted to free in" in why
    assert d.hopeless_seat_wait([worker], 4000, 400, policy, queued=0, budget_s=1e9) is None
    assert d.hopeless_seat_wait([worker], 4000, 400, None, queued=0, budget_s=0.0) is None  # no policy: no seats


def test_prefill_choice_prefers_then_balances_then_distrusts_the_lost():
    d = Dispatcher(serving_mode("static"))
    workers = [view("p0"), view("p1")]
    d.prefill_ledger.sent("p0", "r1", 500, now=0.0)
    assert d.pick_prefill(workers, now=0.0).worker_id == "p1"
    assert d.pick_prefill(workers, now=0.0, prefer="p0").worker_id == "p0"
    d.lost("p1", now=0.0)
    assert d.pick_prefill(workers, now=1.0).worker_id == "p0"
    assert d.pick_prefill([view("p1")], now=1.0).worker_id == "p1"  # the only one left
    assert d.least_loaded_prefill_work(["p0", "p1"], now=2.0) == (0, 0.0)
    assert d.least_loaded_prefill_work(["p0"], now=2.0) == (500, 2.0)


@pytest.mark.parametrize("time_scale", [1.0, 10.0])
def test_busy_seconds_are_profile_seconds(time_scale):
    d = Dispatcher(serving_mode("static"), time_scale)
    d.prefill_ledger.sent("p0", "r1", 500, now=0.0)
    assert d.least_loaded_prefill_work(["p0"], now=5.0) == (500, pytest.approx(5.0 / time_scale))


def test_the_gateway_and_the_simulator_drive_the_same_core():
    core = RequestCore(backend=None, tokenizer=None)
    cluster = Cluster(EventLoop(), PROFILE, 1, 1, kv_blocks=64, block_size=16, max_batch_size=8,
                      prefill_token_budget=512, link_gbps=400.0, request_timeout_s=60.0)
    assert type(core.dispatch) is type(cluster.dispatch) is Dispatcher
