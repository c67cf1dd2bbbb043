"""The decode role engine: continuous batching over the paged KV pool.

Async adapter around the pure DecodeScheduler. One loop task runs steps back to back while there
is work: schedule -> forward + sample (executor thread) -> update -> deliver. Everything that
touches scheduler state runs on the event loop thread; the executor thread only runs the model.

Requests join the running batch at any step (as their KV completes) and leave it at any step.
Each request's events go to its own asyncio.Queue, read by the Decode RPC handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from common.kv.block_pool import OutOfBlocks
from common.kv.wire import KVChunk
from common.modeling.runner import Runner
from common.rpc.errors import Aborted, DeadlineExceeded, InvalidArgument, ResourceExhausted, ServiceError
from common.sampling import SamplingParams
from services.decode.scheduler import DecodeScheduler, DecodeSeq, Finish, SeqState
from services.worker import metrics

log = logging.getLogger(__name__)


@dataclass
class TokensEvent:
    token_ids: list[int]


@dataclass
class FinishedEvent:
    finish: Finish
    completion_tokens: int


@dataclass
class ErrorEvent:
    error: ServiceError


class DecodeEngine:
    def __init__(self, runner: Runner, scheduler: DecodeScheduler, executor: Executor,
                 kv_timeout_s: float) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.executor = executor
        self.kv_timeout_s = kv_timeout_s
        self._queues: dict[str, asyncio.Queue] = {}
        self._kv_timers: dict[str, asyncio.TimerHandle] = {}
        # NOTE: a request in the step that is running now must keep its blocks until the step
        # ends (the forward writes its new token's KV there); aborts of such requests wait here.
        self._in_flight: set[str] = set()
        self._deferred_aborts: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="decode-loop")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- requests ---------------------------------------------------------------------------
    def reserve(self, request_id: str, prompt_len: int, params: SamplingParams) -> asyncio.Queue:
        seq = DecodeSeq(request_id, prompt_len, params)
        try:
            self.scheduler.reserve(seq)
        except OutOfBlocks as exc:
            raise ResourceExhausted(f"decode worker is out of KV blocks: {exc}") from None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._kv_timers[request_id] = asyncio.get_running_loop().call_later(
            self.kv_timeout_s, self._kv_timed_out, request_id)
        self._update_gauges()
        return queue

    def expect_kv(self, request_id: str, num_tokens: int) -> DecodeSeq:
        """The reservation a KV transfer writes into; raises InvalidArgument when there is none."""
        seq = self.scheduler.seqs.get(request_id)
        if seq is None:
            raise InvalidArgument(f"KV pushed for unknown request {request_id!r}: no reservation on this worker")
        if seq.state is not SeqState.WAITING_KV:
            raise InvalidArgument(f"KV pushed for request {request_id!r}, which already has its KV")
        if num_tokens != seq.prompt_len:
            raise InvalidArgument(f"KV of {num_tokens} tokens pushed for request {request_id!r}, "
                                  f"which reserved a {seq.prompt_len}-token prompt")
        # The KV is on its way: from here a broken push, not the clock, ends the wait.
        timer = self._kv_timers.pop(request_id, None)
        if timer:
            timer.cancel()
        return seq

    def write_kv(self, seq: DecodeSeq, chunk: KVChunk) -> None:
        if seq.state is not SeqState.WAITING_KV:  # cancelled or failed while its KV was streaming
            raise Aborted(f"request {seq.request_id!r} ended while its KV was arriving")
        store = self.runner.store
        store.write_chunk(chunk.layer_start, store.slots(seq.block_table, chunk.token_start, chunk.token_end), chunk.kv)

    def kv_complete(self, request_id: str, first_token: int) -> None:
        if request_id not in self.scheduler.seqs:
            raise Aborted(f"request {request_id!r} ended while its KV was arriving")
        seq = self.scheduler.kv_complete(request_id, first_token)
        if seq.state is SeqState.FINISHED:
            self._emit(request_id, FinishedEvent(seq.finish, len(seq.tokens)))
        self._update_gauges()
        self._wake.set()

    def fail(self, request_id: str, error: ServiceError) -> None:
        """End a request with an error (bad KV, KV timeout): its stream gets the error, blocks are freed."""
        self._emit(request_id, ErrorEvent(error))
        self.release(request_id)

    def release(self, request_id: str) -> None:
        """Forget a request whatever its state (finished, cancelled, failed). Idempotent."""
        self._queues.pop(request_id, None)
        timer = self._kv_timers.pop(request_id, None)
        if timer:
            timer.cancel()
        if request_id in self._in_flight:
            self._deferred_aborts.add(request_id)
        else:
            self.scheduler.abort(request_id)
        self._update_gauges()

    def _kv_timed_out(self, request_id: str) -> None:
        self._kv_timers.pop(request_id, None)
        seq = self.scheduler.seqs.get(request_id)
        if seq is not None and seq.state is SeqState.WAITING_KV:
            log.warning("request %s: KV did not arrive within %.1fs; reservation freed", request_id,
                        self.kv_timeout_s)
            self.fail(request_id, DeadlineExceeded(
                f"KV for request {request_id!r} did not arrive within {self.kv_timeout_s:g}s"))

    def _emit(self, request_id: str, event) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(event)

    # -- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.scheduler.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self.scheduler.schedule()
            try:
                await self._run_step(batch)
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the loop
                log.exception("decode step failed")
                for seq in batch:
                    self.fail(seq.request_id, ServiceError(f"decode step failed: {exc}"))
            finally:
                for request_id in self._deferred_aborts:
                    self.scheduler.abort(request_id)
                self._deferred_aborts.clear()
                self._update_gauges()

    async def _run_step(self, batch: list[DecodeSeq]) -> None:
        # Inputs are read here, on the loop thread: the executor thread only runs the model.
        inputs = ([s.tokens[-1] for s in batch], [s.next_position for s in batch], [s.block_table for s in batch],
                  [s.params for s in batch], [len(s.tokens) for s in batch])
        self._in_flight = {s.request_id for s in batch}
        started = time.perf_counter()
        try:
            next_tokens = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.runner.decode_sample, *inputs)
        finally:
            self._in_flight = set()
        metrics.DECODE_STEP_SECONDS.observe(time.perf_counter() - started)
        metrics.DECODE_BATCH_SIZE.observe(len(batch))
        self._deliver(batch, next_tokens)

    def _deliver(self, batch: list[DecodeSeq], next_tokens: list[int]) -> None:
        finished = self.scheduler.update(batch, next_tokens)
        for seq, token in zip(batch, next_tokens, strict=True):
            if seq.request_id not in self._deferred_aborts:
                self._emit(seq.request_id, TokensEvent([token]))
        for seq in finished:
            self._emit(seq.request_id, FinishedEvent(seq.finish, len(seq.tokens)))

    def _update_gauges(self) -> None:
        metrics.KV_BLOCKS_USED.set(self.scheduler.pool.num_used)
        metrics.RUNNING_REQUESTS.set(self.scheduler.num_running)
