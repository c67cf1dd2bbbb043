"""The workers as the gateway's request core sees them, over gRPC: topology from the planner,
Decode/Prefill calls to the workers, their replies as plain events and their failures as
domain errors (common/rpc/errors.py: domain_error)."""

from __future__ import annotations

import asyncio

import grpc

from common.convert import FINISH_FROM_PB, forecast_from_pb, sampling_to_pb
from common.errors import Unavailable
from common.load import LoadForecast
from common.pb import common_pb2, planner_pb2, worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool
from common.rpc.errors import domain_error
from common.types import SamplingParams
from services.gateway.events import DecodeEvent, Finished, Moved, Reserved, Tokens
from services.gateway.routing import WorkerView

# Who serves each kind of work: a mixed worker decodes too (and takes whole prompts: "mixed").
_ROLES = {"prefill": {common_pb2.ROLE_PREFILL}, "decode": {common_pb2.ROLE_DECODE, common_pb2.ROLE_MIXED},
          "mixed": {common_pb2.ROLE_MIXED}}


def event_from_pb(event: worker_pb2.DecodeEvent) -> DecodeEvent:
    kind = event.WhichOneof("event")
    if kind == "tokens":
        return Tokens(tuple(event.tokens.token_ids), event.tokens.start_index)
    if kind == "finished":
        return Finished(FINISH_FROM_PB[event.finished.reason], event.finished.completion_tokens)
    if kind == "moved":
        return Moved(event.moved.worker_id, event.moved.address, event.moved.next_index)
    if kind == "reserved":
        return Reserved(event.reserved.blocks)
    raise Unavailable(f"a decode worker sent an event of an unknown kind: {kind}")


class GrpcDecodeStream:
    def __init__(self, call, worker_id: str) -> None:
        self.call = call
        self.worker_id = worker_id

    async def next(self) -> DecodeEvent | None:
        try:
            event = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, f"decode worker {self.worker_id}") from None
        return None if event is grpc.aio.EOF else event_from_pb(event)

    def cancel(self) -> None:
        self.call.cancel()


class GrpcBackend:
    def __init__(self, channels: ChannelPool) -> None:
        self.channels = channels
        self._topology = planner_pb2.Topology()
        self._forecast: tuple[planner_pb2.Topology, LoadForecast | None] | None = None  # parsed once a topology
        self._updated = asyncio.Event()  # set (and replaced) whenever a topology arrives
        self.refresh_now = asyncio.Event()  # asks the topology watcher for a fetch now

    @property
    def topology(self) -> planner_pb2.Topology:
        return self._topology

    @topology.setter
    def topology(self, value: planner_pb2.Topology) -> None:
        self._topology = value
        self._updated.set()
        self._updated = asyncio.Event()

    async def next_topology(self, timeout: float) -> None:
        """Wait (at most `timeout`) for the next topology from the planner, asking for it now."""
        updated = self._updated
        self.refresh_now.set()
        try:
            await asyncio.wait_for(updated.wait(), timeout)
        except TimeoutError:
            pass

    def workers(self, role: str) -> list[WorkerView]:
        """Workers serving `role` by the last topology (decode: mixed workers too); none in the
        middle of a role switch."""
        return [WorkerView(w.worker_id, w.address, w.kv_blocks_total - w.kv_blocks_used, w.block_size,
                           tuple(w.kv_transports), w.chunk_budget)
                for w in self.topology.workers if w.role in _ROLES[role] and w.serving and not w.switching]

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(self.channels.get(address))

    async def _open(self, worker_id: str, address: str, request: worker_pb2.DecodeRequest,
                    timeout: float) -> GrpcDecodeStream:
        call = self._stub(address).Decode(request, timeout=timeout)
        stream = GrpcDecodeStream(call, worker_id)
        try:
            first = await stream.next()
        except BaseException:
            call.cancel()
            raise
        if not isinstance(first, Reserved):
            call.cancel()
            raise Unavailable(f"decode worker {worker_id} did not confirm the reservation")
        return stream

    async def open_decode(self, worker: WorkerView, request_id: str, prompt_len: int, params: SamplingParams,
                          timeout: float, prompt: list[int] | None = None, max_seats: int = 0) -> GrpcDecodeStream:
        return await self._open(worker.worker_id, worker.address, worker_pb2.DecodeRequest(
            request_id=request_id, prompt_len=prompt_len, sampling=sampling_to_pb(params),
            prompt_token_ids=prompt or (), max_seats=max_seats), timeout)

    def forecast(self) -> LoadForecast | None:
        """The planner's forecast in the last topology (None before its first decision)."""
        if not self.topology.HasField("forecast"):
            return None
        if self._forecast is None or self._forecast[0] is not self.topology:
            self._forecast = (self.topology, forecast_from_pb(self.topology.forecast))
        return self._forecast[1]

    async def attach_decode(self, moved: Moved, request_id: str, timeout: float) -> GrpcDecodeStream:
        return await self._open(moved.worker_id, moved.address,
                                worker_pb2.DecodeRequest(request_id=request_id, attach=True), timeout)

    async def prefill(self, worker: WorkerView, request_id: str, prompt: list[int], params: SamplingParams,
                      decode_address: str, timeout: float, decode_transports: tuple[str, ...] = ()) -> int:
        try:
            reply = await self._stub(worker.address).Prefill(worker_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling=sampling_to_pb(params),
                decode_address=decode_address, decode_kv_transports=decode_transports), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, f"prefill worker {worker.worker_id}") from None
        return reply.first_token_id

