"""The internal plane refuses strangers: every method of dopd.v1.Worker and dopd.v1.Planner,
called without the cluster token or with a wrong one, answers UNAUTHENTICATED and changes
nothing; the public gateway API, health and the token-carrying callers go on working."""

from __future__ import annotations

import grpc
import pytest

from common.pb import planner_pb2, worker_pb2, worker_pb2_grpc
from common.rpc.auth import TOKEN_KEY, cluster_token
from common.rpc.channels import internal_channel
from services.client import generate, health, worker_stats
from tests.helpers import assert_no_leaks, gateway_topology, start_cluster


@pytest.fixture(scope="module")
def auth_cluster(redis_url, tmp_path_factory):
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp("auth"), redis_url, "dopd-test-auth:")
    yield handle
    handle.cluster.stop()


def methods(file_descriptor, service: str):
    svc = file_descriptor.services_by_name[service]
    for m in svc.methods:
        yield (f"/{svc.full_name}/{m.name}", m.client_streaming, m.server_streaming,
               m.input_type._concrete_class, m.output_type._concrete_class)


SERVICES = [(worker_pb2.DESCRIPTOR, "Worker", "prefill-0"), (worker_pb2.DESCRIPTOR, "Worker", "decode-0"),
            (planner_pb2.DESCRIPTOR, "Planner", "planner")]


async def call(channel, path, client_streaming, server_streaming, request_cls, response_cls, metadata):
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (client_streaming, server_streaming)]
    rpc = kind(path, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString)
    if client_streaming:
        async def requests():
            yield request_cls()
        result = rpc(requests(), metadata=metadata, timeout=5)
    else:
        result = rpc(request_cls(), metadata=metadata, timeout=5)
    if server_streaming:
        return [item async for item in result]
    return await result


@pytest.mark.parametrize("metadata", [(), ((TOKEN_KEY, "not-the-token"),)], ids=["no token", "wrong token"])
async def test_every_internal_rpc_refuses_a_caller_without_the_token(auth_cluster, metadata):
    assert cluster_token()  # the launcher made one for this process's clusters
    addresses = {p.name: p.address for p in auth_cluster.cluster.procs}
    topology = await gateway_topology(auth_cluster)
    stats = {n: await worker_stats(a) for n, a in auth_cluster.workers.items()}
    refused = 0
    for descriptor, service, target in SERVICES:
        async with grpc.aio.insecure_channel(addresses[target]) as channel:
            for path, *kinds in methods(descriptor, service):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(channel, path, *kinds, metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (path, err.value.details())
                assert "internal RPC" in err.value.details() and TOKEN_KEY in err.value.details()
                refused += 1
    assert refused >= 3 * 4  # every method of both services was tried
    # Nothing changed: roles, topology, KV.
    assert await gateway_topology(auth_cluster) == topology
    after = {n: await worker_stats(a) for n, a in auth_cluster.workers.items()}
    assert {n: (s.role, s.kv_blocks_used) for n, s in after.items()} == {
        n: (s.role, s.kv_blocks_used) for n, s in stats.items()}


async def test_public_apis_stay_open_and_token_holders_get_in(auth_cluster):
    for proc in auth_cluster.cluster.procs:
        assert await health(proc.address) == "SERVING"  # probes need no token
    async with auth_cluster.channel() as ch:  # the gateway's API: public
        out = await generate(ch, [5, 6, 7], max_tokens=4, temperature=0.0)
    assert out.completion_tokens == 4
    async with internal_channel(auth_cluster.workers["decode-0"]) as ch:  # carries the token
        reply = await worker_pb2_grpc.WorkerStub(ch).GetStats(worker_pb2.GetStatsRequest(), timeout=5)
    assert reply.worker_id == "decode-0"
    await assert_no_leaks(auth_cluster)
