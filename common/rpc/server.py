"""What every DOPD server has: grpc.health.v1 (NOT_SERVING until ready), reflection, Prometheus
metrics on an HTTP port, and a graceful drain on SIGTERM/SIGINT.

    await run_server(port=..., metrics_port=..., services=[...], start=..., drain=...)

`start` runs after the port is bound (load the model there: health says NOT_SERVING meanwhile);
`drain` runs on SIGTERM after health turns NOT_SERVING and before the server stops accepting
calls, with in-flight calls given `grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import EXIT_MODEL_REFUSED, ModelRefused
from common.rpc.channels import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Accept the clients' keepalive pings (every 10 s) on idle connections. NOTE: the key is
    # gRPC core's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; unknown keys are ignored
    # silently, and with the default (5 min) an idle connection's pings were "too many": the server
    # sent GOAWAY and a call just starting on it failed UNAVAILABLE (one request in a 55-minute
    # sim-engine run, docs/results/bench-planner-r26).
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]


@dataclass
class Service:
    name: str  # full name, e.g. dopd.v1.Worker
    servicer: object
    add_to_server: Callable


class ServerHandle:
    """Lets the service code flip health and ask for a drain."""

    def __init__(self, server: grpc.aio.Server, health_servicer, names: list[str]) -> None:
        self.server = server
        self.health = health_servicer
        self.names = names
        self.stopping = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.names]:
            await self.health.set(name, status)


async def run_server(*, host: str, port: int, metrics_port: int, services: list[Service],
                     start: Callable[[ServerHandle], Awaitable[None]] | None = None,
                     drain: Callable[[], Awaitable[None]] | None = None, grace: float = 10.0,
                     cluster_token: str = "", internal: bool = True, api_key: str = "") -> None:
    """`internal`: a server of the internal plane (a worker, the planner), which listens with
    mutual TLS when the process has TLS files (common/rpc/tls.py); the gateway's public port does not.
    `api_key`: the public API's methods need it (common/rpc/auth.ApiKeyInterceptor)."""
    from common.rpc.auth import ApiKeyInterceptor, server_interceptors
    from common.rpc.errors import UndecodableIsInvalid
    from common.rpc.tls import server_credentials, tls_files

    tls = tls_files() if internal else None
    interceptors = [*server_interceptors(cluster_token, ", ".join(s.name for s in services)),
                    *([ApiKeyInterceptor(api_key)] if api_key else []), UndecodableIsInvalid()]
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    for service in services:
        service.add_to_server(service.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.name for s in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = (server.add_secure_port(f"{host}:{port}", server_credentials(tls)) if tls is not None
             else server.add_insecure_port(f"{host}:{port}"))
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    metrics_server, _ = prometheus_client.start_http_server(metrics_port, addr=host)
    handle = ServerHandle(server, health_servicer, names)
    await handle.set_serving(False)
    await server.start()
    log.info("listening on %s:%d%s, metrics on %s:%d", host, port, " (mutual TLS)" if tls is not None else "",
             host, metrics_port)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle.stopping.set)
    try:
        if start is not None:
            start_task = asyncio.create_task(start(handle))
            stop_task = asyncio.create_task(handle.stopping.wait())
            await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if start_task.done():
                if start_task.exception() is not None:  # a failed start: close the server, then raise
                    await server.stop(None)
                    start_task.result()
            else:
                start_task.cancel()
        await handle.stopping.wait()
        log.info("draining (grace %.1fs)", grace)
        await handle.set_serving(False)
        if drain is not None:
            await drain()
        await server.stop(grace)
    finally:
        metrics_server.shutdown()
        log.info("stopped")


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Entry point for a service process: uvloop, logging, then main()."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        uvloop.run(main())
    except ModelRefused as exc:
        # One line, no traceback: what the user must change is the model, and a restart cannot help.
        log.error("%s", exc)
        sys.exit(EXIT_MODEL_REFUSED)
