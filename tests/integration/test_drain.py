"""SIGTERM drains: a worker leaves the topology at once, finishes what it holds, then exits 0."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from services.client import generate
from tests.helpers import gateway_topology, start_cluster


@pytest.fixture
def drain_cluster(redis_url, redis_prefix, tmp_path):
    handle = start_cluster("tiny-random", tmp_path, redis_url, redis_prefix + "drain:", kv_blocks=256)
    yield handle
    handle.cluster.stop()


async def test_sigterm_finishes_in_flight_requests(drain_cluster):
    procs = {p.name: p for p in drain_cluster.cluster.procs}
    async with drain_cluster.channel() as ch:
        running = asyncio.create_task(generate(ch, list(range(5, 300)), max_tokens=400, temperature=0.0,
                                               ignore_eos=True, timeout=120))
        while not (await gateway_topology(drain_cluster)) or running.done():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the request is decoding now
        assert not running.done()
        for name in ("decode-0", "prefill-0"):
            procs[name].popen.send_signal(signal.SIGTERM)
        out = await running
        assert out.completion_tokens == 400 and out.finish_reason == "length"
        for name in ("decode-0", "prefill-0"):
            assert await asyncio.to_thread(procs[name].popen.wait, 30) == 0
        # Both left the topology: new work is refused as unavailable, not hung.
        for _ in range(50):
            if not await gateway_topology(drain_cluster):
                break
            await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(ch, "Hello", max_tokens=2, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
