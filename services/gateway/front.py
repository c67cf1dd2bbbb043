"""The gateway itself, for every front end: the tokenizer and the model's limits, the request core
(services/gateway/lifecycle.py) for the serving mode, the topology kept fresh from the planner, the
load reported to it every interval, and start and drain. The gRPC adapter (server.py) and the
OpenAI HTTP API (openai_api.py) both turn their calls into `new_request` and `generate` here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import replace

import grpc

from common.config import GatewaySettings
from common.errors import InvalidArgument, Unavailable
from common.load import SLO, LoadForecast
from common.modeling.loader import load_config, load_tokenizer
from common.modes import serving_mode
from common.pb import common_pb2, planner_pb2, planner_pb2_grpc
from common.profile import load_profile, serving_profile_name
from common.rpc.channels import ChannelPool
from common.types import SamplingParams
from services.gateway import metrics
from services.gateway.grpc_backend import GrpcBackend
from services.gateway.lifecycle import GenerationRequest, RequestCore
from services.gateway.openai_api import HttpServer, create_app
from services.gateway.scheduling import SchedulingPolicy
from services.gateway.validation import GenerateParams, validate_context, validate_prompt_ids

log = logging.getLogger(__name__)


def build_core(settings: GatewaySettings, backend: GrpcBackend, tokenizer) -> RequestCore:
    """The request core for the settings' serving mode, with DOPD's scheduling policy where the
    mode runs it (its thresholds from each forecast of the planner)."""
    mode = serving_mode(settings.mode)
    if settings.admission:
        mode = replace(mode, admission=settings.admission == "on")
    profile = load_profile(serving_profile_name(settings.model, settings.planner_profile))
    slo = SLO(settings.slo_ttft_ms / 1e3, settings.slo_tpot_ms / 1e3,
              settings.slo_itl_ms / 1e3 if settings.slo_itl_ms is not None else None)
    core: RequestCore

    def policy_for(forecast: LoadForecast) -> SchedulingPolicy:
        decoding = [core.dispatch.decode_load.counts[w.worker_id] for w in backend.workers("decode")]
        typical = max(1, round(sum(decoding) / max(1, len(decoding))))
        return SchedulingPolicy.for_forecast(forecast, profile, slo, settings.prefill_token_budget, typical,
                                             admission=mode.admission)

    core = RequestCore(backend, tokenizer, no_worker_wait_s=settings.no_worker_wait_s, mode=mode,
                       policy_for=policy_for, time_scale=settings.time_scale,
                       decode_queue_limit=settings.decode_queue_limit, slo=slo)
    metrics.SLO_SECONDS.labels("ttft").set(slo.ttft_s * settings.time_scale)
    metrics.SLO_SECONDS.labels("tpot").set(slo.tpot_s * settings.time_scale)
    if slo.itl_s is not None:
        metrics.SLO_SECONDS.labels("itl").set(slo.itl_s * settings.time_scale)
    return core


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.channels = ChannelPool()
        self.backend = GrpcBackend(self.channels)
        self.core: RequestCore | None = None
        self.tokenizer = None
        self.config = None
        self.eos_ids: frozenset[int] = frozenset()
        self._tasks: list[asyncio.Task] = []
        self.serving = False  # what /health says: started and not draining
        self.http: HttpServer | None = None
        # How this gateway names itself to the planner on every topology fetch (several may serve
        # one port: `dopd up --gateways N`, or a Deployment's replicas).
        self.info = common_pb2.GatewayInfo(
            gateway_id=settings.gateway_id or f"gateway-{socket.gethostname()}-{os.getpid()}",
            address=f"{settings.public_host}:{settings.gateway_port}",
            metrics_address=f"{settings.public_host}:{settings.gateway_metrics_port}")

    @property
    def topology(self) -> planner_pb2.Topology:
        return self.backend.topology

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, handle) -> None:
        loop = asyncio.get_running_loop()
        self.tokenizer = await loop.run_in_executor(None, load_tokenizer, self.settings.model)
        self.config = await loop.run_in_executor(None, load_config, self.settings.model)
        eos = self.config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids |= {self.tokenizer.eos_token_id}
        self.core = build_core(self.settings, self.backend, self.tokenizer)
        self.core.recorder.start = time.time()
        self._tasks = [asyncio.create_task(self._watch_topology()), asyncio.create_task(self._report_load())]
        if self.settings.http_port:
            app = create_app(self, model=self.settings.model, api_key=self.settings.api_key,
                             default_max_tokens=self.settings.default_max_tokens,
                             timeout_s=self.settings.request_timeout_s)
            self.http = HttpServer(app, self.settings.host, self.settings.http_port, self.settings.drain_grace_s)
            await self.http.start()
            log.info("OpenAI API on http://%s:%d/v1", self.settings.host, self.settings.http_port)
        self.serving = True
        await handle.set_serving(True)

    async def drain(self) -> None:
        self.serving = False  # new HTTP requests get 503, as gRPC health says NOT_SERVING
        deadline = asyncio.get_running_loop().time() + self.settings.drain_grace_s
        while self.core and self.core.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.http is not None:
            await self.http.stop()

    def _planner(self) -> planner_pb2_grpc.PlannerStub:
        return planner_pb2_grpc.PlannerStub(self.channels.get(self.settings.planner_address))

    async def _watch_topology(self) -> None:
        while True:
            try:
                topology = await self._planner().GetTopology(planner_pb2.GetTopologyRequest(gateway=self.info),
                                                             timeout=self.settings.rpc_timeout_s)
                self.backend.topology = topology
                # Not alone: admission takes the prefill workers' own queue reports as a floor.
                alone = len(topology.gateways) <= 1
                self.core.dispatch.reported_prefill_tokens = {} if alone else {
                    w.worker_id: w.prefill_waiting_tokens for w in topology.workers}
            except grpc.aio.AioRpcError as exc:
                # The planner is away: keep routing by the last topology.
                log.debug("planner unreachable: %s", exc.code().name)
            self.backend.refresh_now.clear()
            try:
                await asyncio.wait_for(self.backend.refresh_now.wait(), self.settings.topology_refresh_s)
            except TimeoutError:
                pass

    async def _report_load(self) -> None:
        """Every interval, what arrived, how long it was, what it waited, what was refused."""
        while True:
            await asyncio.sleep(self.settings.load_interval_s)
            load = self.core.recorder.take(time.time())
            try:
                await self._planner().ReportLoad(planner_pb2.LoadReport(
                    source=f"{self.settings.public_host}:{self.settings.gateway_port}", start_unix=load.start,
                    duration_s=load.duration, arrivals=load.arrivals, prompt_lens=load.prompt_lens,
                    output_lens=load.output_lens, rejected=load.rejected, ttft_s=load.ttft, tpot_s=load.tpot),
                    timeout=self.settings.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.debug("load report lost (planner %s)", exc.code().name)

    # -- requests, for every front end ---------------------------------------------------------
    def text_prompt_ids(self, text: str) -> list[int]:
        try:
            return self.tokenizer(text).input_ids if text else []
        except Exception as exc:  # noqa: BLE001 - text the tokenizer cannot take (e.g. a lone surrogate)
            raise InvalidArgument(f"the prompt cannot be tokenized: {type(exc).__name__}: {exc}") from exc

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The model's chat template over `messages` ({"role", "content"} dicts), ready for the
        assistant's turn."""
        try:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages (e.g. roles)
            raise InvalidArgument(f"the model's chat template rejected the messages: {exc}") from exc

    def new_request(self, prompt: list[int], params: GenerateParams, request_id: str, timeout: float,
                    arrived: float) -> GenerationRequest:
        """A checked request for the core: prompt ids within the vocabulary and the context."""
        if self.core is None:
            raise Unavailable("gateway is still starting")
        validate_prompt_ids(prompt, self.config.vocab_size)
        validate_context(len(prompt), params.max_tokens, self.config.max_position_embeddings)
        sampling = SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            seed=params.seed if params.seed is not None else random.getrandbits(63),
            max_tokens=params.max_tokens, stop_token_ids=frozenset() if params.ignore_eos else self.eos_ids)
        return GenerationRequest(request_id=request_id or uuid.uuid4().hex, worker_request_id=uuid.uuid4().hex,
                                 prompt=prompt, params=sampling, stop=params.stop,
                                 deadline=time.monotonic() + timeout, arrived=arrived)

    def generate(self, req: GenerationRequest):
        return self.core.generate(req)
