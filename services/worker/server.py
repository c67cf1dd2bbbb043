"""gRPC adapter of a worker: protobuf in, engine calls, protobuf out."""

from __future__ import annotations

import logging

from common.config import WorkerSettings
from common.convert import FINISH_TO_PB, ROLE_FROM_PB, ROLE_TO_PB, sampling_from_pb
from common.errors import InvalidArgument, Refused
from common.pb import worker_pb2, worker_pb2_grpc
from common.prompts import validate_prompt_ids
from common.rpc.errors import grpc_errors
from common.rpc.server import Service, run_server
from common.types import Role
from services.decode.engine import ErrorEvent, FinishedEvent, MovedEvent, TokensEvent
from services.engine import metrics
from services.kvtransfer.receiver import receive_kv
from services.kvtransfer.sender import KV_ACCEPTED
from services.worker.role_switch import switch_role
from services.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime

    def _require(self, role: Role) -> None:
        """New work of `role` is taken now, or the call is refused (the caller tries elsewhere)."""
        if not self.rt.ready:
            raise Refused("worker is still loading its model")
        reason = self.rt.state.refusal(role)
        if reason is not None:
            raise Refused(f"worker {self.rt.worker_id} {reason}")

    def _check_tokens(self, prompt) -> list[int]:
        ids = list(prompt)
        validate_prompt_ids(ids, self.rt.vocab_size)
        return ids

    @grpc_errors
    async def Prefill(self, request, context):
        self._require(Role.PREFILL)
        prompt = self._check_tokens(request.prompt_token_ids)
        if not request.decode_address:
            raise InvalidArgument("decode_address is empty")
        timeout = context.time_remaining() or self.rt.settings.rpc_timeout_s
        self.rt.learn_transports(request.decode_address, request.decode_kv_transports)
        result = await self.rt.prefill.prefill(request.request_id, prompt, sampling_from_pb(request.sampling),
                                               request.decode_address, timeout)
        return worker_pb2.PrefillResponse(
            first_token_id=result.first_token_id, queue_seconds=result.queue_seconds,
            prefill_seconds=result.prefill_seconds, handoff_seconds=result.handoff_seconds,
            kv_bytes=result.kv_bytes)

    @grpc_errors
    async def Decode(self, request, context):
        engine = self.rt.decode
        if request.attach:
            if not self.rt.ready:
                raise Refused("worker is still loading its model")
            queue, seq = engine.attach(request.request_id)
        else:
            self._require(Role.DECODE)
            if request.prompt_len < 1:
                raise InvalidArgument("prompt_len must be at least 1")
            params = sampling_from_pb(request.sampling)
            if params.max_tokens < 1:
                raise InvalidArgument("max_tokens must be at least 1")
            if request.max_seats < 0:
                raise InvalidArgument(f"max_seats must be >= 0 (0: no limit), got {request.max_seats}")
            queue = engine.reserve(request.request_id, request.prompt_len, params, request.max_seats)
            seq = engine.scheduler.seqs[request.request_id]
            if request.prompt_token_ids:
                try:
                    engine.prefill_here(request.request_id, self._check_tokens(request.prompt_token_ids))
                except InvalidArgument:
                    engine.release(request.request_id)
                    raise
        try:
            yield worker_pb2.DecodeEvent(reserved=worker_pb2.DecodeEvent.Reserved(
                blocks=len(seq.block_table) if seq else 0))
            pending = None
            while True:
                event, pending = pending or await queue.get(), None
                if isinstance(event, TokensEvent):
                    # Tokens that queued up while the reader was slow go out as one message.
                    token_ids = list(event.token_ids)
                    while pending is None and not queue.empty():
                        nxt = queue.get_nowait()
                        if isinstance(nxt, TokensEvent):
                            token_ids.extend(nxt.token_ids)
                        else:
                            pending = nxt
                    yield worker_pb2.DecodeEvent(tokens=worker_pb2.DecodeEvent.Tokens(
                        token_ids=token_ids, start_index=event.start_index))
                elif isinstance(event, FinishedEvent):
                    yield worker_pb2.DecodeEvent(finished=worker_pb2.DecodeEvent.Finished(
                        reason=FINISH_TO_PB[event.finish.value], completion_tokens=event.completion_tokens))
                    return
                elif isinstance(event, MovedEvent):
                    yield worker_pb2.DecodeEvent(moved=worker_pb2.DecodeEvent.Moved(
                        worker_id=event.worker_id, address=event.address, next_index=event.next_index))
                    return
                elif isinstance(event, ErrorEvent):
                    raise event.error
        finally:
            # Finished, failed, moved or cancelled by the client: every block goes back.
            engine.release(request.request_id, seq)

    @grpc_errors
    async def PushKV(self, request_iterator, context):
        if not self.rt.ready:
            raise Refused("worker is still loading its model")
        may_adopt = self.rt.state.refusal(Role.DECODE) is None
        received = await receive_kv(request_iterator, self.rt.decode, self.rt.runner_layout, self.rt.vocab_size,
                                    may_adopt, self.rt.shared_reads, self.rt.kv_executor,
                                    accepted=lambda: context.send_initial_metadata(KV_ACCEPTED))
        return worker_pb2.PushKVResponse(bytes_received=received)

    @grpc_errors
    async def GetStats(self, request, context):
        return self.rt.info()

    @grpc_errors
    async def SetRole(self, request, context):
        to = ROLE_FROM_PB.get(request.role)
        if to is None:
            raise InvalidArgument("role must be ROLE_PREFILL, ROLE_DECODE or ROLE_MIXED")
        if request.chunk_budget < 0 or (request.chunk_budget and to is not Role.MIXED):
            raise InvalidArgument("chunk_budget is a mixed worker's: >= 0, and only with ROLE_MIXED")
        if not self.rt.ready:
            raise Refused("worker is still loading its model")
        async with self.rt.switch_lock:
            budget = request.chunk_budget or self.rt.settings.step_token_budget
            if to is Role.MIXED and self.rt.state.role is Role.MIXED and not self.rt.state.switching:
                self.rt.decode.local.step_token_budget = budget  # a new budget only: no switch
                self.rt.on_state_change()
                return worker_pb2.SetRoleResponse(from_role=ROLE_TO_PB[to], to_role=ROLE_TO_PB[to])
            result = await switch_role(self.rt, to)
            # A mixed worker prefills at the planner's budget; any other at the worker's own
            # (a decode worker's ultra-short prompts).
            self.rt.decode.local.step_token_budget = budget if to is Role.MIXED else self.rt.settings.step_token_budget
        metrics.ROLE_SWITCH_SECONDS.labels(result.from_role.value, result.to_role.value).observe(result.total_seconds)
        moved = result.migrated
        log.info("%s switched %s -> %s in %.1f ms (%d moved, %d drained)", self.rt.worker_id, result.from_role,
                 result.to_role, result.total_seconds * 1e3, len(moved), result.drained_requests)
        return worker_pb2.SetRoleResponse(
            from_role=ROLE_TO_PB[result.from_role], to_role=ROLE_TO_PB[result.to_role],
            total_seconds=result.total_seconds, drain_seconds=result.drain_seconds,
            migration_seconds=result.migration_seconds, migrated_requests=len(moved),
            migrated_bytes=sum(m.bytes for m in moved),
            migrated_bytes_shared=sum(m.bytes for m in moved if m.transport == "shm"),
            migrated_bytes_nixl=sum(m.bytes for m in moved if m.transport == "nixl"),
            drained_requests=result.drained_requests,
            fell_back_to_drain=result.fell_back_to_drain, note=result.note,
            longest_request_pause_seconds=max((m.pause_seconds for m in moved), default=0.0),
            longest_request_migration_seconds=max((m.seconds for m in moved), default=0.0))


async def main() -> None:
    settings = WorkerSettings()
    runtime = WorkerRuntime(settings)
    servicer = WorkerServicer(runtime)
    try:
        await run_server(
            host=settings.host, port=settings.worker_port, metrics_port=settings.worker_metrics_port,
            services=[Service("dopd.v1.Worker", servicer, worker_pb2_grpc.add_WorkerServicer_to_server)],
            start=runtime.start, drain=runtime.drain, grace=settings.drain_grace_s,
            cluster_token=settings.cluster_token)
    finally:
        await runtime.close()
