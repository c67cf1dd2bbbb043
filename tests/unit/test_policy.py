"""services/planner/policy.py: each rule on its own, step by step with explicit times, then the
invariants over a randomized run."""

from __future__ import annotations

import random

import pytest

from common.load import Split, WorkerLoad
from services.planner.policy import DECODE, PREFILL, PolicyConfig, ReconfigPolicy, RoleChange

# Rules off unless a test turns one on: act at once, no cooldown, no emergencies.
QUIET = dict(cooldown_s=0.0, persist_intervals=1, emergency_prefill_queue_tokens=10**9, emergency_kv_usage=1.0)


def pol(**kw) -> ReconfigPolicy:
    return ReconfigPolicy(PolicyConfig(**{**QUIET, **kw}))


def P(wid: str, tokens: int = 0, switching: bool = False) -> WorkerLoad:
    return WorkerLoad(wid, PREFILL, prefill_waiting_tokens=tokens, switching=switching)


def D(wid: str, running: int = 0, waiting: int = 0, kv_used: int = 0, switching: bool = False) -> WorkerLoad:
    return WorkerLoad(wid, DECODE, decode_running=running, decode_waiting=waiting, kv_blocks_used=kv_used,
                      kv_blocks_total=100, switching=switching)


def ids(changes: list[RoleChange]) -> list[tuple[str, str]]:
    return [(c.worker_id, c.to_role) for c in changes]


def test_config_is_validated():
    for bad in (dict(max_switches_per_interval=0), dict(min_per_role=0), dict(persist_intervals=0),
                dict(emergency_kv_usage=0.0), dict(cooldown_s=-1.0), dict(min_diff=0)):
        with pytest.raises(ValueError):
            PolicyConfig(**bad)


# -- hysteresis -----------------------------------------------------------------------------------

def test_spare_capacity_moves_only_across_a_large_gap():
    """When the role a move would grow already has the workers its need asks for, only a gap of
    spare_min_diff or more moves anyone; a role short of its need moves at a gap of one."""
    ws = [P("a"), D("b"), D("c"), D("d"), D("e"), D("f")]
    spare = {"prefill_need_workers": 1, "decode_need_workers": 1}
    p = pol(spare_min_diff=3, max_switches_per_interval=5)
    assert p.decide(0.0, ws, Split(3, 3, detail=spare)) == []  # +2 prefill of spare only: stay
    assert len(p.decide(10.0, ws, Split(4, 2, detail=spare))) == 3  # +3: the gap is large enough
    short = {"prefill_need_workers": 2, "decode_need_workers": 1}
    assert ids(pol(spare_min_diff=3).decide(0.0, ws, Split(2, 4, detail=short))) == [("b", PREFILL)]



def test_target_must_persist():
    p = pol(persist_intervals=3)
    ws = [P("a"), D("b", running=5), D("c", running=1), D("d", running=3)]
    assert p.decide(0.0, ws, Split(2, 2)) == []  # 1st call wanting +1 prefill
    assert p.decide(10.0, ws, Split(2, 2)) == []  # 2nd
    changes = p.decide(20.0, ws, Split(2, 2))  # 3rd: act; c holds the fewest requests
    assert ids(changes) == [("c", PREFILL)]
    assert changes[0].reason.startswith("forecast") and not changes[0].emergency


def test_no_flapping_between_two_splits():
    p = pol(persist_intervals=2)
    ws = [P("a"), P("b"), D("c"), D("d")]
    for i in range(10):  # the target wobbles around the current 2/2: the streak never reaches 2
        assert p.decide(10.0 * i, ws, Split(3, 1) if i % 2 else Split(1, 3)) == []
    # Noise inside the current split (or a reached target) is no reason to move at all.
    assert p.decide(200.0, ws, Split(2, 2)) == [] and p.decide(210.0, ws, Split(2, 2)) == []


def test_a_gap_in_the_streak_restarts_it():
    p = pol(persist_intervals=2)
    ws = [P("a"), D("b"), D("c"), D("d")]
    assert p.decide(0.0, ws, Split(2, 2)) == []
    assert p.decide(10.0, ws, Split(1, 3)) == []  # back to the current split: streak 0
    assert p.decide(20.0, ws, Split(2, 2)) == []  # 1 again
    assert ids(p.decide(30.0, ws, Split(2, 2))) == [("b", PREFILL)]


def test_min_diff():
    p = pol(min_diff=2, max_switches_per_interval=5)
    ws = [P("a"), D("b"), D("c"), D("d"), D("e")]
    for t in (0.0, 10.0, 20.0):
        assert p.decide(t, ws, Split(2, 3)) == []  # only 1 off
    assert ids(p.decide(30.0, ws, Split(3, 2))) == [("b", PREFILL), ("c", PREFILL)]  # 2 off: moves both


def test_target_for_another_total_is_scaled():
    p = pol()
    ws = [P("a"), D("b"), D("c"), D("d")]
    # 4/4 computed for 8 workers -> 2/2 of the 4 there are.
    assert ids(p.decide(0.0, ws, Split(4, 4))) == [("b", PREFILL)]
    assert pol().decide(0.0, ws, Split(0, 0)) == []  # no usable target


# -- cooldown and the cap -------------------------------------------------------------------------

def test_cooldown_counts_from_the_recorded_switch():
    p = pol(cooldown_s=30.0)
    ws = [P("a"), D("b"), D("c"), D("d"), D("e"), D("f")]
    (change,) = p.decide(0.0, ws, Split(3, 3))
    assert change.worker_id == "b"
    # Under way (issued, not yet reported): no further forecast move, whatever the cooldown.
    assert p.decide(50.0, ws, Split(3, 3)) == []
    p.record_switch(100.0, change, ok=True)  # done at t = 100
    ws = [P("a"), P("b"), D("c"), D("d"), D("e"), D("f")]
    assert p.decide(110.0, ws, Split(3, 3)) == []
    assert p.decide(129.9, ws, Split(3, 3)) == []
    assert ids(p.decide(130.0, ws, Split(3, 3))) == [("c", PREFILL)]


def test_a_worker_reporting_switching_blocks_forecast_moves():
    p = pol()
    ws = [P("a"), D("b", switching=True), D("c"), D("d")]
    assert p.decide(0.0, ws, Split(2, 2)) == []


def test_switch_seen_done_without_record_starts_cooldown():
    p = pol(cooldown_s=30.0)
    ws = [P("a"), D("b"), D("c"), D("d")]
    assert ids(p.decide(0.0, ws, Split(3, 1))) == [("b", PREFILL)]
    assert p.pending == {"b": PREFILL}
    ws = [P("a"), P("b"), D("c"), D("d")]  # b now reports prefill, done switching
    assert p.decide(40.0, ws, Split(3, 1)) == []  # seen done at 40: cooldown until 70
    assert p.pending == {}
    assert ids(p.decide(70.0, ws, Split(3, 1))) == [("c", PREFILL)]


def test_forgotten_change_times_out():
    p = pol(pending_timeout_s=60.0)
    ws = [P("a"), D("b"), D("c"), D("d")]
    assert ids(p.decide(0.0, ws, Split(3, 1))) == [("b", PREFILL)]
    assert p.decide(60.0, ws, Split(3, 1)) == []  # still under way
    assert ids(p.decide(60.1, ws, Split(3, 1))) == [("b", PREFILL)]  # dropped, b still decode: again


def test_cap_on_changes_per_call():
    p = pol(max_switches_per_interval=2)
    ws = [P("a"), D("b", running=9), D("c", running=1), D("d", running=2), D("e", running=0), D("f", running=7)]
    assert ids(p.decide(0.0, ws, Split(5, 1))) == [("e", PREFILL), ("c", PREFILL)]


# -- which worker ---------------------------------------------------------------------------------

def test_decode_to_prefill_takes_the_fewest_requests_then_the_id():
    ws = [P("a"), D("d3", running=2, waiting=0), D("d1", running=1, waiting=1), D("d2", running=0, waiting=3)]
    assert ids(pol().decide(0.0, ws, Split(2, 2))) == [("d1", PREFILL)]  # d1 and d3 hold 2: by id


def test_prefill_to_decode_takes_the_least_queued_tokens_then_the_id():
    ws = [P("p2", tokens=100), P("p3", tokens=50), P("p1", tokens=50), D("d")]
    assert ids(pol().decide(0.0, ws, Split(2, 2))) == [("p1", DECODE)]


def test_failed_switch_benches_that_worker_and_starts_no_cooldown():
    p = pol(cooldown_s=30.0)
    ws = [P("a"), D("b"), D("c", running=4), D("d", running=5)]
    (change,) = p.decide(0.0, ws, Split(2, 2))
    assert change.worker_id == "b"
    p.record_switch(5.0, change, ok=False)
    assert ids(p.decide(10.0, ws, Split(2, 2))) == [("c", PREFILL)]  # not b, and no cooldown wait


# -- emergencies ----------------------------------------------------------------------------------

EMERG = dict(cooldown_s=1000.0, persist_intervals=100, emergency_prefill_queue_tokens=1000,
             emergency_kv_usage=0.9)


def test_prefill_queue_emergency_bypasses_hysteresis_and_cooldown():
    p = pol(**EMERG)
    p.record_switch(0.0, RoleChange("x", DECODE, "forecast"), ok=True)  # cooldown until t = 1000
    ws = [P("a", tokens=1500), P("b", tokens=600), D("c", running=3), D("d", running=1), D("e", running=2)]
    # Queue per prefill worker 1050 > 1000: d (fewest requests) turns prefill, target or not.
    (change,) = p.decide(10.0, ws, Split(2, 3))
    assert (change.worker_id, change.to_role, change.emergency) == ("d", PREFILL, True)
    assert "prefill queue 1050" in change.reason
    # One emergency move toward a role at a time: while d's is under way, nothing more.
    assert p.decide(20.0, ws, Split(2, 3)) == []
    p.record_switch(25.0, change, ok=True)
    ws = [P("a", tokens=2000), P("b", tokens=1500), P("d"), D("c", running=3), D("e", running=2)]
    assert ids(p.decide(30.0, ws, Split(2, 3))) == [("e", PREFILL)]  # 1167 still > 1000
    # Below the threshold: nothing (the forecast path still waits for its 100 calls).
    ws = [P("a", tokens=1000), P("b"), D("c"), D("e")]
    assert p.decide(40.0, ws, Split(2, 2)) == []


def test_kv_emergency_moves_the_least_queued_prefill_worker():
    p = pol(**EMERG)
    ws = [P("a", tokens=300), P("b", tokens=10), P("c", tokens=10), D("d", kv_used=95), D("e", kv_used=90)]
    (change,) = p.decide(0.0, ws, Split(3, 2))  # usage 185/200 = 0.925 > 0.9
    assert (change.worker_id, change.to_role) == ("b", DECODE)
    assert change.reason == "emergency: decode KV usage 0.93 > 0.90"


def test_both_roles_pressed_moves_nothing():
    ws = [P("a", tokens=5000), P("b", tokens=5000), D("c", kv_used=99), D("d", kv_used=99)]
    assert pol(**EMERG).decide(0.0, ws, Split(2, 2)) == []


def test_missing_role_is_an_emergency_once_seen_twice():
    p = pol(**EMERG)
    ws = [D("a", kv_used=99), D("b", kv_used=99, running=3), D("c", kv_used=99, running=1)]
    # Once only, a missing role may be a heartbeat not in yet (a worker starting): nothing moves,
    # not even for the KV pressure.
    assert p.decide(0.0, ws, Split(1, 2)) == []
    assert ids(p.decide(1.0, ws, Split(1, 2))) == [("a", PREFILL)]  # outranks the KV pressure
    assert p.decide(2.0, ws, Split(1, 2)) == []  # a counts as prefill while it switches
    # A prefill worker seen in between restarts the count.
    q = pol(**EMERG)
    assert q.decide(0.0, ws, Split(1, 2)) == []
    q.decide(1.0, [P("p"), *ws], Split(1, 3))
    assert q.decide(2.0, ws, Split(1, 2)) == []


def test_emergency_never_takes_the_last_serving_worker_nor_a_switching_one():
    p = pol(**EMERG)
    # c is the only decode worker that serves (b is switching): c must stay.
    assert p.decide(0.0, [P("a", tokens=5000), D("b", switching=True), D("c")], Split(2, 1)) == []
    # Two serving decode workers: take c, though b (switching) holds fewer requests.
    ws = [P("a", tokens=5000), D("b", switching=True), D("c", running=5), D("d", running=9)]
    assert ids(p.decide(1.0, ws, Split(2, 2))) == [("c", PREFILL)]


def test_min_per_role_holds_for_forecast_moves():
    p = pol(min_per_role=2, max_switches_per_interval=5)
    ws = [P("a"), P("b"), P("c"), D("d"), D("e")]
    # 1/4 wanted, clamped to 2/3: one move, prefill keeps 2.
    assert ids(p.decide(0.0, ws, Split(1, 4))) == [("a", DECODE)]
    # 3 workers < 2 * min_per_role: no split is in range, so hold.
    assert pol(min_per_role=2).decide(0.0, [P("a"), P("b"), D("d")], Split(1, 2)) == []


# -- invariants over a randomized run -------------------------------------------------------------

def test_invariants_randomized():
    rng = random.Random(11)
    seen: list[RoleChange] = []
    for _ in range(40):
        cfg = PolicyConfig(cooldown_s=rng.choice([0.0, 5.0, 30.0]), max_switches_per_interval=rng.randint(1, 3),
                           min_diff=rng.randint(1, 2), persist_intervals=rng.randint(1, 3),
                           emergency_prefill_queue_tokens=rng.choice([100, 1000]),
                           emergency_kv_usage=rng.choice([0.5, 0.9]), min_per_role=rng.randint(1, 2))
        p, now, issued = ReconfigPolicy(cfg), 0.0, []
        for _ in range(60):
            now += rng.uniform(0.5, 20.0)
            n = rng.randint(0, 8)
            ws = [WorkerLoad(f"w{i}", rng.choice([PREFILL, DECODE]), prefill_waiting_tokens=rng.randint(0, 2000),
                             decode_running=rng.randint(0, 9), decode_waiting=rng.randint(0, 3),
                             kv_blocks_used=rng.randint(0, 100), kv_blocks_total=100,
                             switching=rng.random() < 0.2) for i in range(n)]
            total = rng.randint(0, 10)
            target = Split(a := rng.randint(0, total), total - a)
            changes = p.decide(now, ws, target)

            by_id = {w.worker_id: w for w in ws}
            assert len(changes) <= cfg.max_switches_per_interval
            assert len({c.worker_id for c in changes}) == len(changes)
            assert len({c.to_role for c in changes}) <= 1
            # The changes under way that the decision saw (after it settled finished ones).
            under_way = {wid: r for wid, r in p.pending.items() if wid not in {c.worker_id for c in changes}}
            role = {w.worker_id: under_way.get(w.worker_id, w.role) for w in ws}
            for c in changes:
                w = by_id[c.worker_id]
                assert not w.switching and c.worker_id not in under_way
                assert c.to_role in (PREFILL, DECODE) and c.to_role != w.role
            for r in (PREFILL, DECODE):
                serving = [w for w in ws if role[w.worker_id] == r and not w.switching
                           and w.worker_id not in under_way]
                moved = sum(1 for c in changes if by_id[c.worker_id].role == r)
                if moved:
                    assert len(serving) - moved >= cfg.min_per_role
                after = sum(1 for w in ws if role[w.worker_id] == r) - moved + \
                    sum(1 for c in changes if c.to_role == r)
                assert 0 <= after <= n
            issued += changes
            seen += changes
            # The planner reports some outcomes, in any order, ok or not.
            rng.shuffle(issued)
            while issued and rng.random() < 0.5:
                p.record_switch(now + rng.uniform(0, 1), issued.pop(), ok=rng.random() < 0.7)
    # Not vacuous: both paths and both directions were exercised.
    assert sum(c.emergency for c in seen) > 20 and sum(not c.emergency for c in seen) > 20
    assert {c.to_role for c in seen} == {PREFILL, DECODE}


def test_a_decode_worker_leaves_only_while_the_rest_can_seat_its_requests():
    seats = {"decode_c_tpot": 8}  # requests a decode worker runs within the TPOT SLO (split.decode_need)
    # Prefill is pressed, but the two decode workers hold 14 requests: one alone would run 14 > 8.
    ws = [P("a", tokens=5000), D("c", running=7), D("d", running=7)]
    assert pol(**EMERG).decide(0.0, ws, Split(1, 2, detail=seats)) == []
    ws = [P("a", tokens=5000), D("c", running=4), D("d", running=3, waiting=1)]  # 8: fits
    assert ids(pol(**EMERG).decide(0.0, ws, Split(1, 2, detail=seats))) == [("c", PREFILL)]
    # Forecast moves too: the target wants two decode workers to go, the 12 requests fit in two.
    ws = [P("a"), D("c", running=4), D("d", running=4), D("e", running=4)]
    assert len(pol(max_switches_per_interval=5).decide(0.0, ws, Split(3, 1, detail=seats))) == 1
    assert len(pol(max_switches_per_interval=5).decide(0.0, ws, Split(3, 1))) == 2  # no seats known: no limit
