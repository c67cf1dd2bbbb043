"""Switches to and from the `mixed` role under continuous load, on real processes (tiny-random,
1 prefill + 2 decode workers to start, static dispatch): a decode worker becomes mixed (it keeps
its requests and takes whole prompts of its own), the prefill worker becomes mixed too (no
prefill worker is left: the mixed workers prefill every prompt), a mixed worker goes back to
prefill (its decodes, and the prompts it was prefilling once their last chunk has run, are
live-migrated), and mixed workers go back to decode. No request fails, greedy outputs are
identical to a run without switches (and to transformers', tests/integration/
test_model_coverage.py), and no worker leaks a block."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.convert import ROLE_FROM_PB, ROLE_TO_PB
from common.pb import worker_pb2, worker_pb2_grpc
from common.rpc.channels import internal_channel
from common.types import Role
from services.client import cluster_status, set_worker_role, worker_stats
from tests.helpers import assert_no_leaks, start_cluster
from tests.integration.test_role_switch import serve_all, workload

# (worker, role) in order; each waits until the worker holds running requests where it has any.
SCRIPT = [("decode-0", Role.MIXED), ("prefill-0", Role.MIXED), ("decode-0", Role.PREFILL),
          ("decode-1", Role.MIXED), ("prefill-0", Role.DECODE), ("decode-0", Role.MIXED),
          ("decode-1", Role.PREFILL), ("decode-0", Role.DECODE), ("decode-1", Role.MIXED),
          ("prefill-0", Role.PREFILL)]


@pytest.fixture(scope="module")
def mixed_cluster(redis_url, redis_prefix, tmp_path_factory):
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp("mixed-cluster"), redis_url,
                           redis_prefix + "mixed:", prefill=1, decode=2, kv_blocks=1024,
                           env={"DOPD_KV_TIMEOUT_S": "5", "DOPD_STEP_TOKEN_BUDGET": "64"})
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), f"a service did not drain cleanly: {codes}"


async def set_role(address: str, role: Role, chunk_budget: int = 0) -> worker_pb2.SetRoleResponse:
    async with internal_channel(address) as ch:
        return await worker_pb2_grpc.WorkerStub(ch).SetRole(
            worker_pb2.SetRoleRequest(role=ROLE_TO_PB[role], chunk_budget=chunk_budget), timeout=60)


def mixed_prompts(handle) -> float:
    """Prompts the gateway sent to mixed workers to prefill themselves (dopd_gateway_paths)."""
    gateway = next(p for p in handle.cluster.procs if p.name == "gateway")
    text = urllib.request.urlopen(f"http://{gateway.metrics_address}/metrics", timeout=5).read()
    return sum(s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples
               if s.name == "dopd_gateway_paths_total" and s.labels.get("path") == "mixed")


async def switcher(handle, log: list) -> None:
    for name, role in SCRIPT:
        address = handle.workers[name]
        for _ in range(200):  # a worker that decodes is switched while it holds requests
            stats = await worker_stats(address)
            if ROLE_FROM_PB[stats.role] is Role.PREFILL or stats.decode_running >= 2:
                break
            await asyncio.sleep(0.01)
        log.append((name, role, await set_role(address, role, chunk_budget=48 if role is Role.MIXED else 0)))
        await asyncio.sleep(0.1)


async def test_switches_to_and_from_mixed_under_load_lose_nothing(mixed_cluster):
    requests = workload(seed=11)
    reference = await serve_all(mixed_cluster, requests)
    await assert_no_leaks(mixed_cluster)

    log: list = []
    switching = asyncio.create_task(switcher(mixed_cluster, log))
    served = []
    while not switching.done():  # keep the load going until every switch is done
        served.append(await serve_all(mixed_cluster, requests))
    await switching
    served.append(await serve_all(mixed_cluster, requests))  # and once more on the last configuration

    print(f"\n{len(log)} switches over {len(served)} passes: "
          + "; ".join(f"{n} -> {r}: {x.total_seconds * 1e3:.0f} ms, {x.migrated_requests} moved" for n, r, x in log))
    for run in served:
        mismatched = [i for i, (a, b) in enumerate(zip(run, reference, strict=True)) if a != b]
        assert not mismatched, f"outputs changed by switching to and from mixed: requests {mismatched}"
    assert [(n, r) for n, r, _ in log] == SCRIPT
    assert all(ROLE_FROM_PB[x.to_role] is r for _, r, x in log)
    from_mixed_to_prefill = [x for n, r, x in log if r is Role.PREFILL and ROLE_FROM_PB[x.from_role] is Role.MIXED]
    assert from_mixed_to_prefill and sum(x.migrated_requests for x in from_mixed_to_prefill) > 0, \
        "no mixed -> prefill switch moved a request"
    assert not any(x.fell_back_to_drain for _, _, x in log), [x.note for _, _, x in log]
    assert mixed_prompts(mixed_cluster) > 0, "no prompt was prefilled by a mixed worker"
    await assert_no_leaks(mixed_cluster)


async def test_a_budget_change_and_bad_requests(mixed_cluster):
    name = next(n for n in mixed_cluster.workers if n.startswith("decode"))
    address = mixed_cluster.workers[name]
    if ROLE_FROM_PB[(await worker_stats(address)).role] is not Role.MIXED:
        await set_role(address, Role.MIXED, chunk_budget=32)
    reply = await set_role(address, Role.MIXED, chunk_budget=96)  # already mixed: the budget only
    assert ROLE_FROM_PB[reply.from_role] is Role.MIXED and ROLE_FROM_PB[reply.to_role] is Role.MIXED
    assert (await worker_stats(address)).chunk_budget == 96
    for role, budget in ((Role.DECODE, 64), (Role.MIXED, -1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await set_role(address, role, chunk_budget=budget)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await set_role(address, Role.DECODE)
    assert (await worker_stats(address)).chunk_budget == 64  # the worker's own setting again
    # By hand, as `dopd role WORKER mixed --chunk-budget N` does, and as `dopd status` shows it.
    reply = await set_worker_role(mixed_cluster.gateway, name, "mixed", chunk_budget=80)
    assert reply["from_role"] == "decode" and reply["to_role"] == "mixed"
    await asyncio.sleep(1.5)  # the planner's topology takes the heartbeat
    status = await cluster_status(mixed_cluster.gateway)
    assert {s["name"]: s["role"] for s in status["services"]}[name] == Role.MIXED
    assert status["plan"] is None or "M" in status["plan"]["split_now"]
