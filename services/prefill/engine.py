"""The prefill role engine: batches prompts under a token budget, runs them packed, streams each
prompt's KV to its decode worker layer by layer, and samples the first token.

Async adapter around the pure PrefillScheduler; the model runs on the worker's executor thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from common.errors import ResourceExhausted, ServiceError, Unavailable
from common.modeling.base import Runner
from common.types import SamplingParams
from services.engine import metrics
from services.kvtransfer.sender import OpenSender, PrefillSender
from services.prefill.scheduler import PrefillScheduler

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    decode_address: str
    future: asyncio.Future
    sender: PrefillSender
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    queue_seconds: float
    prefill_seconds: float
    handoff_seconds: float
    kv_bytes: int


class PrefillEngine:
    def __init__(self, runner: Runner, executor: Executor, open_sender: OpenSender, token_budget: int,
                 queue_limit: int = 512) -> None:
        self.runner = runner
        self.queue_limit = queue_limit  # prompts waiting for a batch; past it, refused at once
        self.executor = executor
        self.open_sender = open_sender
        self.scheduler: PrefillScheduler[PrefillJob] = PrefillScheduler(token_budget)
        self.num_running = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._completions: set[asyncio.Future] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="prefill-loop")

    async def stop(self) -> None:
        for future in [self._task, *self._completions]:
            if future:
                future.cancel()
        await asyncio.gather(*filter(None, [self._task, *self._completions]), return_exceptions=True)
        # Prompts still queued never run: their callers get an answer, their KV streams close.
        while batch := self.scheduler.schedule():
            for job in batch:
                job.sender.cancel()
                if not job.future.done():
                    job.future.set_exception(Unavailable("the prefill engine stopped"))

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams, decode_address: str,
                      timeout: float) -> PrefillResult:
        # NOTE: the KV stream opens now, while the prompt still waits for its batch: the decode
        # worker then knows its KV is coming (it stops its no-KV timer), and sees at once, as a
        # broken stream, if this worker dies before the KV is complete.
        if self.scheduler.num_waiting >= self.queue_limit:
            raise ResourceExhausted(f"prefill worker overloaded: {self.scheduler.num_waiting} prompts already wait "
                                    f"for a prefill batch (its queue holds {self.queue_limit})")
        loop = asyncio.get_running_loop()
        sender = self.open_sender(decode_address, request_id, len(prompt), timeout)
        job = PrefillJob(request_id, prompt, params, decode_address, loop.create_future(), sender)
        self.scheduler.add(job, len(prompt))
        self._wake.set()
        try:
            return await job.future
        except BaseException:
            self.scheduler.remove(job)  # still queued: it never runs
            sender.cancel()
            raise

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def busy(self) -> bool:
        """Prompts queued or running, or KV still on its way to a decode worker."""
        return bool(self.scheduler.num_waiting or self.num_running or self._completions)

    async def _loop(self) -> None:
        while True:
            batch = self.scheduler.schedule()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.num_running = len(batch)
            try:
                await self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - fail the batch, never the loop
                log.exception("prefill batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self.num_running = 0

    async def _run_batch(self, batch: list[PrefillJob]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        senders = [job.sender for job in batch]
        bounds = [0]
        for job in batch:
            bounds.append(bounds[-1] + len(job.prompt))

        def on_layer_kv(layer, k, v):  # forward thread
            for sender, start, end in zip(senders, bounds[:-1], bounds[1:], strict=True):
                sender.put_layer(layer, k[:, start:end], v[:, start:end])

        def forward():
            tokens = self.runner.prefill_sample([job.prompt for job in batch], [job.params for job in batch],
                                                on_layer_kv)
            return tokens, time.perf_counter()  # the forward's end, as seen by the thread that ran it

        try:
            first_tokens, forward_done = await loop.run_in_executor(self.executor, forward)
        except BaseException:
            for sender in senders:
                sender.cancel()
            raise
        metrics.PREFILL_SECONDS.observe(forward_done - started)
        for sender, token in zip(senders, first_tokens, strict=True):
            sender.finish(token)
        # NOTE: the next batch need not wait for this one's KV to land: the tail of the transfer
        # overlaps the next forward pass. Each job's caller is answered when its KV is confirmed.
        completion = asyncio.gather(*(self._complete(job, sender, token, started, forward_done)
                                      for job, sender, token in zip(batch, senders, first_tokens, strict=True)))
        self._completions.add(completion)
        completion.add_done_callback(self._completion_done)

    def _completion_done(self, completion: asyncio.Future) -> None:
        self._completions.discard(completion)
        # Every job's caller has had its answer in _complete; what the gather ended with (a
        # push cancelled because its caller went away, say) is only read here, so that asyncio
        # does not log it as "never retrieved".
        if not completion.cancelled():
            completion.exception()

    async def _complete(self, job: PrefillJob, sender: PrefillSender, token: int, started: float,
                        forward_done: float) -> None:
        if job.future.done():  # the caller went away while the forward ran
            sender.cancel()
            return
        try:
            kv_bytes = await sender.wait()
            handoff = sender.done_at - forward_done
            metrics.KV_HANDOFF_SECONDS.observe(handoff)
            if not job.future.done():
                job.future.set_result(PrefillResult(token, started - job.enqueued_at, forward_done - started,
                                                    handoff, kv_bytes))
        except ServiceError as exc:  # DeadlineExceeded or Unavailable: a failed hand-off
            if not job.future.done():
                job.future.set_exception(exc)
        finally:
            # NOTE: a push that broke on our side (its message stream raised) ends as a local
            # cancel, not an AioRpcError; the caller must still get an answer, never a hang.
            if not job.future.done():
                job.future.set_exception(Unavailable(f"KV push to decode worker {job.decode_address} broke off"))
