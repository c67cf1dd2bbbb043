"""The planner service: the registry of workers (the topology the gateway routes by), the load
reports of the gateways, and the control loop that forecasts, splits and switches roles
(services/planner/controller.py around the pure services/planner/core.py).

Workers' reports are mirrored to Redis and the load history lives there (best effort, short
timeouts): the planner keeps deciding from memory when Redis is away, and a restarted planner
resumes from what Redis holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import redis.asyncio as aioredis
from google.protobuf.json_format import MessageToDict
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.config import PlannerSettings
from common.convert import ROLE_FROM_PB, forecast_to_pb
from common.errors import InvalidArgument, Unavailable
from common.load import SLO
from common.pb import planner_pb2, planner_pb2_grpc
from common.profile import load_profile, serving_profile_name
from common.rpc.channels import ChannelPool
from common.rpc.errors import grpc_errors
from common.rpc.server import Service, run_server
from services.planner import metrics
from services.planner.controller import Clock, PlannerController
from services.planner.core import PlannerCore, PoolShape
from services.planner.history import LoadHistory
from services.planner.policy import PolicyConfig, ReconfigPolicy
from services.planner.predictors import make_predictor
from services.planner.registry import GatewayBook, WorkerRegistry

log = logging.getLogger(__name__)


def profile_name(settings: PlannerSettings) -> str:
    return serving_profile_name(settings.model, settings.planner_profile)


def build_core(settings: PlannerSettings, kv_blocks: int, block_size: int) -> PlannerCore | None:
    if settings.planner_mode == "off":
        return None
    policy = ReconfigPolicy(PolicyConfig.from_settings(settings))
    return PlannerCore(
        predictor=make_predictor(settings.predictor), profile=load_profile(profile_name(settings)),
        slo=SLO(settings.slo_ttft_ms / 1e3, settings.slo_tpot_ms / 1e3,
                settings.slo_itl_ms / 1e3 if settings.slo_itl_ms is not None else None),
        shape=PoolShape(kv_blocks, block_size, settings.max_batch_size, settings.prefill_token_budget),
        interval_s=settings.interval_s, switching=settings.planner_mode == "dynamic", policy=policy,
        mixed=settings.mixed_workers)


class PlannerServicer(planner_pb2_grpc.PlannerServicer):
    def __init__(self, settings: PlannerSettings, redis_client: aioredis.Redis | None) -> None:
        self.settings = settings
        self.registry: WorkerRegistry = WorkerRegistry(ttl=settings.worker_ttl_s)
        self.gateways: GatewayBook = GatewayBook(ttl=settings.worker_ttl_s)
        self.redis = redis_client
        self.channels = ChannelPool()
        self.controller = PlannerController(
            None, LoadHistory(redis_client, settings.redis_prefix + "load", settings.history_max_age_s),
            self.registry, self.channels, Clock(settings.time_scale), settings.switch_timeout_s)
        self._started = time.monotonic()
        self._redis_warned = False

    def _ensure_core(self, info) -> None:
        """The split needs the workers' pool shape: built from the first worker's report."""
        if self.controller.core is None and self.settings.planner_mode != "off" and info.kv_blocks_total:
            self.controller.core = build_core(self.settings, info.kv_blocks_total, info.block_size)

    @grpc_errors
    async def ReportWorker(self, request, context):
        if not request.worker_id or not request.address:
            raise InvalidArgument("worker_id and address are required")
        self.registry.report(request.worker_id, request.role, request, time.monotonic())
        self._ensure_core(request)
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
        if time.monotonic() - self._started < self.settings.warmup_s:
            raise Unavailable("the planner just started and is waiting for the workers' heartbeats")
        now = time.monotonic()
        if request.gateway.gateway_id:
            self.gateways.seen(request.gateway.gateway_id, request.gateway, now)
        workers = self.registry.live(now)
        for role, name in ROLE_FROM_PB.items():
            metrics.LIVE_WORKERS.labels(str(name)).set(sum(w.role == role for w in workers))
        last = self.controller.last
        return planner_pb2.Topology(
            workers=workers, version=self.registry.version, gateways=self.gateways.live(now),
            planner_metrics_address=f"{self.settings.public_host}:{self.settings.planner_metrics_port}",
            forecast=forecast_to_pb(last.forecast) if last is not None else None)

    @grpc_errors
    async def ReportLoad(self, request, context):
        if request.duration_s < 0 or request.arrivals < 0 or len(request.prompt_lens) > request.arrivals:
            raise InvalidArgument("a load report needs duration_s >= 0 and at most one prompt length per arrival")
        self.controller.report(request)
        return planner_pb2.ReportLoadResponse()

    @grpc_errors
    async def GetPlan(self, request, context):
        return self.controller.status(self.settings.planner_mode, self.settings.predictor)

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
    make_predictor(settings.predictor)  # fail at start on a bad name
    load_profile(profile_name(settings))
    client = aioredis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                               socket_connect_timeout=settings.redis_timeout_s,
                               retry=Retry(NoBackoff(), 0))
    servicer = PlannerServicer(settings, client)
    loop_task = None

    async def start(handle):
        nonlocal loop_task
        await servicer.controller.resume()
        loop_task = asyncio.create_task(servicer.controller.run(settings.interval_s))
        await handle.set_serving(True)

    try:
        await run_server(host=settings.host, port=settings.planner_port,
                         metrics_port=settings.planner_metrics_port,
                         services=[Service("dopd.v1.Planner", servicer,
                                           planner_pb2_grpc.add_PlannerServicer_to_server)],
                         start=start, grace=settings.drain_grace_s, cluster_token=settings.cluster_token)
    finally:
        if loop_task is not None:
            loop_task.cancel()
        await servicer.controller.close()
        await servicer.channels.close()
        await client.aclose()
