"""The decode role engine: continuous batching over the paged KV pool.

Async adapter around the pure DecodeScheduler. One loop task runs steps back to back while there
is work: schedule -> forward + sample (executor thread) -> update -> deliver. Everything that
touches scheduler state runs on the event loop thread; the executor thread only runs the model.

Requests join the running batch at any step (as their KV completes) and leave it at any step.
A request may also be prefilled here (`prefill_here`: no KV moves): its prompt goes through
LocalPrefill in chunks that share the steps' forwards (`Runner.mixed_sample`), and its first token
comes out of its own stream.
Each request's events go to its own asyncio.Queue, read by the Decode RPC handler; a request
migrated in has its queue before anyone reads it (the gateway attaches a moment later).
Migrating a request out is `services/decode/migration.py`; it uses pause/resume/moved here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from common.errors import Aborted, DeadlineExceeded, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from common.kv.block_pool import OutOfBlocks
from common.modeling.base import DecodeInputs, PromptChunk, Runner
from common.types import SamplingParams
from services.decode.local_prefill import Chunk, LocalPrefill
from services.decode.scheduler import DecodeScheduler, DecodeSeq, Finish, SeqState
from services.engine import metrics
from services.kvtransfer.wire import KVChunk

log = logging.getLogger(__name__)
# A reservation past the seats its gateway allows (DecodeRequest.max_seats).
NO_SEAT_HERE = "no seat on this decode worker"


@dataclass
class TokensEvent:
    token_ids: list[int]
    start_index: int  # index in the completion of token_ids[0]


@dataclass
class FinishedEvent:
    finish: Finish
    completion_tokens: int


@dataclass
class MovedEvent:
    """The request goes on on another decode worker; every token produced here was sent before."""

    worker_id: str
    address: str
    next_index: int


@dataclass
class ErrorEvent:
    error: ServiceError


@dataclass(eq=False)
class LocalPrompt:
    """A request prefilled on this worker: its reservation and its prompt."""

    seq: DecodeSeq
    prompt: list[int]


class DecodeEngine:
    def __init__(self, runner: Runner, scheduler: DecodeScheduler, executor: Executor,
                 kv_timeout_s: float, step_token_budget: int = 2048, waiting_limit: int = 1024) -> None:
        self.runner = runner
        # Requests reserved and not yet running (their KV on its way or being prefilled here, or
        # waiting for a seat in the batch); past it, the gateway's reservations are refused.
        self.waiting_limit = waiting_limit
        self.scheduler = scheduler
        self.local: LocalPrefill[LocalPrompt] = LocalPrefill(step_token_budget)
        self._local: dict[str, LocalPrompt] = {}  # request id -> its prompt, until its KV is complete
        self.executor = executor
        self.kv_timeout_s = kv_timeout_s
        self._queues: dict[str, asyncio.Queue] = {}
        self._kv_timers: dict[str, asyncio.TimerHandle] = {}
        self._attach_timers: dict[str, asyncio.TimerHandle] = {}
        # Pauses of requests in the step that runs now wait for its end (the scheduler's rule:
        # the step's token must be out before the KV tail is copied); their callers wait here.
        self._pause_waiters: dict[str, asyncio.Future] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.held_max = 0  # the most requests held at once (metrics.HELD_REQUESTS_MAX)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="decode-loop")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- requests ---------------------------------------------------------------------------
    def reserve(self, request_id: str, prompt_len: int, params: SamplingParams, max_seats: int = 0) -> asyncio.Queue:
        """`max_seats` (0: none): refuse when this worker already holds that many requests, the
        gateway's seat limit (DecodeRequest.max_seats), checked against all that it holds."""
        # NOTE: a migration's adopt() is not bounded here: the requests it moves are running
        # already, and refusing them would only keep them where the planner is taking them from.
        if max_seats > 0 and len(self.scheduler.seqs) >= max_seats:
            raise ResourceExhausted(f"{NO_SEAT_HERE}: it holds {len(self.scheduler.seqs)} requests, the request's "
                                    f"seat limit is {max_seats}")
        if self.scheduler.num_waiting >= self.waiting_limit:
            raise ResourceExhausted(f"decode worker overloaded: {self.scheduler.num_waiting} requests already wait "
                                    f"for their KV or a seat in the batch (at most {self.waiting_limit})")
        self._reserve(request_id, prompt_len, params)
        self._kv_timers[request_id] = asyncio.get_running_loop().call_later(
            self.kv_timeout_s, self._kv_timed_out, request_id)
        return self._queues[request_id]

    def adopt(self, request_id: str, prompt_len: int, params: SamplingParams) -> DecodeSeq:
        """Reserve a request that a migration moves here; its stream is attached later (a broken
        transfer ends it here before that; see services/kvtransfer/receiver.py)."""
        return self._reserve(request_id, prompt_len, params)

    def _reserve(self, request_id: str, prompt_len: int, params: SamplingParams) -> DecodeSeq:
        seq = DecodeSeq(request_id, prompt_len, params)
        try:
            self.scheduler.reserve(seq)
        except OutOfBlocks as exc:
            raise ResourceExhausted(f"decode worker is out of KV blocks: {exc}") from None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        self._queues[request_id] = asyncio.Queue()
        self._update_gauges()
        return seq

    def attach(self, request_id: str) -> tuple[asyncio.Queue, DecodeSeq | None]:
        """The stream of a request migrated here (its events so far are queued)."""
        timer = self._attach_timers.pop(request_id, None)
        queue = self._queues.get(request_id)
        if timer is None or queue is None:
            raise Unavailable(f"request {request_id!r} was not migrated to this worker, or its move failed")
        timer.cancel()
        return queue, self.scheduler.seqs.get(request_id)

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

    def prefill_here(self, request_id: str, prompt: list[int]) -> None:
        """The request reserved here is prefilled here too, in chunks between (within) decode
        steps; no KV moves. Its first token goes out on its own stream."""
        seq = self.scheduler.seqs.get(request_id)
        if seq is None or seq.state is not SeqState.WAITING_KV:
            raise InvalidArgument(f"request {request_id!r} has no reservation waiting for its prompt here")
        if len(prompt) != seq.prompt_len:
            raise InvalidArgument(f"{len(prompt)} prompt tokens for request {request_id!r}, which reserved "
                                  f"a {seq.prompt_len}-token prompt")
        timer = self._kv_timers.pop(request_id, None)  # nothing to wait for from elsewhere
        if timer:
            timer.cancel()
        job = self._local[request_id] = LocalPrompt(seq, prompt)
        self.local.add(job, len(prompt))
        self._wake.set()

    # -- what a PushKV stream writes into (services/kvtransfer/receiver.KVSink) ---------------
    @property
    def store(self):
        """The pool a peer's pages are read into (shared memory, NIXL)."""
        return self.runner.store

    def held(self, request_id: str) -> DecodeSeq | None:
        return self.scheduler.seqs.get(request_id)

    def waiting_for_kv(self, seq: DecodeSeq) -> bool:
        """`seq` is still this id's reservation and still waits for its KV (not decoding already,
        nor a newer request that reuses the id)."""
        return self.scheduler.seqs.get(seq.request_id) is seq and seq.state is SeqState.WAITING_KV

    def receiving_store(self, seq: DecodeSeq):
        """The pool a transfer writes `seq`'s KV into; Aborted when it ended meanwhile."""
        # Cancelled or failed while its KV was streaming (perhaps released, waiting for a copy).
        if seq.state is not SeqState.WAITING_KV or self.scheduler.release_pending(seq.request_id):
            raise Aborted(f"request {seq.request_id!r} ended while its KV was arriving")
        return self.runner.store

    def copying(self, seq: DecodeSeq) -> None:
        """A copy into `seq`'s blocks starts on another thread: a release waits for `copied`."""
        self.scheduler.begin_copy(seq.request_id)

    def copied(self, seq: DecodeSeq) -> None:
        if self.scheduler.end_copy(seq.request_id):
            self._update_gauges()

    def write_kv(self, seq: DecodeSeq, chunk: KVChunk) -> None:
        store = self.receiving_store(seq)
        store.write_chunk(chunk.layer_start, store.slots(seq.block_table, chunk.token_start, chunk.token_end), chunk.kv)

    def kv_complete(self, request_id: str, first_token: int) -> None:
        if request_id not in self.scheduler.seqs:
            raise Aborted(f"request {request_id!r} ended while its KV was arriving")
        seq = self.scheduler.kv_complete(request_id, first_token)
        if seq.state is SeqState.FINISHED:
            self._emit(request_id, FinishedEvent(seq.finish, len(seq.tokens)))
        self._update_gauges()
        self._wake.set()

    def kv_complete_migrated(self, request_id: str, tokens: list[int]) -> None:
        if request_id not in self.scheduler.seqs:
            raise Aborted(f"request {request_id!r} ended while its KV was arriving")
        try:
            self.scheduler.kv_complete_migrated(request_id, tokens)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        # Its gateway attaches next; if nobody does within the KV timeout, its client is gone.
        self._attach_timers[request_id] = asyncio.get_running_loop().call_later(
            self.kv_timeout_s, self._attach_timed_out, request_id)
        self._update_gauges()
        self._wake.set()

    def fail(self, request_id: str, error: ServiceError) -> None:
        """End a request with an error (bad KV, KV timeout): its stream gets the error, blocks are freed."""
        self._emit(request_id, ErrorEvent(error))
        self.release(request_id)

    def release(self, request_id: str, seq: DecodeSeq | None = None) -> None:
        """Forget a request whatever its state (finished, cancelled, failed, moved). Idempotent.
        With `seq`, only if the request under that id is still that one (ids may come back)."""
        current = self.scheduler.seqs.get(request_id)
        if seq is not None and current is not None and current is not seq:
            return
        self._queues.pop(request_id, None)
        job = self._local.get(request_id)
        if job is not None and (seq is None or job.seq is seq):
            del self._local[request_id]
            self.local.remove(job)  # a chunk of it in the step in flight runs for nothing
        for timers in (self._kv_timers, self._attach_timers):
            timer = timers.pop(request_id, None)
            if timer:
                timer.cancel()
        self.scheduler.release(request_id)  # now, or when the step it is in ends
        self._update_gauges()

    # -- migration out (services/decode/migration.py drives these) ----------------------------
    async def pause(self, request_id: str) -> DecodeSeq | None:
        """Take a request out of the batch, blocks kept; after the step it may be in has ended and
        delivered its token. None when the request ended meanwhile (finished, cancelled)."""
        decided, seq = self.scheduler.pause_or_defer(request_id)
        if decided:
            return seq
        # NOTE: the loop starts the next step without yielding, so a waiter would never see the
        # request out of the step; the loop pauses it between two steps and tells us here.
        future = self._pause_waiters.get(request_id)
        if future is None:
            future = self._pause_waiters[request_id] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(future)

    def resume(self, seq: DecodeSeq) -> None:
        if self.scheduler.seqs.get(seq.request_id) is seq and seq.state is SeqState.PAUSED:
            self.scheduler.resume(seq.request_id)
            self._wake.set()

    def moved(self, seq: DecodeSeq, worker_id: str, address: str) -> None:
        """The request now lives on `address`: tell its stream, free it here."""
        rid = seq.request_id
        if self.scheduler.seqs.get(rid) is not seq:
            return
        self._emit(rid, MovedEvent(worker_id, address, len(seq.tokens)))
        unattached = rid in self._attach_timers
        queue = self._queues.pop(rid, None)  # the stream has its last event; the handler ends
        self.release(rid, seq)
        if unattached and queue is not None:
            # NOTE: it came here by a migration and moves on before its gateway attached (this
            # worker switched at once): keep its stream, the tokens made here and then `moved`,
            # for the attach that is on its way, so the gateway follows it hop by hop.
            self._queues[rid] = queue
            self._attach_timers[rid] = asyncio.get_running_loop().call_later(
                self.kv_timeout_s, self._attach_timed_out, rid)

    # -- timers -----------------------------------------------------------------------------
    def _kv_timed_out(self, request_id: str) -> None:
        self._kv_timers.pop(request_id, None)
        seq = self.scheduler.seqs.get(request_id)
        if seq is not None and seq.state is SeqState.WAITING_KV:
            log.warning("request %s: KV did not arrive within %.1fs; reservation freed", request_id,
                        self.kv_timeout_s)
            self.fail(request_id, DeadlineExceeded(
                f"KV for request {request_id!r} did not arrive within {self.kv_timeout_s:g}s"))

    def _attach_timed_out(self, request_id: str) -> None:
        if self._attach_timers.pop(request_id, None) is not None:
            log.warning("request %s: migrated here but nobody attached within %.1fs; dropped", request_id,
                        self.kv_timeout_s)
            self.release(request_id)

    def _emit(self, request_id: str, event) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(event)

    # -- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.scheduler.has_work() and not self.local:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self.scheduler.begin_step()
            chunks = self.local.take(len(batch)) if self.local else []
            # The step writes the chunks' KV into their blocks: released meanwhile, they wait too.
            self.scheduler.also_in_step(c.job.seq.request_id for c in chunks)
            paused: dict[str, DecodeSeq | None] = {}
            try:
                paused = await self._run_step(batch, chunks)
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the loop
                log.exception("decode step failed")
                self.scheduler.abandon_step()
                for seq in [*batch, *(c.job.seq for c in chunks)]:
                    self.fail(seq.request_id, ServiceError(f"decode step failed: {exc}"))
                paused = self.scheduler.settle()
            finally:
                for request_id, future in self._pause_waiters.items():
                    if not future.done():
                        future.set_result(paused.get(request_id))
                self._pause_waiters.clear()
                self._update_gauges()

    async def _run_step(self, batch: list[DecodeSeq], chunks: list[Chunk[LocalPrompt]]) -> dict[str, DecodeSeq | None]:
        """One step; returns the pauses asked for meanwhile (settled by the scheduler)."""
        # Inputs are read here, on the loop thread: the executor thread only runs the model.
        decode = DecodeInputs([s.tokens[-1] for s in batch], [s.next_position for s in batch],
                              [s.block_table for s in batch], [s.params for s in batch],
                              [len(s.tokens) for s in batch]) if batch else None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        firsts: list[int | None] = []
        if chunks:
            prompt_chunks = [PromptChunk(c.job.prompt[c.start:c.end], c.start, c.job.seq.block_table,
                                         c.job.seq.params if c.last else None) for c in chunks]
            firsts, next_tokens = await loop.run_in_executor(self.executor, self.runner.mixed_sample,
                                                             prompt_chunks, decode)
            metrics.LOCAL_PREFILL_TOKENS.inc(sum(c.end - c.start for c in chunks))
        else:
            next_tokens = await loop.run_in_executor(
                self.executor, self.runner.decode_sample, decode.tokens, decode.positions, decode.block_tables,
                decode.params, decode.token_indices)
        if batch:
            metrics.DECODE_STEP_SECONDS.observe(time.perf_counter() - started)
            metrics.DECODE_BATCH_SIZE.observe(len(batch))
        end = self.scheduler.end_step(batch, next_tokens)
        for seq in end.delivered:  # end_step appended each one's token last
            self._emit(seq.request_id, TokensEvent([seq.tokens[-1]], len(seq.tokens) - 1))
        for seq in end.finished:
            self._emit(seq.request_id, FinishedEvent(seq.finish, len(seq.tokens)))
        for chunk, first in zip(chunks, firsts, strict=True):
            if chunk.last:
                self._prefilled_here(chunk.job, first)
        return end.paused

    def _prefilled_here(self, job: LocalPrompt, first: int) -> None:
        """A prompt's last chunk ran: its KV is complete in this pool; its first token goes out."""
        rid = job.seq.request_id
        if self._local.get(rid) is not job:
            return  # released (cancelled, failed) while its chunk ran
        del self._local[rid]
        self._emit(rid, TokensEvent([first], 0))
        self.kv_complete(rid, first)

    def _update_gauges(self) -> None:
        self.held_max = max(self.held_max, len(self.scheduler.seqs))
        metrics.HELD_REQUESTS_MAX.set(self.held_max)
        metrics.KV_BLOCKS_USED.set(self.scheduler.pool.num_used)
        metrics.RUNNING_REQUESTS.set(self.scheduler.num_running)
