"""gRPC adapter of a worker: protobuf in, engine calls, protobuf out."""

from __future__ import annotations

import asyncio
import logging

import torch

from common.config import WorkerSettings
from common.convert import FINISH_TO_PB, sampling_from_pb
from common.kv import wire
from common.pb import worker_pb2, worker_pb2_grpc
from common.prompts import validate_prompt_ids
from common.rpc.errors import InvalidArgument, Refused, ServiceError, Unavailable, grpc_errors
from common.rpc.server import Service, run_server
from services.decode.engine import ErrorEvent, FinishedEvent, TokensEvent
from services.decode.scheduler import SeqState
from services.worker import metrics
from services.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime

    def _require(self, role: str, new_work: bool = True) -> None:
        if not self.rt.ready:
            raise Refused("worker is still loading its model")
        if new_work and self.rt.draining:  # KV for a request already held is still taken
            raise Refused(f"worker {self.rt.worker_id} is draining")
        if self.rt.role != role:
            raise Refused(f"worker {self.rt.worker_id} serves {self.rt.role}, not {role}")

    def _check_tokens(self, prompt) -> list[int]:
        ids = list(prompt)
        validate_prompt_ids(ids, self.rt.vocab_size)
        return ids

    @grpc_errors
    async def Prefill(self, request, context):
        self._require("prefill")
        prompt = self._check_tokens(request.prompt_token_ids)
        if not request.decode_address:
            raise InvalidArgument("decode_address is empty")
        timeout = context.time_remaining() or self.rt.settings.rpc_timeout_s
        result = await self.rt.prefill.prefill(request.request_id, prompt, sampling_from_pb(request.sampling),
                                               request.decode_address, timeout)
        return worker_pb2.PrefillResponse(
            first_token_id=result.first_token_id, queue_seconds=result.queue_seconds,
            prefill_seconds=result.prefill_seconds, handoff_seconds=result.handoff_seconds,
            kv_bytes=result.kv_bytes)

    @grpc_errors
    async def Decode(self, request, context):
        self._require("decode")
        if request.prompt_len < 1:
            raise InvalidArgument("prompt_len must be at least 1")
        params = sampling_from_pb(request.sampling)
        if params.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1")
        queue = self.rt.decode.reserve(request.request_id, request.prompt_len, params)
        try:
            blocks = len(self.rt.decode.scheduler.seqs[request.request_id].block_table)
            yield worker_pb2.DecodeEvent(reserved=worker_pb2.DecodeEvent.Reserved(blocks=blocks))
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
                    yield worker_pb2.DecodeEvent(tokens=worker_pb2.DecodeEvent.Tokens(token_ids=token_ids))
                elif isinstance(event, FinishedEvent):
                    yield worker_pb2.DecodeEvent(finished=worker_pb2.DecodeEvent.Finished(
                        reason=FINISH_TO_PB[event.finish.value], completion_tokens=event.completion_tokens))
                    return
                elif isinstance(event, ErrorEvent):
                    raise event.error
        finally:
            # Finished, failed or cancelled by the client: every block goes back.
            self.rt.decode.release(request.request_id)

    @grpc_errors
    async def PushKV(self, request_iterator, context):
        self._require("decode", new_work=False)
        engine = self.rt.decode
        layout = self.rt.runner_layout
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "begin":
            raise InvalidArgument("a KV push must start with a begin message")
        request_id = first.begin.request_id
        reserved = engine.scheduler.seqs.get(request_id)
        if reserved is None:
            raise InvalidArgument(f"KV pushed for unknown request {request_id!r}: no reservation on this worker")
        try:
            num_tokens = wire.parse_begin(first.begin, layout)
            seq = engine.expect_kv(request_id, num_tokens)
            written = torch.zeros(layout.num_layers, num_tokens, dtype=torch.bool)
            received = 0
            async for message in request_iterator:
                part = message.WhichOneof("part")
                if part == "chunk":
                    chunk = wire.parse_chunk(message.chunk, layout, num_tokens)
                    engine.write_kv(seq, chunk)
                    written[chunk.layer_start:chunk.layer_end, chunk.token_start:chunk.token_end] = True
                    received += len(message.chunk.data)
                    metrics.KV_TRANSFER_BYTES.labels("received").inc(len(message.chunk.data))
                elif part == "end":
                    if not bool(written.all()):
                        raise wire.WireError(f"KV push ended with {int((~written).sum())} of "
                                             f"{written.numel()} (layer, token) cells missing")
                    if not 0 <= message.end.first_token_id < self.rt.vocab_size:
                        raise wire.WireError(f"first_token_id {message.end.first_token_id} is outside the vocabulary")
                    engine.kv_complete(request_id, message.end.first_token_id)
                    return worker_pb2.PushKVResponse(bytes_received=received)
                else:
                    raise wire.WireError("a KV push has exactly one begin message")
            raise wire.WireError("KV push ended without an end message")
        except asyncio.CancelledError:
            # The prefill side went away mid-transfer: the KV will not complete.
            self._fail_if_waiting(reserved, Unavailable(f"KV push for request {request_id!r} broke off"))
            raise
        except (wire.WireError, ServiceError) as exc:
            # The request cannot complete: its decode stream gets the same error, its blocks go back.
            error = InvalidArgument(str(exc)) if isinstance(exc, wire.WireError) else exc
            self._fail_if_waiting(reserved, error)
            raise error from None

    def _fail_if_waiting(self, seq, error: ServiceError) -> None:
        """Fail the reservation this push was for, if it is still that one and still waiting for
        its KV: a stray or duplicate push must not end a request that is already decoding, nor a
        newer request that reuses the id."""
        if self.rt.decode.scheduler.seqs.get(seq.request_id) is seq and seq.state is SeqState.WAITING_KV:
            self.rt.decode.fail(seq.request_id, error)

    @grpc_errors
    async def GetStats(self, request, context):
        return self.rt.info()


async def main() -> None:
    settings = WorkerSettings()
    runtime = WorkerRuntime(settings)
    servicer = WorkerServicer(runtime)
    try:
        await run_server(
            host=settings.host, port=settings.worker_port, metrics_port=settings.worker_metrics_port,
            services=[Service("dopd.v1.Worker", servicer, worker_pb2_grpc.add_WorkerServicer_to_server)],
            start=runtime.start, drain=runtime.drain, grace=settings.drain_grace_s)
    finally:
        await runtime.close()

