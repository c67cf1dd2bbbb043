"""The restart decisions of `dopd up`'s supervision (services/supervisor.py), on a fake clock."""

from __future__ import annotations

import pytest

from common.errors import EXIT_MODEL_REFUSED
from services.supervisor import RestartPolicy, Supervisor


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


def test_backoff_doubles_to_the_cap():
    policy = RestartPolicy()
    assert [policy.backoff(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.backoff(10_000) == 30  # no overflow
    assert RestartPolicy(initial_backoff_s=0.1, multiplier=3, max_backoff_s=1).backoff(3) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        policy.backoff(0)


@pytest.mark.parametrize("kw", [{"initial_backoff_s": -1}, {"initial_backoff_s": 5, "max_backoff_s": 1},
                                {"multiplier": 0.5}, {"stable_after_s": -1}])
def test_bad_policies_are_refused(kw):
    with pytest.raises(ValueError):
        RestartPolicy(**kw)


def test_a_crash_is_restarted_after_the_backoff_and_counted():
    clock, sup = Clock(), Supervisor()
    sup.started("decode-0", clock())
    sup.started("decode-1", clock())
    clock.advance(10)
    r = sup.exited("decode-0", -9, clock())
    assert (r.name, r.exit_code, r.attempt, r.backoff_s, r.restarts) == ("decode-0", -9, 1, 0.5, 1)
    assert r.uptime_s == pytest.approx(10) and r.due_at == pytest.approx(clock() + 0.5)
    assert sup.pending("decode-0") == r and sup.pending("decode-1") is None
    assert sup.next_due() == r.due_at
    assert sup.due(clock.advance(0.49)) == []
    assert sup.due(clock.advance(0.01)) == [r]
    assert sup.due(clock()) == [r], "stays due until it is started"
    assert sup.restarts() == {}, "counted once done"
    sup.started("decode-0", clock())
    assert sup.due(clock.advance(100)) == [] and sup.pending("decode-0") is None and sup.next_due() is None
    assert sup.restarts() == {"decode-0": 1}


def test_exit_code_zero_is_restarted_too():
    """unless-stopped: whatever the exit code; only stop() ends it."""
    sup = Supervisor()
    sup.started("gateway", 0.0)
    r = sup.exited("gateway", 0, 1.0)
    assert r is not None and r.backoff_s == 0.5


def test_a_crash_loop_backs_off_exponentially_up_to_the_cap():
    clock, sup = Clock(), Supervisor()
    sup.started("planner", clock())
    waits = []
    for _ in range(9):
        clock.advance(1)  # dies one second after each start
        r = sup.exited("planner", 1, clock())
        waits.append(r.backoff_s)
        assert sup.due(clock.advance(r.backoff_s - 0.01)) == []
        assert [d.name for d in sup.due(clock.advance(0.01))] == ["planner"]
        sup.started("planner", clock())
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert r.attempt == 9 and r.restarts == 9 and sup.restarts() == {"planner": 9}


def test_the_backoff_resets_after_a_stable_run():
    clock, sup = Clock(), Supervisor(RestartPolicy(stable_after_s=60))
    sup.started("decode-0", clock())
    for _ in range(4):  # a streak: 0.5, 1, 2, 4
        r = sup.exited("decode-0", -9, clock.advance(2))
        clock.advance(r.backoff_s)
        sup.started("decode-0", clock())
    assert r.attempt == 4 and r.backoff_s == 4
    r = sup.exited("decode-0", -9, clock.advance(59.9))  # not quite stable: the streak goes on
    assert r.attempt == 5 and r.backoff_s == 8
    sup.started("decode-0", clock.advance(8))
    r = sup.exited("decode-0", -9, clock.advance(60))  # up a minute: a new streak
    assert r.attempt == 1 and r.backoff_s == 0.5 and r.restarts == 6 and r.uptime_s == pytest.approx(60)


def test_each_process_has_its_own_streak_and_due_is_in_time_order():
    sup = Supervisor()
    for name in ("planner", "gateway", "decode-0"):
        sup.started(name, 0.0)
    sup.exited("decode-0", -9, 1.0)
    sup.started("decode-0", 1.5)
    sup.exited("decode-0", -9, 2.0)  # attempt 2: due at 3.0
    sup.exited("gateway", -11, 2.2)  # attempt 1: due at 2.7
    sup.exited("planner", 1, 2.6)  # attempt 1: due at 3.1
    assert sup.next_due() == pytest.approx(2.7)
    assert [r.name for r in sup.due(2.8)] == ["gateway"]
    assert [(r.name, r.attempt) for r in sup.due(3.2)] == [("gateway", 1), ("decode-0", 2), ("planner", 1)]


def test_dead_again_while_pending_keeps_the_first_decision():
    sup = Supervisor()
    sup.started("decode-1", 0.0)
    first = sup.exited("decode-1", -9, 5.0)
    assert sup.exited("decode-1", -9, 5.3) == first


def test_a_failed_start_schedules_the_next_attempt():
    sup = Supervisor()
    sup.started("decode-0", 0.0)
    sup.exited("decode-0", -9, 10.0)
    again = sup.failed_to_start("decode-0", 10.5)
    assert (again.attempt, again.backoff_s, again.due_at, again.exit_code) == (2, 1.0, 11.5, None)
    assert sup.due(11.4) == [] and sup.due(11.5) == [again]
    assert sup.restarts() == {}


def test_nothing_is_restarted_after_stop():
    sup = Supervisor()
    sup.started("decode-0", 0.0)
    sup.started("redis", 0.0)
    sup.exited("decode-0", -9, 1.0)
    sup.stop()
    assert sup.due(100.0) == [] and sup.next_due() is None and sup.pending("decode-0") is None
    assert sup.exited("redis", -9, 2.0) is None


def test_an_unknown_process_is_an_error():
    with pytest.raises(KeyError):
        Supervisor().exited("nobody", 1, 0.0)


def test_a_worker_that_refused_its_model_is_not_restarted():
    clock = Clock()
    sup = Supervisor()
    sup.started("decode-0", clock())
    assert sup.exited("decode-0", EXIT_MODEL_REFUSED, clock.advance(3)) is None
    assert sup.refused("decode-0") and sup.pending("decode-0") is None
    assert sup.due(clock.advance(100)) == [] and sup.restarts() == {}
    assert not sup.refused("prefill-0")
