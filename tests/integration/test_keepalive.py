"""Keepalive pings on an idle connection must not get a call killed.

Our channels ping every 10 s (common/rpc/channels.py CHANNEL_OPTIONS) so that a dead host is noticed;
our servers must accept that. A misspelt server option once left gRPC's 5-minute default in
place: the server counted the pings of an idle connection as abuse, sent GOAWAY (too_many_pings),
and a call open on it failed UNAVAILABLE. Here a health Watch stream (no data while the status
stays the same) sits idle through several pings, a little faster than ours, and must still be open.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.rpc.channels import CHANNEL_OPTIONS
from common.rpc.server import SERVER_OPTIONS
from services.launcher import free_port

PING_EVERY_MS = 6_000  # our servers accept one every 5 s; ours are 10 s apart
IDLE_S = 20  # three pings: the third would be the strike that closes the connection


async def test_an_idle_stream_survives_our_keepalive_pings():
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    options = [o for o in CHANNEL_OPTIONS if o[0] != "grpc.keepalive_time_ms"]
    options += [("grpc.keepalive_time_ms", PING_EVERY_MS), ("grpc.http2.max_pings_without_data", 0)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=IDLE_S + 30)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            reader = asyncio.ensure_future(watch.read())
            done, _ = await asyncio.wait({reader}, timeout=IDLE_S)
            # Nothing arrives (the status stays the same), and nothing breaks.
            assert not done and not watch.done(), (reader.result(), await watch.code(), await watch.details())
            watch.cancel()
    finally:
        await server.stop(0)
