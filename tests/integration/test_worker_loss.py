"""No request is lost when a worker dies under it (SIGKILL, as a crash):

- a decode worker killed while streaming several requests (tiny-random, 1 prefill + 2 decode):
  each of its requests is replayed (prompt + tokens so far prefilled again, the KV pushed to the
  other decode worker) and its client's stream goes on; greedy outputs equal the model's own
  (transformers' generate, near ties aside), the survivors hold no block;
- a prefill worker killed mid-prefill (sim engine, 2 prefill + 1 decode, a 3 s prefill): its
  requests are prefilled again on the other one and complete with the same tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.request

import pytest

from common.modeling.loader import load_model
from services.client import generate, worker_stats
from services.kvtransfer import nixl_agent
from tests.helpers import (
    ClusterHandle,
    assert_no_leaks,
    check_greedy_identity,
    flat_sim_profile,
    pseudo_completion,
    start_cluster,
)


def gateway_metric(handle: ClusterHandle, name: str, service: str = "gateway") -> float:
    address = handle.cluster.proc(service).metrics_address
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


def survivors(handle: ClusterHandle, dead: str) -> ClusterHandle:
    return dataclasses.replace(handle, workers={n: a for n, a in handle.workers.items() if n != dead})


class Streams:
    """Requests streaming concurrently; counts the tokens each has received so far."""

    def __init__(self, handle: ClusterHandle, prompts: list[list[int]], max_tokens: int) -> None:
        self.received = [0] * len(prompts)
        self.tasks = [asyncio.create_task(self._one(handle, i, p, max_tokens)) for i, p in enumerate(prompts)]

    async def _one(self, handle, i, prompt, max_tokens):
        def count(_text):
            self.received[i] += 1
        async with handle.channel() as ch:
            return await generate(ch, prompt, max_tokens=max_tokens, temperature=0.0, on_text=count, timeout=120)

    async def wait_all_started(self, tokens: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while min(self.received) < tokens:
            assert time.monotonic() < deadline, f"streams did not start: {self.received}"
            await asyncio.sleep(0.01)

    async def results(self):
        return await asyncio.gather(*self.tasks)


@pytest.fixture
def tiny_1p2d(redis_url, redis_prefix, tmp_path):
    handle = start_cluster("tiny-random", tmp_path / "logs", redis_url, redis_prefix + "loss-decode:",
                           prefill=1, decode=2, kv_blocks=512)
    yield handle
    handle.cluster.stop()


async def test_a_decode_worker_killed_mid_stream_loses_no_request(tiny_1p2d):
    handle = tiny_1p2d
    prompts = [[100 + 7 * i + j for j in range(12)] for i in range(6)]
    max_tokens = 400
    streams = Streams(handle, prompts, max_tokens)
    await streams.wait_all_started(tokens=3)
    running = {name: (await worker_stats(handle.workers[name])).running_requests for name in ("decode-0", "decode-1")}
    victim = max(running, key=running.get)
    assert running[victim] > 0, running
    replays_before = gateway_metric(handle, 'dopd_gateway_replays_total{stage="decode"}')
    handle.cluster.kill(victim)
    outs = await streams.results()

    assert all(o.finish_reason in ("stop", "length") for o in outs)
    replayed = gateway_metric(handle, 'dopd_gateway_replays_total{stage="decode"}') - replays_before
    assert replayed >= running[victim] > 0, (replayed, running)
    model = load_model("tiny-random").model
    report = check_greedy_identity(model, prompts, [o.token_ids for o in outs], [max_tokens] * len(prompts), {2})
    assert report.requests == len(prompts)
    await assert_no_leaks(survivors(handle, victim))


SLOW_PREFILL = flat_sim_profile("test-slow-prefill", prefill_s=3.0, decode_s=0.01)


@pytest.fixture
def sim_2p1d(redis_url, redis_prefix, tmp_path):
    path = tmp_path / "slow-prefill.json"
    path.write_text(json.dumps(SLOW_PREFILL))
    handle = start_cluster(f"sim:{path}", tmp_path / "logs", redis_url, redis_prefix + "loss-prefill:",
                           prefill=2, decode=1, kv_blocks=256)
    yield handle
    handle.cluster.stop()


NIXL_READ = 'dopd_kv_transfer_bytes_total{direction="received",transport="nixl"}'


async def test_a_prefill_worker_killed_mid_prefill_loses_no_request(sim_2p1d):
    """Where NIXL is installed, the hand-offs go by NIXL (auto): the decode worker is reading a
    prompt layer by layer out of prefill-0's pool when prefill-0 dies (a NIXL peer dead
    mid-transfer). Its reservation fails with a clear error, the gateway replays the request."""
    handle = sim_2p1d
    read_before = gateway_metric(handle, NIXL_READ, "decode-0")
    prompts = [list(range(100 + i, 400 + i)) for i in range(4)]
    tasks = [asyncio.create_task(_generate(handle, p)) for p in prompts]
    # Each prefill takes 3 s: wait until both prefill workers hold requests, then kill one.
    deadline = time.monotonic() + 10
    while True:
        busy = {n: (await worker_stats(handle.workers[n])).running_requests
                + (await worker_stats(handle.workers[n])).waiting_requests for n in ("prefill-0", "prefill-1")}
        # A layer of each prompt in the first batches has been read (4 layers in 3 s: one each 0.75 s).
        reading = not nixl_agent.available() or gateway_metric(handle, NIXL_READ, "decode-0") > read_before
        if all(busy.values()) and reading:
            break
        assert time.monotonic() < deadline, busy
        await asyncio.sleep(0.05)
    retried_before = gateway_metric(handle, 'dopd_gateway_replays_total{stage="prefill"}')
    handle.cluster.kill("prefill-0")
    outs = await asyncio.gather(*tasks)

    assert [o.token_ids for o in outs] == [pseudo_completion(p, 8) for p in prompts]
    assert gateway_metric(handle, 'dopd_gateway_replays_total{stage="prefill"}') - retried_before >= busy["prefill-0"]
    await assert_no_leaks(survivors(handle, "prefill-0"))


async def _generate(handle, prompt):
    async with handle.channel() as ch:
        return await generate(ch, prompt, max_tokens=8, temperature=0.0, timeout=60)
