"""The gateway's request core, free of any transport: one request from validated input to its
last token, following it when a migration moves it from one decode worker to another.

    path            by the serving mode (common/modes.py): first come first served; DOPD's
                    scheduling policy (services/gateway/scheduling.py: long, short or
                    ultra-short, and admission control: RESOURCE_EXHAUSTED at once when the
                    predicted TTFT is past the SLO); or, in `aggregated` mode, prefilled where
                    it decodes
    reserve decode  open Decode on the best decode worker (it reserves KV, or the next is tried);
                    an ultra-short or aggregated prompt goes with it, to be prefilled there
    prefill         on the least loaded prefill worker, with the decode worker's address (the KV
                    goes peer to peer; the first token comes back here); a short prompt may be
                    held first for a batch (services/gateway/short_gate.py)
    relay           the decode stream's tokens, detokenized, cut at stop strings; on `Moved`,
                    attach to the new worker's stream and go on from the same token index

Front ends (gRPC and the OpenAI HTTP API) are thin adapters over `RequestCore.generate`. The
workers are reached through a `Backend` (services/gateway/grpc_backend.py), which turns their
replies into the events of services/gateway/events.py and their failures into domain errors.
Every choice of where a request goes, and the books those choices read, are the `Dispatcher`'s
(services/gateway/dispatch.py), which the simulator drives too; this module awaits and relays.
Leaving `generate` by any path cancels the open decode stream, which frees the request's blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from common.errors import PeerError, Refused, ResourceExhausted, ServiceError, Unavailable
from common.load import SLO, LoadForecast
from common.modes import ServingMode, serving_mode
from common.types import SamplingParams
from services.gateway import metrics
from services.gateway.decode_queue import DecodeQueue
from services.gateway.detokenizer import Detokenizer
from services.gateway.dispatch import NO_SEAT, QUEUE_GIVE_UP_S, Dispatcher
from services.gateway.events import DecodeEvent, Finished, Moved, TokenEvent, Tokens
from services.gateway.load_recorder import LoadRecorder
from services.gateway.routing import WorkerView, pick_prefill
from services.gateway.scheduling import Path, SchedulingPolicy
from services.gateway.short_gate import ShortGate

MAX_MOVES = 64  # a request moved more often than this is going round in circles
# A request whose workers die under it this often gets UNAVAILABLE rather than another replay.
MAX_REPLAYS = 3

log = logging.getLogger(__name__)


class WorkerLost(Exception):
    """A worker died, or its stream broke, while serving a try of a request: the request can be
    replayed elsewhere (prompt + tokens so far), since nothing the client saw is lost."""

    def __init__(self, worker_id: str, stage: str, cause: Exception) -> None:
        super().__init__(f"{stage} worker {worker_id} lost: {cause}")
        self.worker_id, self.stage = worker_id, stage


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
                          timeout: float, prompt: list[int] | None = None, max_seats: int = 0) -> DecodeStream: ...
    # (with `prompt`, the decode worker prefills it too: no prefill worker, no KV moved; `max_seats`:
    # the worker refuses when it holds that many requests already, DecodeRequest.max_seats)

    def forecast(self) -> LoadForecast | None: ...  # the planner's, for the coming interval

    async def attach_decode(self, moved: Moved, request_id: str, timeout: float) -> DecodeStream: ...

    async def next_topology(self, timeout: float) -> None: ...  # wait for the topology to change

    async def prefill(self, worker: WorkerView, request_id: str, prompt: list[int], params: SamplingParams,
                      decode_address: str, timeout: float, decode_transports: tuple[str, ...] = ()) -> int: ...
    # (decode_transports: what the decode worker advertised; its KV may go by one of them)


class RequestCore:
    def __init__(self, backend: Backend, tokenizer, recorder: LoadRecorder | None = None,
                 no_worker_wait_s: float = 5.0, mode: ServingMode | None = None,
                 policy_for: Callable[[LoadForecast], SchedulingPolicy] | None = None,
                 time_scale: float = 1.0, decode_queue_limit: int = 1024, slo: SLO | None = None) -> None:
        self.backend = backend
        self.slo = slo  # each request that ends is counted as meeting both SLOs or not (profile seconds)
        self.no_worker_wait_s = no_worker_wait_s
        self.tokenizer = tokenizer
        self.recorder = recorder or LoadRecorder()
        self.running = 0
        self.mode = mode or serving_mode("static")
        self.dispatch = Dispatcher(self.mode, time_scale)
        # The scheduling policy's thresholds follow the planner's forecast (policy_for); until
        # the first forecast every prompt takes the long path.
        self.policy_for = policy_for if self.mode.policy else None
        self._policy: tuple[LoadForecast, SchedulingPolicy] | None = None
        self.time_scale = time_scale
        self.short_gate = ShortGate(self._least_loaded_prefill, time.monotonic, time_scale)
        self.decode_queue = DecodeQueue(decode_queue_limit)

    # -- the path ---------------------------------------------------------------------------
    def policy(self) -> SchedulingPolicy | None:
        if self.policy_for is None:
            return None
        forecast = self.backend.forecast()
        if forecast is None:
            return None
        if self._policy is None or self._policy[0] != forecast:
            policy = self.policy_for(forecast)
            self._policy = (forecast, policy)
            self.short_gate.set_caps(policy.batch_token_cap, policy.batch_wait_cap_s)
        return self._policy[1]

    def _prefill_ids(self) -> list[str]:
        return [w.worker_id for w in self.backend.workers("prefill")]

    def _least_loaded_prefill_work(self) -> tuple[int, float]:
        """(tokens outstanding, profile seconds busy) of the prefill worker with the fewest tokens."""
        return self.dispatch.least_loaded_prefill_work(self._prefill_ids(), time.monotonic())

    def _least_loaded_prefill(self) -> str | None:
        worker = pick_prefill(self.backend.workers("prefill"), self.dispatch.prefill_ledger.tokens)
        return worker.worker_id if worker else None

    def _local_worker(self, req: GenerationRequest, policy: SchedulingPolicy | None) -> WorkerView | None:
        """The mixed worker that prefills the prompt itself (Dispatcher.local_worker), or None."""
        if not self.mode.disaggregated:
            return None
        mixed = self.backend.workers("mixed")
        if not mixed:
            return None
        return self.dispatch.local_worker(mixed, len(req.prompt), policy, bool(self._prefill_ids()), time.monotonic())

    def _admit(self, req: GenerationRequest, path: Path, policy: SchedulingPolicy | None,
               here: WorkerView | None = None) -> None:
        """Admission control: RESOURCE_EXHAUSTED at once, saying why, when the predicted TTFT is
        already past the SLO."""
        if here is not None:
            reason = self.dispatch.local_refusal(here, len(req.prompt), policy)
        else:
            reason = self.dispatch.admission_refusal(len(req.prompt), path, policy, self._prefill_ids(),
                                                     time.monotonic())
        if reason is not None:
            metrics.ADMISSION_REFUSED.inc()
            raise ResourceExhausted(reason)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        remaining = lambda: max(0.001, req.deadline - time.monotonic())  # noqa: E731
        status = "error"
        ttft = tpot = None
        self.running += 1
        metrics.RUNNING.set(self.running)
        metrics.PROMPT_TOKENS.inc(len(req.prompt))
        try:
            policy = self.policy()
            path = self.dispatch.path(len(req.prompt), policy)
            here = self._local_worker(req, policy)
            if here is not None:
                path = Path.MIXED
            try:
                self._admit(req, path, policy, here)
            except ResourceExhausted:
                self.recorder.refused_by_admission(len(req.prompt), req.params.max_tokens)
                raise
            detok = Detokenizer(self.tokenizer, req.stop)
            generated: list[int] = []  # what the client has been sent: kept across replays
            stall_slo = self.slo is not None and self.slo.itl_s is not None  # only then are gaps kept
            gaps: list[float] = []  # between the tokens the client was sent (wall seconds), for the stall SLO
            first_at = last_at = None
            finish = None
            replays = 0
            while True:
                attempt = self._replay_of(req, generated) if replays else req
                try:
                    async with contextlib.aclosing(self._attempt(attempt, path, policy, remaining,
                                                                 first=not replays, here=here)) as events:
                        async for item in events:
                            if isinstance(item, str):
                                finish = item
                                break
                            now = time.perf_counter()
                            if first_at is None:
                                first_at = now
                                ttft = first_at - req.arrived
                                metrics.TTFT.observe(ttft)
                                self.recorder.first_token(ttft)
                            if stall_slo:  # tokens that came in one message came together, as a client sees them
                                if last_at is not None:
                                    gaps.append(now - last_at)
                                gaps.extend([0.0] * (len(item) - 1))
                            last_at = now
                            generated.extend(item)
                            yield TokenEvent(req.request_id, item, detok.add(list(item)))
                            if detok.stopped:
                                break
                    break
                except WorkerLost as lost:
                    self.dispatch.lost(lost.worker_id, time.monotonic())
                    replays += 1
                    if len(generated) >= req.params.max_tokens:
                        finish = "length"
                        break
                    if replays > MAX_REPLAYS or req.deadline - time.monotonic() <= 0:
                        raise Unavailable(f"request {req.request_id} lost its worker {replays} times "
                                          f"(last: {lost})") from lost
                    metrics.REPLAYS.labels(lost.stage).inc()
                    log.warning("request %s: %s; replaying from token %d (attempt %d)", req.request_id, lost,
                                len(generated), replays + 1)
                    # A replay prefills the prompt and the tokens so far on a prefill worker (or,
                    # with no prefill role, where it decodes): never held for a short batch.
                    path = Path.LONG if self.mode.disaggregated else Path.ULTRA_SHORT
                    here = self._local_worker(attempt, None) if path is Path.LONG and not self._prefill_ids() else None
                    if here is not None:
                        path = Path.MIXED
            if detok.stopped:
                finish = "stop"
            done = time.perf_counter()
            n_tokens = len(generated)
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
            self.running -= 1
            metrics.RUNNING.set(self.running)
            metrics.REQUESTS.labels(status).inc()
            if self.slo is not None and status != "cancelled":
                met = status == "ok" and self._meets_slo(ttft, tpot, gaps)
                metrics.SLO_REQUESTS.labels("met" if met else "missed").inc()

    def _meets_slo(self, ttft: float | None, tpot: float | None, gaps: list[float]) -> bool:
        """Every SLO met (wall seconds in, compared in profile seconds); a one-token request has
        no TPOT and meets that SLO, and with a stall SLO the request's p99 gap between tokens must
        be within it, as in services/bench/metrics.meets_slo."""
        if ttft is None or ttft / self.time_scale > self.slo.ttft_s:
            return False
        if tpot is not None and tpot / self.time_scale > self.slo.tpot_s:
            return False
        return self.slo.itl_s is None or not gaps or float(np.percentile(gaps, 99)) / self.time_scale <= self.slo.itl_s

    @staticmethod
    def _replay_of(req: GenerationRequest, generated: list[int]) -> GenerationRequest:
        """The request again, on from token len(generated): that many tokens fewer to make, and
        the per-token seeds of their place in the whole completion (common/sampling.py). A new
        id towards the workers: the old one may still be winding down somewhere."""
        n = len(generated)
        return replace(req, worker_request_id=uuid.uuid4().hex, prompt=req.prompt + generated,
                       params=replace(req.params, max_tokens=req.params.max_tokens - n,
                                      index_offset=req.params.index_offset + n))

    async def _attempt(self, req: GenerationRequest, path: Path, policy: SchedulingPolicy | None, remaining,
                       first: bool, here: WorkerView | None = None) -> AsyncIterator[tuple[int, ...] | str]:
        """One try at serving `req`: reserve, prefill, relay. Yields token tuples (indices
        counted from this try's first token), then the finish reason. A worker that dies or
        breaks the stream ends the try with WorkerLost; leaving by any path cancels the decode
        stream, which frees the try's blocks. Path.MIXED: reserved on a mixed worker (`here`
        first), which prefills the prompt itself."""
        stream = decode_worker = None
        local = path in (Path.ULTRA_SHORT, Path.MIXED)
        if policy is not None and not first:
            # A replay was admitted already: it is served, seated or not, and waits up to its deadline.
            policy = replace(policy, admission=False)
        try:
            try:
                stream, decode_worker = await self._reserve_decode(
                    req, remaining, policy, local, self._decode_wait_budget(req, path, policy),
                    here if path is Path.MIXED else None, path is Path.MIXED)
            except ResourceExhausted:
                if first:
                    self.recorder.rejected()
                raise
            if first:
                metrics.PATHS.labels(path.value).inc()
                self.recorder.arrived(len(req.prompt), req.params.max_tokens)
            if local:
                ledger = self.dispatch.local_ledger
                ledger.sent(decode_worker.worker_id, req.worker_request_id, len(req.prompt), time.monotonic())
                finished_at = None
                try:
                    firsts = await self._first_tokens_here(stream, decode_worker)
                    finished_at = time.monotonic()
                finally:
                    ledger.done(decode_worker.worker_id, req.worker_request_id, finished_at)
            else:
                prefer = None
                if path is Path.SHORT and self._least_loaded_prefill_work()[0] > 0:
                    metrics.SHORT_HELD.inc()  # every prefill worker is busy: held for a batch
                    try:
                        prefer = await self.short_gate.hold(len(req.prompt))
                    finally:
                        metrics.SHORT_HELD.dec()
                firsts = (await self._prefill(req, decode_worker, remaining, prefer),)
            yield firsts
            n_tokens = len(firsts)
            moves = 0
            while True:
                event = await self._next_event(stream, decode_worker)
                if isinstance(event, Tokens):
                    if event.start_index != n_tokens:
                        raise ServiceError(f"token stream out of order: expected token {n_tokens}, "
                                           f"got {event.start_index}")
                    n_tokens += len(event.token_ids)
                    self.dispatch.made(decode_worker.worker_id, req.worker_request_id,
                                       req.params.max_tokens - n_tokens)
                    yield event.token_ids
                elif isinstance(event, Finished):
                    yield event.reason
                    return
                elif isinstance(event, Moved):
                    moves += 1
                    if event.next_index != n_tokens or moves > MAX_MOVES:
                        raise ServiceError(f"request moved at token {event.next_index}, after {n_tokens} "
                                           f"tokens here ({moves} moves)")
                    stream.cancel()
                    self._count_decode(decode_worker, req, -1)
                    decode_worker = WorkerView(event.worker_id, event.address, 0, 0)
                    self._count_decode(decode_worker, req, +1)
                    try:
                        stream = await self.backend.attach_decode(event, req.worker_request_id, remaining())
                    except Refused:
                        raise
                    except (Unavailable, PeerError) as exc:
                        raise WorkerLost(event.worker_id, "decode", exc) from exc
        finally:
            if stream is not None:
                stream.cancel()  # no-op when finished; frees the blocks otherwise
            if decode_worker is not None:
                self._count_decode(decode_worker, req, -1)
                self.decode_queue.freed()

    def _decode_wait_budget(self, req: GenerationRequest, path: Path, policy: SchedulingPolicy | None) -> float:
        """Wall seconds a request may wait in the decode queue: until its deadline, and, under
        admission control, no longer than its predicted TTFT leaves before the SLO."""
        budget = req.deadline - time.monotonic()
        slack = self.dispatch.ttft_slack_s(len(req.prompt), path, policy, self._prefill_ids(), time.monotonic())
        if slack is not None:
            budget = min(budget, slack * self.time_scale)
        return budget

    @staticmethod
    async def _next_event(stream: DecodeStream, worker: WorkerView) -> DecodeEvent:
        """The stream's next event; a stream that breaks or ends unfinished lost its worker."""
        try:
            event = await stream.next()
        except (Unavailable, PeerError) as exc:
            raise WorkerLost(worker.worker_id, "decode", exc) from exc
        if event is None:
            raise WorkerLost(worker.worker_id, "decode", Unavailable("the stream ended without finishing"))
        return event

    def _count_decode(self, worker: WorkerView, req: GenerationRequest, sign: int) -> None:
        """`req` joins (+1) or leaves (-1) `worker`'s decode batch, as this gateway counts it."""
        if sign > 0:
            self.dispatch.join_decode(worker.worker_id, req.worker_request_id, len(req.prompt), req.params.max_tokens)
        else:
            self.dispatch.leave_decode(worker.worker_id, req.worker_request_id)

    async def _wait_for_workers(self, waited_since: float, remaining, what: str) -> None:
        """Roles may be changing: wait for a new topology, unless we waited long enough already."""
        left = min(self.no_worker_wait_s - (time.monotonic() - waited_since), remaining() - 0.05)
        if left <= 0:
            raise Unavailable(what)
        await self.backend.next_topology(min(left, 0.5))

    async def _first_tokens_here(self, stream: DecodeStream, worker: WorkerView) -> tuple[int, ...]:
        """The decode worker prefilled the prompt itself: its stream's first tokens (index 0 on)."""
        event = await stream.next()
        if not isinstance(event, Tokens) or event.start_index != 0 or not event.token_ids:
            raise Unavailable(f"decode worker {worker.worker_id} prefilling locally sent {event!r} first")
        return tuple(event.token_ids)

    async def _prefill(self, req: GenerationRequest, decode_worker: WorkerView, remaining,
                       prefer: str | None = None) -> int:
        """Prefill on the least loaded prefill worker (`prefer`red first: the worker a short batch
        was sent to); one that refuses at once (draining, switching, not a prefill worker any
        more, its queue full) has pushed no KV, so the next one is tried. When every one has a
        full queue, the request is refused (RESOURCE_EXHAUSTED): waiting would only grow them."""
        tried: set[str] = set()
        full: list[str] = []  # the refusals of workers whose queues are full
        since = time.monotonic()
        while True:
            candidates = [w for w in self.backend.workers("prefill") if w.worker_id not in tried]
            worker = self.dispatch.pick_prefill(candidates, time.monotonic(), prefer)
            if worker is None:
                if tried and len(full) == len(tried):
                    raise ResourceExhausted("every prefill worker is overloaded: " + "; ".join(full))
                await self._wait_for_workers(since, remaining, "no prefill worker is serving")
                tried.clear()
                full.clear()
                continue
            tried.add(worker.worker_id)
            ledger = self.dispatch.prefill_ledger
            ledger.sent(worker.worker_id, req.worker_request_id, len(req.prompt), time.monotonic())
            finished_at = None  # set when the worker did prefill it (admission's busy-since)
            try:
                first = await self.backend.prefill(worker, req.worker_request_id, req.prompt, req.params,
                                                   decode_worker.address, remaining(), decode_worker.kv_transports)
                finished_at = time.monotonic()
                return first
            except Refused:
                continue
            except ResourceExhausted as exc:
                full.append(f"{worker.worker_id}: {exc}")
                continue
            except (Unavailable, PeerError) as exc:
                # The prefill worker died, or the push to the decode worker broke: the KV may be
                # half there, so the whole try starts again (a fresh reservation).
                raise WorkerLost(worker.worker_id, "prefill", exc) from exc
            finally:
                ledger.done(worker.worker_id, req.worker_request_id, finished_at)
                if not ledger.tokens[worker.worker_id] and len(self.short_gate):
                    self.short_gate.worker_freed()  # late binding: the short prompts held go now

    async def _reserve_decode(self, req: GenerationRequest, remaining, policy: SchedulingPolicy | None = None,
                              local: bool = False, wait_budget_s: float = 0.0, here: WorkerView | None = None,
                              mixed: bool = False) -> tuple[DecodeStream, WorkerView]:
        """Open Decode on the first decode worker that reserves the request's KV blocks (`local`:
        and prefills the prompt there). When every worker refused because roles are changing
        (not for want of KV), wait for a new topology. When they are out of KV, wait in the
        decode queue (first come first served, bounded) for at most `wait_budget_s`; a request
        that arrives while others wait there joins behind them. Under admission control, a
        request that finds no seat is refused at once when a seat is not predicted to free for it
        within that budget (SchedulingPolicy.seat_wait_s)."""
        if len(self.decode_queue):
            self._refuse_hopeless_seat_wait(req, policy, wait_budget_s)
            return await self._queue_for_decode(req, remaining, policy, local, wait_budget_s,
                                                "requests that came first are waiting for KV", mixed)
        since = time.monotonic()
        while True:
            got, full, refusals = await self._try_reserve(req, remaining, policy, local, here, mixed)
            if got is not None:
                return got
            if full:
                if refusals and refusals[0].startswith(NO_SEAT):
                    self._refuse_hopeless_seat_wait(req, policy, wait_budget_s)
                    metrics.SEAT_WAITS.inc()
                return await self._queue_for_decode(req, remaining, policy, local, wait_budget_s,
                                                    "no decode worker can hold this request: " + "; ".join(refusals),
                                                    mixed)
            await self._wait_for_workers(since, remaining, "no decode worker is serving" + (
                ": " + "; ".join(refusals) if refusals else ""))

    def _refuse_hopeless_seat_wait(self, req: GenerationRequest, policy: SchedulingPolicy | None,
                                   budget_s: float) -> None:
        """RESOURCE_EXHAUSTED now, rather than after the wait, when no decode worker has a seat
        for `req` and none is predicted to free for it (behind those queued) within `budget_s`."""
        reason = self.dispatch.hopeless_seat_wait(self.backend.workers("decode"), len(req.prompt),
                                                  req.params.max_tokens, policy, len(self.decode_queue), budget_s)
        if reason is not None:
            metrics.ADMISSION_REFUSED.inc()
            raise ResourceExhausted(reason)

    async def _try_reserve(self, req: GenerationRequest, remaining, policy: SchedulingPolicy | None,
                           local: bool, here: WorkerView | None = None,
                           mixed: bool = False) -> tuple[tuple[DecodeStream, WorkerView] | None, bool, list[str]]:
        """One pass over the decode workers (`mixed`: the mixed workers, `here` first), best
        first: (the reservation, or None; whether any refused for want of KV; each refusal)."""
        refusals, full = [], False
        no_seat = [self.dispatch.no_seat(policy)] if policy is not None else []
        workers = self.backend.workers("mixed" if mixed else "decode")
        prompt_len, max_tokens = len(req.prompt), req.params.max_tokens
        order = self.dispatch.decode_order(workers, prompt_len, max_tokens, policy, time.monotonic())
        if here is not None:
            order = [w for w in order if w.worker_id == here.worker_id] + [
                w for w in order if w.worker_id != here.worker_id]
        if not order and no_seat and workers:
            return None, True, no_seat
        for worker in order:
            if not self.dispatch.has_seat(worker, prompt_len, max_tokens, policy):
                continue  # taken while this request tried another worker
            seats = self.dispatch.seat_limit(worker, prompt_len, max_tokens, policy)
            # Counted before the call: requests reserving at the same time see the seat taken.
            self._count_decode(worker, req, +1)
            try:
                stream = await self.backend.open_decode(worker, req.worker_request_id, len(req.prompt),
                                                        req.params, remaining(), req.prompt if local else None,
                                                        max_seats=seats)
            except BaseException as exc:
                self._count_decode(worker, req, -1)
                if not isinstance(exc, (ResourceExhausted, Unavailable)):
                    raise
                refusals.append(f"{worker.worker_id}: {exc}")
                full = full or isinstance(exc, ResourceExhausted)
                continue
            return (stream, worker), full, refusals
        if not refusals and no_seat:
            return None, True, no_seat  # every seat was taken while this request tried
        return None, full, refusals

    async def _queue_for_decode(self, req: GenerationRequest, remaining, policy: SchedulingPolicy | None,
                                local: bool, budget_s: float, why: str,
                                mixed: bool = False) -> tuple[DecodeStream, WorkerView]:
        async def attempt():
            got, _, _ = await self._try_reserve(req, remaining, policy, local, mixed=mixed)
            return got

        # Give up a little before the deadline, so that the client hears why, not just DEADLINE_EXCEEDED.
        budget_s = min(budget_s, remaining() - QUEUE_GIVE_UP_S)
        if budget_s <= 0:
            raise ResourceExhausted(why)
        metrics.DECODE_QUEUE.inc()
        try:
            return await self.decode_queue.wait_for(attempt, budget_s, why)
        finally:
            metrics.DECODE_QUEUE.dec()
