"""The planner's load history against a real redis-server that the tests kill, pause and restart.

Each test starts its own redis-server (no persistence, as `dopd up` runs it) on a port of its own,
so a restart on the same port comes back EMPTY; clients are built as the planner builds them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.launcher import free_port, redis_answers
from services.planner.history import LoadHistory

T0 = 1_700_000_000.0  # records carry wall-clock-like times

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


class RedisServer:
    """A private redis-server that can be killed and restarted on the same port."""

    def __init__(self, log_dir) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_dir / "redis.log", "a") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(100):
            if redis_answers(self.url):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def server(tmp_path):
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        os.kill(srv.proc.pid, signal.SIGCONT)  # in case a test left it paused
        srv.kill()


def planner_client(url: str) -> aioredis.Redis:
    """As services/planner/server.py builds it: short timeouts, no retries."""
    return aioredis.from_url(url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0))


@pytest.fixture
async def client(server):
    c = planner_client(server.url)
    yield c
    await c.aclose()


@pytest.fixture
def key() -> str:
    return f"dopd-test-{uuid.uuid4().hex[:8]}:history"


async def stored(url: str, key: str) -> list[tuple[str, float, int]]:
    """What Redis holds: (id, t, doc["i"]) per entry, in stream order."""
    c = aioredis.from_url(url, decode_responses=True)
    try:
        return [(sid, float(f["t"]), json.loads(f["doc"])["i"]) for sid, f in await c.xrange(key)]
    finally:
        await c.aclose()


def docs(hist: LoadHistory) -> list[int]:
    return [doc["i"] for _, doc in hist.records()]


async def test_append_load_round_trip_and_order(server, client, key):
    hist = LoadHistory(client, key, max_age_s=3600)
    assert await hist.load(T0) == []
    times = [T0 + 0.5 * i for i in range(20)] + [T0 + 10.0] * 3  # three records in the same ms
    for i, t in enumerate(times):
        await hist.append(t, {"i": i, "load": {"arrivals": i, "prompt_lens": [1, 2]}})
    assert hist.redis_ok
    held = await stored(server.url, key)
    assert [i for _, _, i in held] == list(range(23))
    assert [t for _, t, _ in held] == times  # exact floats
    assert [sid for sid, _, _ in held][-3:] == ["1700000010000-0", "1700000010000-1", "1700000010000-2"]

    again = LoadHistory(planner_client(server.url), key, max_age_s=3600)
    assert await again.load(T0 + 11) == hist.records()
    assert again.records()[1] == (T0 + 0.5, {"i": 1, "load": {"arrivals": 1, "prompt_lens": [1, 2]}})


async def test_trimmed_by_age_in_memory_and_in_redis(server, client, key):
    hist = LoadHistory(client, key, max_age_s=10)
    await hist.load(T0)
    for i in range(600):
        await hist.append(T0 + i, {"i": i})
    assert docs(hist) == list(range(589, 600))
    held = await stored(server.url, key)
    assert len(held) < 250  # MINID ~ drops whole stream nodes (100 entries each)
    assert [i for _, _, i in held] == list(range(600 - len(held), 600))
    later = LoadHistory(client, key, max_age_s=10)
    assert [doc["i"] for _, doc in await later.load(T0 + 604)] == list(range(594, 600))


async def test_restarted_planner_resumes_and_continues(server, client, key):
    first = LoadHistory(client, key, max_age_s=3600)
    await first.load(T0)
    for i in range(5):
        await first.append(T0 + i, {"i": i})
    second = LoadHistory(client, key, max_age_s=3600)
    assert [doc["i"] for _, doc in await second.load(T0 + 5)] == list(range(5))
    await second.append(T0 + 4, {"i": 5})  # a clock a little behind the previous planner's
    await second.append(T0 + 6, {"i": 6})
    held = await stored(server.url, key)
    assert [i for _, _, i in held] == list(range(7))
    assert held[5][0] == "1700000004000-1"
    assert docs(second) == list(range(7))


async def test_redis_killed_then_restarted_empty(server, client, key, caplog):
    caplog.set_level(logging.WARNING, logger="services.planner.history")
    hist = LoadHistory(client, key, max_age_s=3600, retry_interval_s=0.2)
    await hist.load(T0)
    for i in range(5):
        await hist.append(T0 + i, {"i": i})
    server.kill()
    for i in range(5, 25):
        start = time.monotonic()
        await hist.append(T0 + i, {"i": i})  # never raises
        assert time.monotonic() - start < 1.0
        if i % 5 == 0:
            time.sleep(0.25)  # let a retry come due
    assert not hist.redis_ok
    assert docs(hist) == list(range(25))

    server.start()  # empty: no persistence
    assert await stored(server.url, key) == []
    await hist.append(T0 + 25, {"i": 25})  # may fall inside the retry interval
    if not hist.redis_ok:
        time.sleep(0.25)
        await hist.append(T0 + 26, {"i": 26})
    assert hist.redis_ok
    held = await stored(server.url, key)
    n = len(hist.records())
    assert [i for _, _, i in held] == list(range(n))  # everything, in order, no duplicates
    assert [sid for sid, _, _ in held] == sorted({sid for sid, _, _ in held})
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in warnings) == 1
    back = [m for m in warnings if "is back" in m]
    assert back == [f"redis history at {key} is back; wrote back {n} record(s)"]  # all: it came back empty


async def test_restart_between_appends_and_sync(server, client, key):
    hist = LoadHistory(client, key, max_age_s=3600, retry_interval_s=0.2)
    await hist.load(T0)
    for i in range(10):
        await hist.append(T0 + i, {"i": i})
    # Restarted while nobody wrote: the client reconnects on its own, the history is gone.
    server.restart()
    await hist.append(T0 + 10, {"i": 10})
    if not hist.redis_ok:  # this append saw the dead connection; sync() writes back now
        assert await hist.sync()
    assert [i for _, _, i in await stored(server.url, key)] == list(range(11))
    # And once more, with sync() as the only call after the restart.
    server.restart()
    assert await hist.sync() or await hist.sync()
    assert [i for _, _, i in await stored(server.url, key)] == list(range(11))


async def test_paused_redis_times_out_and_catches_up_without_duplicates(server, client, key):
    """A paused Redis times out (a reply lost, maybe applied later) and holds history the new
    planner could not read at start: both are settled on reconnect."""
    old = LoadHistory(client, key, max_age_s=3600)
    await old.load(T0)
    for i in range(5):
        await old.append(T0 + i, {"i": i})
    os.kill(server.proc.pid, signal.SIGSTOP)
    hist = LoadHistory(planner_client(server.url), key, max_age_s=3600, retry_interval_s=0.2)
    start = time.monotonic()
    assert await hist.load(T0 + 5) == []
    assert time.monotonic() - start < 1.0
    for i in range(5, 12):
        start = time.monotonic()
        await hist.append(T0 + i, {"i": i})
        assert time.monotonic() - start < 1.0
        time.sleep(0.1)
    os.kill(server.proc.pid, signal.SIGCONT)
    assert await hist.sync()
    assert docs(hist) == list(range(12))  # the earlier history was read back into memory
    assert [i for _, _, i in await stored(server.url, key)] == list(range(12))


async def test_redis_never_there(tmp_path, key):
    port = free_port()  # nobody listens
    client = planner_client(f"redis://127.0.0.1:{port}/0")
    calls: list[str] = []
    send = client.execute_command

    async def counting(*args, **kwargs):
        calls.append(args[0])
        return await send(*args, **kwargs)

    client.execute_command = counting
    hist = LoadHistory(client, key, max_age_s=3600, retry_interval_s=30)
    start = time.monotonic()
    assert await hist.load(T0) == []
    for i in range(50):
        await hist.append(T0 + i, {"i": i})
    assert time.monotonic() - start < 2.0
    assert len(calls) == 1  # load's attempt; appends wait for the retry interval
    assert not hist.redis_ok and docs(hist) == list(range(50))

    srv = RedisServer(tmp_path)  # it turns up after all, on that port
    srv.port, srv.url = port, f"redis://127.0.0.1:{port}/0"
    srv.start()
    try:
        assert await hist.sync()
        assert [i for _, _, i in await stored(srv.url, key)] == list(range(50))
        await hist.close()
    finally:
        srv.kill()
        await client.aclose()


async def test_write_whose_reply_was_lost_is_not_duplicated(server, client, key):
    hist = LoadHistory(client, key, max_age_s=3600, retry_interval_s=0.2)
    await hist.load(T0)
    for i in range(3):
        await hist.append(T0 + i, {"i": i})
    os.kill(server.proc.pid, signal.SIGSTOP)
    await hist.append(T0 + 3, {"i": 3})  # sent, times out; Redis runs it once it resumes
    assert not hist.redis_ok
    os.kill(server.proc.pid, signal.SIGCONT)
    time.sleep(0.1)
    assert [i for _, _, i in await stored(server.url, key)] == [0, 1, 2, 3]
    assert await hist.sync()
    await hist.append(T0 + 4, {"i": 4})
    assert [i for _, _, i in await stored(server.url, key)] == [0, 1, 2, 3, 4]
