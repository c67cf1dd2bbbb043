"""One worker process: the model held once, the KV pool, both role engines, and the role.

The role decides which RPCs are served (Prefill on a prefill worker; Decode and PushKV on a decode
worker); both engines exist from the start so that a role change needs no reload.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from common.config import WorkerSettings
from common.convert import ROLE_TO_PB
from common.kv.block_pool import BlockPool
from common.kv.kv_store import PagedKVStore
from common.kv.wire import dtype_from_name
from common.modeling.loader import is_sim, load_model, sim_profile_name
from common.modeling.runner import ModelRunner, kv_layout
from common.modeling.sim_runner import PSEUDO_TOKEN_HIGH, SimRunner
from common.pb import common_pb2, planner_pb2, planner_pb2_grpc
from common.profile import load_profile
from common.rpc.channels import ChannelPool
from common.rpc.server import ServerHandle
from services.decode.engine import DecodeEngine
from services.decode.scheduler import DecodeScheduler
from services.prefill.engine import KVChunkSizes, PrefillEngine
from services.worker import metrics

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


class WorkerRuntime:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.address = f"{settings.public_host}:{settings.worker_port}"
        self.metrics_address = f"{settings.public_host}:{settings.worker_metrics_port}"
        self.role = settings.role
        self.channels = ChannelPool()
        # The model is not re-entrant: one thread runs every forward pass of this worker.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.runner_layout = None
        self.vocab_size = 0
        self.attention = ""
        self.pool: BlockPool | None = None
        self.prefill: PrefillEngine | None = None
        self.decode: DecodeEngine | None = None
        self._heartbeat: asyncio.Task | None = None
        self.draining = False
        self._set_role_gauge()

    @property
    def ready(self) -> bool:
        return self.decode is not None

    async def start(self, handle: ServerHandle) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._load)
        self.prefill.start()
        self.decode.start()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        await handle.set_serving(True)
        log.info("%s serving as %s on %s (%s, attention %s, %d KV blocks)", self.worker_id, self.role,
                 self.address, self.settings.model, self.attention, self.pool.num_blocks)

    def _load(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        runner = self._load_sim() if is_sim(s.model) else self._load_model()
        self.runner_layout = runner.store.layout
        self.pool = BlockPool(s.kv_blocks, s.block_size)
        metrics.KV_BLOCKS_TOTAL.set(s.kv_blocks)
        metrics.KV_BLOCKS_USED.set(0)
        self.prefill = PrefillEngine(runner, self.runner_layout, self.executor, self.channels,
                                     s.prefill_token_budget, KVChunkSizes(s.kv_chunk_min_bytes, s.kv_chunk_max_bytes))
        self.decode = DecodeEngine(runner, DecodeScheduler(self.pool, s.max_batch_size), self.executor,
                                   s.kv_timeout_s)

    def _load_model(self) -> ModelRunner:
        s = self.settings
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      transient=False) as progress:
            task = progress.add_task(f"loading {s.model}", total=3)
            loaded = load_model(s.model, s.device, dtype_from_name(s.dtype))
            progress.update(task, advance=1, description="allocating the KV pool")
            runner = ModelRunner(loaded, PagedKVStore(kv_layout(loaded), s.kv_blocks, s.block_size, loaded.device))
            progress.update(task, advance=1, description="warming up")
            runner.prefill([[1, 2, 3]], None)
            progress.update(task, advance=1, description=f"{s.model} ready")
        self.vocab_size = loaded.config.vocab_size
        self.attention = loaded.attention
        return runner

    def _load_sim(self) -> SimRunner:
        profile = load_profile(sim_profile_name(self.settings.model))
        self.vocab_size = PSEUDO_TOKEN_HIGH
        self.attention = f"sim ({profile.name}, time scale {self.settings.time_scale:g})"
        return SimRunner(profile, self.settings.kv_blocks, self.settings.block_size, self.settings.time_scale)

    def _set_role_gauge(self) -> None:
        for role in ROLES:
            metrics.WORKER_ROLE.labels(role).set(1 if role == self.role else 0)

    def info(self) -> common_pb2.WorkerInfo:
        running = waiting = 0
        if self.ready:
            running = self.decode.scheduler.num_running + self.prefill.num_running
            waiting = self.decode.scheduler.num_waiting + self.prefill.num_waiting
        metrics.WAITING_REQUESTS.set(waiting)
        return common_pb2.WorkerInfo(
            worker_id=self.worker_id, role=ROLE_TO_PB[self.role],
            address=self.address, metrics_address=self.metrics_address, model=self.settings.model,
            kv_blocks_total=self.pool.num_blocks if self.pool else 0,
            kv_blocks_used=self.pool.num_used if self.pool else 0, running_requests=running,
            waiting_requests=waiting, block_size=self.settings.block_size, serving=self.ready)

    def is_idle(self) -> bool:
        return not self.ready or (not self.decode.scheduler.seqs and not self.prefill.busy)

    async def _heartbeat_loop(self) -> None:
        stub = planner_pb2_grpc.PlannerStub(self.channels.get(self.settings.planner_address))
        warned = False
        while True:
            try:
                await stub.ReportWorker(self.info(), timeout=self.settings.rpc_timeout_s)
                warned = False
            except grpc.aio.AioRpcError as exc:
                if not warned:
                    log.warning("planner %s unreachable: %s", self.settings.planner_address, exc.code().name)
                    warned = True
            await asyncio.sleep(self.settings.heartbeat_s)

    async def drain(self) -> None:
        """Leave the topology (no new work is routed here), then let in-flight requests finish."""
        self.draining = True
        if self._heartbeat:
            self._heartbeat.cancel()
        stub = planner_pb2_grpc.PlannerStub(self.channels.get(self.settings.planner_address))
        try:
            await stub.RemoveWorker(planner_pb2.RemoveWorkerRequest(worker_id=self.worker_id),
                                    timeout=self.settings.rpc_timeout_s)
        except grpc.aio.AioRpcError:
            pass
        deadline = asyncio.get_running_loop().time() + self.settings.drain_grace_s
        while not self.is_idle() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self.ready:
            await self.prefill.stop()
            await self.decode.stop()
        await self.channels.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
