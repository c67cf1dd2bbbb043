"""In-place role switches under continuous load, on real processes (tiny-random, 1 prefill + 2
decode workers): 20+ forced switches in both directions, decode -> prefill while the worker is
decoding several requests (they are live-migrated). No request fails, greedy outputs are
identical to a run without switches, and no worker leaks a block.

decode-1 takes KV over gRPC only, the others read it out of each other's pools (the shm
transport, named: `auto` would pick NIXL where it is installed, tests/integration/
test_kv_transports.py): moves between those two go through shared memory, moves to decode-1 fall
back to gRPC bytes, and decode-1's own moves send bytes (it has no shared pool)."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from common.convert import ROLE_TO_PB
from common.pb import worker_pb2, worker_pb2_grpc
from common.rpc.channels import internal_channel
from common.types import Role
from services.client import generate, worker_stats
from tests.helpers import assert_no_leaks, start_cluster

N_REQUESTS = 48
CONCURRENCY = 12
N_SWITCHES = 20


@pytest.fixture(scope="module")
def switch_cluster(redis_url, redis_prefix, tmp_path_factory):
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp("switch-cluster"), redis_url,
                           redis_prefix + "switch:", prefill=1, decode=2, kv_blocks=1024,
                           env={"DOPD_KV_TIMEOUT_S": "5", "DOPD_KV_TRANSPORT": "shm"},
                           worker_env={"decode-1": {"DOPD_KV_TRANSPORT": "grpc"}})
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), f"a service did not drain cleanly: {codes}"


def workload(seed: int = 7) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, 10000) for _ in range(rng.randrange(4, 300))], rng.randrange(150, 400))
            for _ in range(N_REQUESTS)]


async def serve_all(handle, requests) -> list[list[int]]:
    out: list[list[int] | None] = [None] * len(requests)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i, prompt, max_tokens):
        async with gate, handle.channel() as ch:
            done = await generate(ch, prompt, max_tokens=max_tokens, temperature=0.0, timeout=120)
            assert done.finish_reason in ("stop", "length"), done
            out[i] = done.token_ids

    await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(requests)))
    return out


async def set_role(address: str, role: Role) -> worker_pb2.SetRoleResponse:
    async with internal_channel(address) as ch:
        return await worker_pb2_grpc.WorkerStub(ch).SetRole(worker_pb2.SetRoleRequest(role=ROLE_TO_PB[role]),
                                                            timeout=60)


async def roles(handle) -> dict[str, Role]:
    out = {}
    for name, address in handle.workers.items():
        stats = await worker_stats(address)
        out[name] = Role.PREFILL if stats.role == ROLE_TO_PB[Role.PREFILL] else Role.DECODE
    return out


async def switcher(handle, stop: asyncio.Event, log: list) -> None:
    """Alternate: the busiest decode worker -> prefill (live migration), then the worker that has
    served prefill longest -> decode."""
    want = Role.PREFILL
    while len(log) < N_SWITCHES and not stop.is_set():
        current = await roles(handle)
        candidates = [n for n, r in current.items() if r != want]
        if want == Role.PREFILL:
            # Wait until a decode worker holds several running requests, then switch that one.
            busy = {n: (await worker_stats(handle.workers[n])).decode_running for n in candidates}
            name = max(busy, key=busy.get)
            if busy[name] < 2 and len(log) < 4:
                await asyncio.sleep(0.02)
                continue
        else:  # the worker that has served prefill longest: every worker takes turns
            name = sorted(n for n in candidates if n != log[-1][0])[0]
        reply = await set_role(handle.workers[name], want)
        log.append((name, reply))
        want = Role.DECODE if want is Role.PREFILL else Role.PREFILL
        await asyncio.sleep(0.05)


async def test_switches_under_load_lose_nothing(switch_cluster):
    requests = workload()
    reference = await serve_all(switch_cluster, requests)
    await assert_no_leaks(switch_cluster)

    log: list = []
    stop = asyncio.Event()
    switching = asyncio.create_task(switcher(switch_cluster, stop, log))
    served = []
    while len(log) < N_SWITCHES:  # keep the load going until every switch is done
        served.append(await serve_all(switch_cluster, requests))
        assert not switching.done() or switching.exception() is None, switching.exception()
    stop.set()
    await switching

    moved = [r.migrated_requests for _, r in log if r.to_role == ROLE_TO_PB[Role.PREFILL]]
    print(f"\n{len(log)} switches over {len(served)} passes of {len(requests)} requests; requests moved per "
          f"decode -> prefill switch: {moved}; switch ms: {[round(r.total_seconds * 1e3) for _, r in log]}; "
          f"(worker, bytes, of them shm): {[(n, r.migrated_bytes, r.migrated_bytes_shared) for n, r in log]}")
    for run in served:
        mismatched = [i for i, (a, b) in enumerate(zip(run, reference, strict=True)) if a != b]
        assert not mismatched, f"outputs changed by switching: requests {mismatched}"
    d2p = [r for _, r in log if r.to_role == ROLE_TO_PB[Role.PREFILL]]
    p2d = [r for _, r in log if r.to_role == ROLE_TO_PB[Role.DECODE]]
    assert len(d2p) >= N_SWITCHES // 2 and len(p2d) >= N_SWITCHES // 2 - 1
    assert max(r.migrated_requests for r in d2p) >= 2, "no decode -> prefill switch moved several requests"
    assert sum(r.migrated_requests for r in d2p) > 0 and all(r.migrated_bytes > 0 for r in d2p if r.migrated_requests)
    assert not any(r.fell_back_to_drain for r in d2p), [r.note for r in d2p]
    assert any(r.migrated_bytes_shared for r in d2p), "no move went through shared memory"
    assert any(r.migrated_bytes > r.migrated_bytes_shared for r in d2p), "no move sent its KV over gRPC"
    await assert_no_leaks(switch_cluster)


async def test_refuses_to_switch_the_last_worker_of_a_role(switch_cluster):
    # Whatever state the other test left: down to one prefill worker (the others may switch).
    prefill = sorted(n for n, r in (await roles(switch_cluster)).items() if r == Role.PREFILL)
    for name in prefill[1:]:
        await set_role(switch_cluster.workers[name], Role.DECODE)
    prefill = prefill[:1]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await set_role(switch_cluster.workers[prefill[0]], Role.DECODE)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "last prefill worker" in err.value.details()
