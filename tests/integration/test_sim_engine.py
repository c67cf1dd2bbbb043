"""The sim engine through the real services: latency comes from the profile, KV transfers carry
the profiled model's bytes, tokens are deterministic, and blocks are accounted as for real."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from common.types import Role
from services.client import generate, worker_stats
from services.kvtransfer import nixl_agent
from tests.helpers import assert_no_leaks, flat_sim_profile, pseudo_completion, start_cluster
from tests.integration.test_role_switch import roles, set_role

PROFILE = flat_sim_profile("test-flat", prefill_s=0.3, decode_s=0.05)
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 32 * 2


@pytest.fixture(scope="module")
def sim_cluster(redis_url, redis_prefix, tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "test-flat.json"
    path.write_text(json.dumps(PROFILE))
    handle = start_cluster(f"sim:{path}", tmp_path_factory.mktemp("sim-cluster"), redis_url, redis_prefix + "sim:",
                           prefill=2, decode=2, kv_blocks=256)
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


def metric(address: str, name: str) -> float:
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


async def test_sim_latency_follows_profile_and_kv_bytes_flow(sim_cluster):
    metrics_of = {p.name: p.metrics_address for p in sim_cluster.cluster.procs}
    sent_before = sum(metric(metrics_of[f"prefill-{i}"], "dopd_kv_transfer_bytes_total") for i in range(2))
    prompt = list(range(100, 400))
    async with sim_cluster.channel() as ch:
        start = time.perf_counter()
        outs = await asyncio.gather(*(generate(ch, prompt, max_tokens=10, temperature=0.0) for _ in range(4)))
        elapsed = time.perf_counter() - start
    # Each request waits at least one prefill (0.3 s) and 9 decode steps (0.05 s each).
    assert elapsed >= 0.3 + 9 * 0.05
    expected = pseudo_completion(prompt, 10)
    assert all(o.token_ids == expected for o in outs)
    sent = sum(metric(metrics_of[f"prefill-{i}"], "dopd_kv_transfer_bytes_total") for i in range(2)) - sent_before
    assert sent == 4 * len(prompt) * KV_BYTES_PER_TOKEN
    await assert_no_leaks(sim_cluster)


async def test_sim_blocks_are_accounted(sim_cluster):
    async with sim_cluster.channel() as ch:
        task = asyncio.create_task(generate(ch, list(range(100, 1100)), max_tokens=200, temperature=0.0))
        await asyncio.sleep(1.0)  # past the prefill: the request holds its blocks on a decode worker
        used = [(await worker_stats(sim_cluster.workers[f"decode-{i}"])).kv_blocks_used for i in range(2)]
        assert sorted(used) == [0, (1000 + 199 + 15) // 16]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await assert_no_leaks(sim_cluster)


# A profile whose blocks are big (8 layers x 8 heads x 256 x fp32: 128 KiB a token, 2 MiB a
# block), so that the scratch pool a sim worker reads with NIXL (64 MiB: 32 blocks) is smaller
# than its 256 blocks, and transfers really fold blocks onto each other.
WIDE_PROFILE = flat_sim_profile("test-wide", prefill_s=0.05, decode_s=0.01, layers=8, kv_heads=8, head_dim=256,
                                dtype="float32")
WIDE_BYTES_PER_TOKEN = 2 * 8 * 8 * 256 * 4


@pytest.fixture(scope="module")
def sim_nixl_cluster(redis_url, redis_prefix, tmp_path_factory):
    if not nixl_agent.available():
        pytest.skip("NIXL is not installed (the nixl extra)")
    path = tmp_path_factory.mktemp("profile") / "test-wide.json"
    path.write_text(json.dumps(WIDE_PROFILE))
    handle = start_cluster(f"sim:{path}", tmp_path_factory.mktemp("sim-nixl"), redis_url, redis_prefix + "simnixl:",
                           prefill=1, decode=2, kv_blocks=256, planner="off",
                           env={"DOPD_KV_TRANSPORT": "nixl", "DOPD_KV_TIMEOUT_S": "10"})
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


def kv_bytes_by(handle, direction: str, transport: str) -> float:
    total = 0.0
    for proc in handle.cluster.procs:
        if proc.name in handle.workers:
            total += metric(proc.metrics_address,
                            f'dopd_kv_transfer_bytes_total{{direction="{direction}",transport="{transport}"}}')
    return total


async def test_sim_hand_offs_move_their_real_bytes_by_nixl(sim_nixl_cluster):
    handle = sim_nixl_cluster
    before = kv_bytes_by(handle, "received", "nixl"), kv_bytes_by(handle, "received", "grpc")
    prompts = [list(range(100 + i, 400 + i)) for i in range(4)]  # 19 blocks each: 76 > the 32 in scratch
    async with handle.channel() as ch:
        outs = await asyncio.gather(*(generate(ch, p, max_tokens=10, temperature=0.0) for p in prompts))
    assert [o.token_ids for o in outs] == [pseudo_completion(p, 10) for p in prompts]
    read = kv_bytes_by(handle, "received", "nixl") - before[0]
    assert read == sum(len(p) for p in prompts) * WIDE_BYTES_PER_TOKEN
    assert kv_bytes_by(handle, "received", "grpc") == before[1]  # no byte went the other way
    await assert_no_leaks(handle)


async def test_sim_migration_reads_by_nixl(sim_nixl_cluster):
    handle = sim_nixl_cluster
    await set_role(handle.workers["decode-1"], Role.PREFILL)  # every request starts on decode-0
    try:
        prompts = [list(range(200 + i, 460 + i)) for i in range(4)]
        async with handle.channel() as ch:
            served = asyncio.gather(*(generate(ch, p, max_tokens=300, temperature=0.0, timeout=60) for p in prompts))
            for _ in range(200):
                if (await worker_stats(handle.workers["decode-0"])).running_requests >= 2:
                    break
                await asyncio.sleep(0.05)
            await set_role(handle.workers["decode-1"], Role.DECODE)
            reply = await set_role(handle.workers["decode-0"], Role.PREFILL)
            outs = await served
    finally:
        for name, role in (await roles(handle)).items():
            if name.startswith("decode-") and role is not Role.DECODE:
                await set_role(handle.workers[name], Role.DECODE)
    assert reply.migrated_requests >= 2, reply
    assert reply.migrated_bytes_nixl == reply.migrated_bytes > 0, reply
    assert [o.token_ids for o in outs] == [pseudo_completion(p, 300) for p in prompts]
    await assert_no_leaks(handle)
