"""Planner service (minimal for now): the registry of workers and their roles, from which the
gateway learns the topology. Each report is mirrored to Redis (best effort, short timeouts), so
an operator or a restarted planner can see who was serving; the planner keeps serving from memory
when Redis is away.
"""

from __future__ import annotations

import json
import logging
import time

import redis.asyncio as aioredis
from google.protobuf.json_format import MessageToDict
from prometheus_client import Gauge
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.config import PlannerSettings
from common.convert import ROLE_FROM_PB
from common.pb import planner_pb2, planner_pb2_grpc
from common.rpc.errors import InvalidArgument, grpc_errors
from common.rpc.server import Service, run_server
from services.planner.registry import WorkerRegistry

log = logging.getLogger(__name__)
LIVE_WORKERS = Gauge("dopd_planner_live_workers", "Workers in the topology", ["role"])


class PlannerServicer(planner_pb2_grpc.PlannerServicer):
    def __init__(self, settings: PlannerSettings, redis_client: aioredis.Redis | None) -> None:
        self.settings = settings
        self.registry: WorkerRegistry = WorkerRegistry(ttl=settings.worker_ttl_s)
        self.redis = redis_client
        self._redis_warned = False

    @grpc_errors
    async def ReportWorker(self, request, context):
        if not request.worker_id or not request.address:
            raise InvalidArgument("worker_id and address are required")
        self.registry.report(request.worker_id, request.role, request, time.monotonic())
        await self._mirror(request)
        return planner_pb2.ReportWorkerResponse()

    @grpc_errors
    async def RemoveWorker(self, request, context):
        self.registry.remove(request.worker_id, time.monotonic())
        if self.redis is not None:
            try:
                await self.redis.hdel(self.settings.redis_prefix + "workers", request.worker_id)
            except Exception:  # noqa: BLE001 - Redis is a mirror, never a dependency
                pass
        return planner_pb2.RemoveWorkerResponse()

    @grpc_errors
    async def GetTopology(self, request, context):
        workers = self.registry.live(time.monotonic())
        for role, name in ROLE_FROM_PB.items():
            LIVE_WORKERS.labels(name).set(sum(w.role == role for w in workers))
        return planner_pb2.Topology(
            workers=workers, version=self.registry.version,
            planner_metrics_address=f"{self.settings.public_host}:{self.settings.planner_metrics_port}")

    async def _mirror(self, info) -> None:
        if self.redis is None:
            return
        try:
            doc = MessageToDict(info, preserving_proto_field_name=True)
            doc["reported_at"] = time.time()
            await self.redis.hset(self.settings.redis_prefix + "workers", info.worker_id, json.dumps(doc))
            self._redis_warned = False
        except Exception as exc:  # noqa: BLE001 - Redis is a mirror, never a dependency
            if not self._redis_warned:
                log.warning("redis mirror unavailable (%s); serving from memory", exc)
                self._redis_warned = True


async def main() -> None:
    settings = PlannerSettings()
    client = aioredis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                               socket_connect_timeout=settings.redis_timeout_s,
                               retry=Retry(NoBackoff(), 0))
    servicer = PlannerServicer(settings, client)

    async def start(handle):
        await handle.set_serving(True)

    try:
        await run_server(host=settings.host, port=settings.planner_port,
                         metrics_port=settings.planner_metrics_port,
                         services=[Service("dopd.v1.Planner", servicer,
                                           planner_pb2_grpc.add_PlannerServicer_to_server)],
                         start=start, grace=settings.drain_grace_s)
    finally:
        await client.aclose()
