from services.planner.registry import GatewayBook, WorkerRegistry

PREFILL, DECODE = 1, 2


def test_report_and_live():
    reg = WorkerRegistry[str](ttl=5.0)
    assert reg.live(0.0) == [] and reg.version == 0
    reg.report("w2", PREFILL, "info-w2", now=0.0)
    reg.report("w1", DECODE, "info-w1", now=1.0)
    assert reg.live(1.0) == ["info-w1", "info-w2"]  # sorted by worker id
    assert reg.version == 2


def test_plain_refresh_does_not_bump_version():
    reg = WorkerRegistry[str](ttl=5.0)
    reg.report("w1", PREFILL, "a", now=0.0)
    v = reg.version
    for t in (1.0, 2.0, 4.0, 8.0):
        reg.report("w1", PREFILL, f"a@{t}", now=t)  # new info, same role
        assert reg.live(t) == [f"a@{t}"]
    assert reg.version == v


def test_role_change_bumps_version():
    reg = WorkerRegistry[str](ttl=5.0)
    reg.report("w1", PREFILL, "a", now=0.0)
    v = reg.version
    reg.report("w1", DECODE, "a", now=1.0)
    assert reg.version == v + 1
    reg.report("w1", DECODE, "a", now=2.0)
    assert reg.version == v + 1


def test_ttl_expiry_and_return():
    reg = WorkerRegistry[str](ttl=5.0)
    reg.report("w1", PREFILL, "a", now=0.0)
    reg.report("w2", DECODE, "b", now=3.0)
    v = reg.version
    assert reg.live(5.0) == ["a", "b"]  # exactly ttl old is still live
    assert reg.version == v
    assert reg.live(5.5) == ["b"]
    assert reg.version == v + 1
    assert reg.live(6.0) == ["b"] and reg.version == v + 1
    reg.report("w1", PREFILL, "a", now=7.0)  # back
    assert reg.live(7.0) == ["a", "b"] and reg.version == v + 2
    assert reg.live(100.0) == [] and reg.version == v + 3


def test_long_gone_worker_is_forgotten_then_can_return():
    reg = WorkerRegistry[str](ttl=1.0)
    reg.report("w1", PREFILL, "a", now=0.0)
    assert reg.live(50.0) == []
    v = reg.version
    reg.report("w1", DECODE, "a2", now=60.0)
    assert reg.live(60.0) == ["a2"] and reg.version == v + 1


def test_remove():
    reg = WorkerRegistry[str](ttl=5.0)
    reg.report("w1", PREFILL, "a", now=0.0)
    reg.report("w2", DECODE, "b", now=0.0)
    v = reg.version
    reg.remove("w1", now=1.0)
    assert reg.live(1.0) == ["b"] and reg.version == v + 1
    reg.remove("w1", now=1.0)
    reg.remove("never", now=1.0)
    assert reg.version == v + 1


def test_gateways_are_listed_while_they_fetch_the_topology():
    book = GatewayBook[str](ttl=5.0)
    book.seen("gateway-1", "g1", now=0.0)
    book.seen("gateway", "g0", now=1.0)
    assert book.live(2.0) == ["g0", "g1"]  # by id
    book.seen("gateway-1", "g1 again", now=3.0)
    assert book.live(6.5) == ["g1 again"]  # the other went quiet
