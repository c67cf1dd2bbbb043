"""One worker process: the model held once, the KV pool, both role engines, and the role.

The role decides which RPCs take new work (Prefill on a prefill worker; Decode and PushKV on a
decode worker); both engines exist from the start so that a role change needs no reload
(services/worker/role_switch.py). Which work is taken is RoleState's business (pure).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from common.config import WorkerSettings
from common.convert import ROLE_FROM_PB, ROLE_TO_PB
from common.kv.block_pool import BlockPool
from common.modeling.registry import RunnerSpec, build_runner
from common.pb import common_pb2, planner_pb2, planner_pb2_grpc
from common.rpc.channels import ChannelPool
from common.rpc.server import ServerHandle
from common.types import Role
from services.decode.engine import DecodeEngine
from services.decode.migration import Migrator
from services.decode.scheduler import DecodeScheduler
from services.engine import metrics
from services.kvtransfer import nixl_agent, transports
from services.kvtransfer.nixl_agent import NixlEndpoint
from services.kvtransfer.peer_pools import PeerPools
from services.kvtransfer.sender import grpc_sender_factory
from services.kvtransfer.staged_sender import StagedSender, Staging
from services.kvtransfer.transports import LocalKV, SharedReads
from services.prefill.engine import PrefillEngine
from services.worker.role_state import RoleState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerView:
    """Another worker, as the planner's topology shows it."""

    worker_id: str
    role: Role | None
    address: str
    kv_free_blocks: int
    serving: bool
    switching: bool


class WorkerRuntime:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.address = f"{settings.public_host}:{settings.worker_port}"
        self.metrics_address = f"{settings.public_host}:{settings.worker_metrics_port}"
        self.state = RoleState(Role(settings.role))
        self.channels = ChannelPool()
        # The model is not re-entrant: one thread runs every forward pass of this worker.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # KV copies out of the pool (migration), and on a GPU into it (PushKV), run here: never on
        # the loop, never behind a step.
        self.kv_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-io")
        # NIXL reads wait on a peer (a dead one up to DOPD_KV_TIMEOUT_S): not behind other copies.
        self.nixl_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nixl-io")
        self.runner_layout = None
        self.vocab_size = 0
        self.attention = ""
        self.pool: BlockPool | None = None
        self.prefill: PrefillEngine | None = None
        self.decode: DecodeEngine | None = None
        self.migrator: Migrator | None = None
        self.shared_reads: SharedReads | None = None
        self.nixl: NixlEndpoint | None = None
        self.kv_transports: tuple[str, ...] = ()  # how this worker reads peers' KV (advertised)
        # What each decode worker advertised, as the gateway passed it on with a Prefill: how our
        # hand-offs to it may go.
        self.peers = transports.PeerBook()  # what each peer reads, and refused: hand-offs and migrations
        self._heartbeat: asyncio.Task | None = None
        self._report_now = asyncio.Event()
        self._planner_warned = False
        self.switch_lock = asyncio.Lock()
        self._set_role_gauge()

    @property
    def role(self) -> Role:
        return self.state.role

    @property
    def draining(self) -> bool:
        return self.state.draining

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
        log.info("%s serving as %s on %s (%s, attention %s, %d KV blocks of %d tokens)", self.worker_id, self.role,
                 self.address, self.settings.model, self.attention, self.pool.num_blocks, self.pool.block_size)

    def _load(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        built = build_runner(RunnerSpec(model=s.model, device=s.device, dtype=s.dtype, kv_blocks=s.kv_blocks,
                                        block_size=s.block_size, time_scale=s.time_scale,
                                        shared_kv=any(t.reads_pool for t in transports.preference(s.kv_transport)),
                                        nixl_kv=transports.wants(s.kv_transport, "nixl") and nixl_agent.available()))
        runner = built.runner
        self.vocab_size, self.attention = built.vocab_size, built.attention
        self.runner_layout = runner.store.layout
        # The runner resolved the block size (DOPD_BLOCK_SIZE=0: by device and kernel); the gateway
        # and the planner learn it from this worker's reports.
        self.pool = BlockPool(s.kv_blocks, runner.store.block_size)
        metrics.KV_BLOCKS_CAPACITY.set(s.kv_blocks)
        metrics.WORKER_INFO.labels(self.worker_id, s.model).set(1)
        metrics.KV_BLOCKS_USED.set(0)
        self.nixl = self._nixl_endpoint(runner.store)
        shm = transports.wants(s.kv_transport, "shm")
        # What of our pool peers may read (None: sim or GPU pool, or grpc), and how we read theirs.
        self.local_kv = LocalKV(runner.store, getattr(runner.store, "shared_handle", None) if shm else None, self.nixl)
        reads = SharedReads(PeerPools() if shm else None, self.kv_executor, self.nixl, s.kv_timeout_s,
                            self.nixl_executor)
        self.kv_transports = tuple(t.name for t in transports.best_first() if t.reads_pool and t.reads_here(reads))
        self.shared_reads = reads if self.kv_transports else None
        stager = next((t for t in transports.best_first() if t.stages_hand_offs and t.offered(self.local_kv)), None)
        staging = Staging(self.local_kv, self.pool, stager) if stager is not None else None
        open_sender = grpc_sender_factory(
            self.channels, self.runner_layout, s.kv_chunk_min_bytes, s.kv_chunk_max_bytes,
            staged=functools.partial(StagedSender.open, staging=staging,
                                     on_refused=functools.partial(self._refused, stager.name))
            if staging is not None else None,
            reads_us=lambda address: stager is not None and self.peers.reads(address, stager.name))
        self.prefill = PrefillEngine(runner, self.executor, open_sender, s.prefill_token_budget,
                                     s.prefill_queue_limit)
        self.decode = DecodeEngine(runner, DecodeScheduler(self.pool, s.max_batch_size), self.executor,
                                   s.kv_timeout_s, s.step_token_budget, s.decode_waiting_limit)
        self.migrator = Migrator(self.decode, self.worker_id, self.channels, self.kv_executor,
                                 s.kv_chunk_max_bytes, s.kv_timeout_s, self.local_kv, s.kv_transport, self.peers)

    def _nixl_endpoint(self, store) -> NixlEndpoint | None:
        """This worker's NIXL agent, its pool registered: under `nixl`, or `auto` where NIXL is
        installed; never for a pool that holds no bytes (the sim engine's under gRPC)."""
        wanted = self.settings.kv_transport
        if not transports.wants(wanted, "nixl"):
            return None
        if wanted == "nixl" and not nixl_agent.available():
            raise RuntimeError("DOPD_KV_TRANSPORT=nixl, but NIXL is not installed (pip install '.[nixl]')")
        if not nixl_agent.available() or getattr(store, "kv", None) is None:
            return None
        try:
            endpoint = NixlEndpoint(self.worker_id, store.kv)
        except Exception as exc:
            if wanted == "nixl":
                raise
            log.warning("NIXL imports but cannot serve here (%s: %s): KV by shm and gRPC", type(exc).__name__, exc)
            return None
        log.info("NIXL agent %s: KV pool registered (%d MiB, %s)", endpoint.name, store.kv.nbytes >> 20,
                 endpoint.source().mem_type)
        return endpoint

    def learn_transports(self, address: str, advertised) -> None:
        self.peers.learn(address, advertised)

    def _refused(self, transport: str, address: str) -> None:
        if self.peers.refused(address, transport):
            log.warning("%s refused to read KV by %s from this worker: hand-offs to it send bytes", address,
                        transport)

    def _set_role_gauge(self) -> None:
        for role in Role:
            metrics.WORKER_ROLE.labels(role.value).set(1 if role == self.role else 0)

    def on_state_change(self) -> None:
        """A switch began or ended: tell the planner now, not at the next heartbeat."""
        self._set_role_gauge()
        self._report_now.set()

    def info(self) -> common_pb2.WorkerInfo:
        running = waiting = 0
        prefill_waiting = prefill_tokens = decode_running = decode_waiting = 0
        if self.ready:
            decode_running, decode_waiting = self.decode.scheduler.num_running, self.decode.scheduler.num_waiting
            prefill_waiting, prefill_tokens = self.prefill.num_waiting, self.prefill.scheduler.tokens_waiting
            running = decode_running + self.prefill.num_running
            waiting = decode_waiting + prefill_waiting
        metrics.WAITING_REQUESTS.set(waiting)
        return common_pb2.WorkerInfo(
            worker_id=self.worker_id, role=ROLE_TO_PB[self.role],
            address=self.address, metrics_address=self.metrics_address, model=self.settings.model,
            kv_blocks_total=self.pool.num_blocks if self.pool else 0,
            kv_blocks_used=self.pool.num_used if self.pool else 0, running_requests=running,
            waiting_requests=waiting, block_size=self.pool.block_size if self.pool else 0, serving=self.ready,
            prefill_waiting=prefill_waiting, prefill_waiting_tokens=prefill_tokens, decode_running=decode_running,
            decode_waiting=decode_waiting, switching=self.state.switching, kv_transports=self.kv_transports,
            chunk_budget=self.decode.local.step_token_budget if self.ready else 0)

    def is_idle(self) -> bool:
        return not self.ready or (not self.decode.scheduler.seqs and not self.prefill.busy)

    async def fetch_topology(self) -> list[PeerView]:
        stub = planner_pb2_grpc.PlannerStub(self.channels.get(self.settings.planner_address))
        topology = await stub.GetTopology(planner_pb2.GetTopologyRequest(), timeout=self.settings.rpc_timeout_s)
        return [PeerView(w.worker_id, ROLE_FROM_PB.get(w.role), w.address, w.kv_blocks_total - w.kv_blocks_used,
                         w.serving, w.switching) for w in topology.workers]

    async def report(self) -> bool:
        """One heartbeat to the planner now; False when it does not answer."""
        stub = planner_pb2_grpc.PlannerStub(self.channels.get(self.settings.planner_address))
        try:
            await stub.ReportWorker(self.info(), timeout=self.settings.rpc_timeout_s)
            return True
        except grpc.aio.AioRpcError as exc:
            if not self._planner_warned:
                log.warning("planner %s unreachable: %s", self.settings.planner_address, exc.code().name)
            self._planner_warned = True
            return False

    async def _heartbeat_loop(self) -> None:
        while True:
            self._report_now.clear()
            if await self.report():
                self._planner_warned = False
            try:
                await asyncio.wait_for(self._report_now.wait(), self.settings.heartbeat_s)
            except TimeoutError:
                pass

    async def drain(self) -> None:
        """Leave the topology (no new work is routed here), then let in-flight requests finish."""
        self.state.draining = True
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
        self.kv_executor.shutdown(wait=False, cancel_futures=True)
        # The agent's memory goes only after its reads have ended (each within DOPD_KV_TIMEOUT_S).
        self.nixl_executor.shutdown(wait=self.nixl is not None, cancel_futures=True)
        if self.nixl is not None:
            self.nixl.close()
