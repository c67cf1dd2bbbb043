"""Mutual TLS on the internal plane (DOPD_TLS_CERT/KEY/CA, made by `dopd certs`): the cluster
serves through it (gateway -> workers, KV pushes, planner, `dopd status`); a client without a
certificate (even one with the cluster token), with one another CA signed, or in plaintext cannot
connect to a worker or the planner (UNAVAILABLE: the handshake fails; grpcio cannot ask for a
certificate without requiring it, so there is no UNAUTHENTICATED to give) and changes nothing;
the public gateway port stays plaintext."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from common.pb import planner_pb2, worker_pb2
from common.rpc.auth import TOKEN_KEY, cluster_token
from common.rpc.tls import ENV_CA, ENV_CERT, ENV_KEY, TLS_NAME, make_certs
from services.client import cluster_status, generate, worker_stats
from tests.helpers import assert_no_leaks, gateway_topology, start_cluster
from tests.integration.test_internal_auth import call, methods

SERVICES = [(worker_pb2.DESCRIPTOR, "Worker", "prefill-0"), (worker_pb2.DESCRIPTOR, "Worker", "decode-0"),
            (planner_pb2.DESCRIPTOR, "Planner", "planner")]
OVERRIDE = [("grpc.ssl_target_name_override", TLS_NAME)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    # `dopd certs`, as a user would run it.
    out = tmp_path_factory.mktemp("certs")
    done = subprocess.run([sys.executable, "-m", "services.cli", "certs", str(out)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert ENV_CERT in done.stdout
    return {"ca": out / "ca.pem", "cert": out / "cert.pem", "key": out / "key.pem"}


@pytest.fixture(scope="module")
def tls_cluster(redis_url, tmp_path_factory, certs):
    env = {ENV_CERT: str(certs["cert"]), ENV_KEY: str(certs["key"]), ENV_CA: str(certs["ca"])}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the launcher passes its environment on; this process calls as a member too
    try:
        handle = start_cluster("tiny-random", tmp_path_factory.mktemp("tls"), redis_url, "dopd-test-tls:")
        yield handle
        handle.cluster.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def test_the_cluster_serves_over_mutual_tls(tls_cluster):
    async with tls_cluster.channel() as ch:  # the gateway's public port: plaintext
        out = await generate(ch, [5, 6, 7], max_tokens=6, temperature=0.0)
    assert out.completion_tokens == 6
    status = await cluster_status(tls_cluster.gateway)  # what `dopd status` shows
    assert {s["name"]: s["health"] for s in status["services"]} == {
        "gateway": "SERVING", "planner": "SERVING", "prefill-0": "SERVING", "decode-0": "SERVING"}
    await assert_no_leaks(tls_cluster)


async def test_every_internal_rpc_refuses_a_client_without_the_clusters_certificate(tls_cluster, certs, tmp_path):
    addresses = {p.name: p.address for p in tls_cluster.cluster.procs}
    topology = await gateway_topology(tls_cluster)
    stats = {n: await worker_stats(a) for n, a in tls_cluster.workers.items()}
    other = make_certs(tmp_path / "other")  # another cluster's CA and certificate
    strangers = {
        "no certificate": lambda a: grpc.aio.secure_channel(
            a, grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes()), options=OVERRIDE),
        "another CA's certificate": lambda a: grpc.aio.secure_channel(a, grpc.ssl_channel_credentials(
            root_certificates=other["ca"].read_bytes(), private_key=other["key"].read_bytes(),
            certificate_chain=other["cert"].read_bytes()), options=OVERRIDE),
        "plaintext": grpc.aio.insecure_channel,
    }
    refused = 0
    for descriptor, service, target in SERVICES:
        for stranger, open_channel in strangers.items():
            async with open_channel(addresses[target]) as channel:
                for path, *kinds in methods(descriptor, service):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(channel, path, *kinds, ((TOKEN_KEY, cluster_token()),))
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (stranger, path, err.value.details())
                    refused += 1
    assert refused >= 3 * 3 * 4
    assert await gateway_topology(tls_cluster) == topology
    after = {n: await worker_stats(a) for n, a in tls_cluster.workers.items()}
    assert {n: (s.role, s.kv_blocks_used) for n, s in after.items()} == {
        n: (s.role, s.kv_blocks_used) for n, s in stats.items()}
