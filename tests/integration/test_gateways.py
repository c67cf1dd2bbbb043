"""Two gateway processes on one port (`dopd up --gateways 2`, SO_REUSEPORT) admit as one: each
decode worker refuses a reservation past the seats its gateway's TPOT SLO allows, counting every
gateway's requests, so a burst through both never seats more than that on a worker, and every
request ends with its tokens or RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from services.client import cluster_status, generate, planner_plan
from tests.helpers import assert_no_leaks, flat_sim_profile, pseudo_completion, start_cluster
from tests.integration.test_sim_engine import metric

# A decode step of 10 ms alone and 1 ms more per request in the batch: under a 15.5 ms TPOT SLO
# a worker seats 6 (15 ms), not 7 (16 ms).
PROFILE = {**flat_sim_profile("test-seats", prefill_s=0.02, decode_s=0.01),
           "decode": {"batch": [1, 64], "context": [1, 4096], "seconds": [[0.010, 0.010], [0.073, 0.073]]}}
SEATS = 6
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def two_gateways(redis_url, redis_prefix, tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "test-seats.json"
    path.write_text(json.dumps(PROFILE))
    handle = start_cluster(f"sim:{path}", tmp_path_factory.mktemp("two-gateways"), redis_url,
                           redis_prefix + "gateways:", prefill=1, decode=2, kv_blocks=512, gateways=2,
                           mode="dopd-no-planner", planner="static", slo_ttft_ms=5000.0, slo_tpot_ms=15.5)
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


async def one_request(handle, prompt: list[int]):
    """On a connection of its own, which the kernel gives to either gateway (a channel with its
    own subchannel pool: gRPC otherwise shares one connection among a process's channels)."""
    async with grpc.aio.insecure_channel(handle.gateway, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        try:
            return await generate(ch, prompt, max_tokens=MAX_TOKENS, temperature=0.0, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code()


async def test_two_gateways_on_one_port_never_seat_past_a_workers_seats(two_gateways):
    handle = two_gateways
    where = {p.name: p.metrics_address for p in handle.cluster.procs}
    # `dopd status` lists both (the topology each gateway fetches every 0.5 s names them).
    deadline = time.monotonic() + 10
    while (names := sorted(s["name"] for s in (await cluster_status(handle.gateway))["services"]
                           if s["role"] == "gateway")) != ["gateway", "gateway-1"]:
        assert time.monotonic() < deadline, names
        await asyncio.sleep(0.25)
    # Admission (and so the seat limit) starts with the planner's first forecast, which each
    # gateway fetches with the topology every 0.5 s.
    deadline = time.monotonic() + 30
    while (plan := await planner_plan(handle.cluster.proc("planner").address)) is None or not plan["predicted_rate"]:
        assert time.monotonic() < deadline, "the planner made no forecast within 30 s"
        await asyncio.gather(*(one_request(handle, [5, 6, 7, 8]) for _ in range(4)))
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.5)

    prompts = [list(range(100 + i, 164 + i)) for i in range(48)]
    outs = await asyncio.gather(*(one_request(handle, p) for p in prompts))

    served = [(p, o) for p, o in zip(prompts, outs, strict=True) if not isinstance(o, grpc.StatusCode)]
    refused = [o for o in outs if isinstance(o, grpc.StatusCode)]
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code in refused), refused
    assert len(served) >= len(prompts) // 2, f"{len(refused)} of {len(prompts)} refused"
    assert all(o.token_ids == pseudo_completion(p, MAX_TOKENS) for p, o in served)
    assert all(metric(where[g], "dopd_requests_total") > 0 for g in ("gateway", "gateway-1")), "one gateway idle"
    peaks = {w: metric(where[w], "dopd_worker_held_requests_max") for w in ("decode-0", "decode-1")}
    assert all(1 <= peak <= SEATS for peak in peaks.values()), peaks
    await assert_no_leaks(handle)
