"""The gateway's request core, free of any transport: one request from validated input to its
last token, following it when a migration moves it from one decode worker to another.

    reserve decode  open Decode on the best decode worker (it reserves KV, or the next is tried)
    prefill         on the least loaded prefill worker, with the decode worker's address (the KV
                    goes peer to peer; the first token comes back here)
    relay           the decode stream's tokens, detokenized, cut at stop strings; on `Moved`,
                    attach to the new worker's stream and go on from the same token index

Front ends (gRPC today, OpenAI HTTP later) are thin adapters over `RequestCore.generate`. The
workers are reached through a `Backend` (services/gateway/grpc_backend.py), which turns their
replies into the events of services/gateway/events.py and their failures into domain errors.
Leaving `generate` by any path cancels the open decode stream, which frees the request's blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from common.errors import Refused, ResourceExhausted, ServiceError, Unavailable
from common.kv.block_pool import kv_tokens_for
from common.types import SamplingParams
from services.gateway import metrics
from services.gateway.detokenizer import Detokenizer
from services.gateway.events import DecodeEvent, Finished, Moved, TokenEvent, Tokens
from services.gateway.load_recorder import LoadRecorder
from services.gateway.routing import WorkerView, decode_preference, pick_prefill

MAX_MOVES = 64  # a request moved more often than this is going round in circles


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # the client's
    worker_request_id: str  # the gateway's own, towards the workers: clients' ids may collide
    prompt: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    deadline: float  # time.monotonic()
    arrived: float  # time.perf_counter()


class DecodeStream(Protocol):
    async def next(self) -> DecodeEvent | None: ...  # None: the stream ended

    def cancel(self) -> None: ...


class Backend(Protocol):
    def workers(self, role: str) -> list[WorkerView]: ...

    async def open_decode(self, worker: WorkerView, request_id: str, prompt_len: int, params: SamplingParams,
                          timeout: float) -> DecodeStream: ...

    async def attach_decode(self, moved: Moved, request_id: str, timeout: float) -> DecodeStream: ...

    async def next_topology(self, timeout: float) -> None: ...  # wait for the topology to change

    async def prefill(self, worker: WorkerView, request_id: str, prompt: list[int], params: SamplingParams,
                      decode_address: str, timeout: float) -> int: ...


class RequestCore:
    def __init__(self, backend: Backend, tokenizer, recorder: LoadRecorder | None = None,
                 no_worker_wait_s: float = 5.0) -> None:
        self.backend = backend
        self.no_worker_wait_s = no_worker_wait_s
        self.tokenizer = tokenizer
        self.recorder = recorder or LoadRecorder()
        self.outstanding_prefill_tokens: Tally[str] = Tally()
        self.outstanding_decode: Tally[str] = Tally()
        self.running = 0

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        remaining = lambda: max(0.001, req.deadline - time.monotonic())  # noqa: E731
        status = "error"
        self.running += 1
        metrics.RUNNING.set(self.running)
        metrics.PROMPT_TOKENS.inc(len(req.prompt))
        stream = decode_worker = None
        try:
            try:
                stream, decode_worker = await self._reserve_decode(req, remaining)
            except ResourceExhausted:
                self.recorder.rejected()
                raise
            self.recorder.arrived(len(req.prompt), req.params.max_tokens)
            first = await self._prefill(req, decode_worker, remaining)
            detok = Detokenizer(self.tokenizer, req.stop)
            ttft = time.perf_counter() - req.arrived
            metrics.TTFT.observe(ttft)
            self.recorder.first_token(ttft)
            first_at = time.perf_counter()
            n_tokens = 1
            yield TokenEvent(req.request_id, (first,), detok.add([first]))
            finish = None
            moves = 0
            while not detok.stopped:
                event = await stream.next()
                if event is None:
                    raise Unavailable(f"decode worker {decode_worker.worker_id} ended the stream without finishing")
                if isinstance(event, Tokens):
                    if event.start_index != n_tokens:
                        raise ServiceError(f"token stream out of order: expected token {n_tokens}, "
                                           f"got {event.start_index}")
                    n_tokens += len(event.token_ids)
                    yield TokenEvent(req.request_id, event.token_ids, detok.add(list(event.token_ids)))
                elif isinstance(event, Finished):
                    finish = event.reason
                    break
                elif isinstance(event, Moved):
                    moves += 1
                    if event.next_index != n_tokens or moves > MAX_MOVES:
                        raise ServiceError(f"request moved at token {event.next_index}, after {n_tokens} "
                                           f"tokens here ({moves} moves)")
                    stream.cancel()
                    self._count_decode(decode_worker, -1)
                    decode_worker = WorkerView(event.worker_id, event.address, 0, 0)
                    self._count_decode(decode_worker, +1)
                    stream = await self.backend.attach_decode(event, req.worker_request_id, remaining())
            if detok.stopped:
                finish = "stop"
            done = time.perf_counter()
            metrics.E2E.observe(done - req.arrived)
            metrics.GENERATION_TOKENS.inc(n_tokens)
            if n_tokens > 1:
                tpot = (done - first_at) / (n_tokens - 1)
                metrics.TPOT.observe(tpot)
                self.recorder.finished(tpot)
            status = "ok"
            yield TokenEvent(req.request_id, (), detok.flush(), finish_reason=finish, prompt_tokens=len(req.prompt),
                             completion_tokens=n_tokens)
        except (GeneratorExit, asyncio.CancelledError):
            status = "cancelled"
            raise
        finally:
            if stream is not None:
                stream.cancel()  # no-op when finished; frees the blocks otherwise
            if decode_worker is not None:
                self._count_decode(decode_worker, -1)
            self.running -= 1
            metrics.RUNNING.set(self.running)
            metrics.REQUESTS.labels(status).inc()

    def _count_decode(self, worker: WorkerView, delta: int) -> None:
        self.outstanding_decode[worker.worker_id] += delta

    async def _wait_for_workers(self, waited_since: float, remaining, what: str) -> None:
        """Roles may be changing: wait for a new topology, unless we waited long enough already."""
        left = min(self.no_worker_wait_s - (time.monotonic() - waited_since), remaining() - 0.05)
        if left <= 0:
            raise Unavailable(what)
        await self.backend.next_topology(min(left, 0.5))

    async def _prefill(self, req: GenerationRequest, decode_worker: WorkerView, remaining) -> int:
        """Prefill on the least loaded prefill worker; one that refuses at once (draining,
        switching, not a prefill worker any more) has pushed no KV, so the next one is tried."""
        tried: set[str] = set()
        since = time.monotonic()
        while True:
            candidates = [w for w in self.backend.workers("prefill") if w.worker_id not in tried]
            worker = pick_prefill(candidates, self.outstanding_prefill_tokens)
            if worker is None:
                await self._wait_for_workers(since, remaining, "no prefill worker is serving")
                tried.clear()
                continue
            tried.add(worker.worker_id)
            self.outstanding_prefill_tokens[worker.worker_id] += len(req.prompt)
            try:
                return await self.backend.prefill(worker, req.worker_request_id, req.prompt, req.params,
                                                  decode_worker.address, remaining())
            except Refused:
                continue
            finally:
                self.outstanding_prefill_tokens[worker.worker_id] -= len(req.prompt)

    async def _reserve_decode(self, req: GenerationRequest, remaining) -> tuple[DecodeStream, WorkerView]:
        """Open Decode on the first decode worker that reserves the request's KV blocks. When every
        worker refused because roles are changing (not for want of KV), wait for a new topology."""
        since = time.monotonic()
        while True:
            workers = decode_preference(self.backend.workers("decode"), self.outstanding_decode,
                                        kv_tokens_for(len(req.prompt), req.params.max_tokens))
            refusals, full = [], False
            for worker in workers:
                try:
                    stream = await self.backend.open_decode(worker, req.worker_request_id, len(req.prompt),
                                                            req.params, remaining())
                except (ResourceExhausted, Unavailable) as exc:
                    refusals.append(f"{worker.worker_id}: {exc}")
                    full = full or isinstance(exc, ResourceExhausted)
                    continue
                self._count_decode(worker, +1)
                return stream, worker
            if full:
                raise ResourceExhausted("no decode worker can hold this request: " + "; ".join(refusals))
            await self._wait_for_workers(since, remaining, "no decode worker is serving" + (
                ": " + "; ".join(refusals) if refusals else ""))
