"""Faults in the control plane cost nothing: with continuous load on a real cluster (tiny-random,
1 prefill + 1 decode), Redis is killed and restarted (empty: it runs without persistence), then
the planner is killed and restarted. Serving continues on the last topology, no request fails, no
block leaks, and the load history resumes: every interval recorded before a fault is in Redis
after it, and the restarted planner picks the history up."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
import redis

from common.pb import planner_pb2, planner_pb2_grpc
from common.rpc.channels import internal_channel
from services.client import generate
from services.launcher import free_port, redis_answers, start_redis
from tests.helpers import assert_no_leaks, start_cluster

PREFIX = "dopd-faults:"


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    """A redis-server of this test's own, on a port of its own, that the test may kill."""
    log_dir = tmp_path_factory.mktemp("faults-redis")
    port = free_port()
    proc, url = start_redis("127.0.0.1", log_dir, port)
    state = {"proc": proc, "url": url, "port": port, "log_dir": log_dir}
    yield state
    state["proc"].terminate()
    state["proc"].wait()


@pytest.fixture(scope="module")
def fault_cluster(private_redis, tmp_path_factory):
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp("faults-cluster"), private_redis["url"], PREFIX,
                           prefill=1, decode=1, kv_blocks=512)
    yield handle
    handle.cluster.stop()


def stream_ids(url: str) -> list[str]:
    client = redis.Redis.from_url(url, socket_timeout=1)
    return [i.decode() for i, _ in client.xrange(PREFIX + "load")]


async def plan(handle) -> planner_pb2.PlanStatus:
    address = handle.cluster.proc("planner").address
    async with internal_channel(address) as ch:
        return await planner_pb2_grpc.PlannerStub(ch).GetPlan(planner_pb2.GetPlanRequest(), timeout=5)


class Load:
    """Clients sending requests back to back until stopped; every outcome is kept."""

    def __init__(self, handle, clients: int = 3) -> None:
        self.handle = handle
        self.ok = 0
        self.errors: list[str] = []
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._client(i)) for i in range(clients)]

    async def _client(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                async with self.handle.channel() as ch:
                    out = await generate(ch, [100 + i, 200 + n % 50, 300], max_tokens=24, temperature=0.0,
                                         timeout=30)
                assert out.finish_reason in ("stop", "length")
                self.ok += 1
            except (grpc.aio.AioRpcError, AssertionError) as exc:
                self.errors.append(str(exc))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def wait_for(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_redis_and_planner_faults_lose_nothing(fault_cluster, private_redis):
    url = private_redis["url"]
    load = Load(fault_cluster)
    await wait_for(lambda: len(stream_ids(url)) >= 3, 20, "three intervals in Redis")

    # -- Redis killed (SIGKILL), the cluster keeps serving, then Redis comes back empty.
    before_redis = stream_ids(url)
    private_redis["proc"].send_signal(signal.SIGKILL)
    private_redis["proc"].wait()
    served = load.ok
    await asyncio.sleep(3)
    assert load.ok > served, "serving stopped while Redis was away"
    # The planner keeps recording in memory; wait for two intervals more than Redis holds (its
    # ticks may lag on a loaded host, so count them rather than trust the clock).
    for _ in range(100):
        status = await plan(fault_cluster)
        if status.intervals_recorded >= len(before_redis) + 2:
            break
        await asyncio.sleep(0.2)
    assert not status.redis_ok
    recorded_while_away = status.intervals_recorded
    assert recorded_while_away >= len(before_redis) + 2, "the planner stopped recording while Redis was away"
    proc, _ = start_redis("127.0.0.1", private_redis["log_dir"], private_redis["port"])
    private_redis["proc"] = proc
    assert redis_answers(url)
    await wait_for(lambda: len(stream_ids(url)) >= recorded_while_away, 15, "the history written back to Redis")
    after_redis = stream_ids(url)
    assert set(before_redis) <= set(after_redis), "history recorded before Redis' fault was lost"
    assert after_redis == sorted(after_redis, key=lambda i: tuple(map(int, i.split("-"))))

    # -- The planner killed (SIGKILL): the gateway routes by the last topology; then it restarts.
    recorded = (await plan(fault_cluster)).intervals_recorded
    fault_cluster.cluster.kill("planner")
    served = load.ok
    await asyncio.sleep(3)
    assert load.ok > served, "serving stopped while the planner was away"
    fault_cluster.cluster.restart("planner")

    async def resumed() -> bool:
        try:
            return (await plan(fault_cluster)).intervals_recorded >= recorded
        except grpc.aio.AioRpcError:
            return False

    for _ in range(100):
        if await resumed():
            break
        await asyncio.sleep(0.2)
    assert await resumed(), "the restarted planner did not pick up the history"
    ids = stream_ids(url)
    # Its first decision imports and fits the predictor's model: on a loaded machine that alone
    # may take seconds, so wait for the new intervals rather than a fixed time.
    await wait_for(lambda: len(stream_ids(url)) > len(ids), 20, "the restarted planner recording new intervals")
    assert set(after_redis) <= set(stream_ids(url)), "history recorded before the planner's fault was lost"

    await load.finish()
    assert not load.errors, f"{len(load.errors)} requests failed, e.g. {load.errors[:3]}"
    assert load.ok > 20
    await assert_no_leaks(fault_cluster)
