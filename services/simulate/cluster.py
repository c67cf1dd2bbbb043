"""The cluster in virtual time: the request path of services/gateway/lifecycle.py and the engines'
loops (services/prefill/engine.py, services/decode/engine.py) as events around the real pure
cores. Pure: no I/O, no clock but the EventLoop's. Where a request goes is decided by the
gateway's own dispatch core (services/gateway/dispatch.py: path, admission, decode order and
seats, the seat-wait refusal, prefill choice, mixed workers, and the books they read), driven
here on the virtual clock.

    arrival    validation.validate_context (else INVALID_ARGUMENT, at once); the path, by the
               serving mode (common/modes.py): first come first served (static), DOPD's
               scheduling policy (services/gateway/scheduling.py: long, short, ultra-short, and
               admission on predicted TTFT: RESOURCE_EXHAUSTED, at once), or on the decode
               worker itself (aggregated), or on a mixed worker whose chunks fit (the
               dispatcher's local_worker); reserve decode blocks on the first worker that has
               them (routing.decode_preference, or the policy's order; none: wait in the decode
               queue, first come first served, for the gateway's wait budget, or RESOURCE_EXHAUSTED
               when a seat cannot free in time); queue the prompt on the prefill worker of
               routing.pick_prefill (fewest outstanding prompt tokens), hold it in the policy's
               ShortBatcher, or queue it on the decode worker's LocalPrefill
    prefill    a worker runs PrefillScheduler.schedule()'s batch for profile.prefill_time(total
               tokens); the next batch starts at once. The KV streams layer by layer during the
               forward over the worker's link (hardware.Link.stream_layers); when its last byte
               is out the prompt's KV is complete on its decode worker and the gateway has the
               first token (TTFT)
    decode     a worker steps while DecodeScheduler.schedule() gives a batch or LocalPrefill
               a chunk: a step costs profile.decode_step_time(batch, mean context) (context as
               SimRunner reads it: position + 1), or profile.mixed_step_time with a chunk, and
               gives each request in it one token; requests join and leave at step boundaries;
               a prompt whose last chunk ran has its first token at the step's end
    timeout    at arrival + request timeout a request still open fails (DEADLINE_EXCEEDED): its
               prompt leaves the queue, its blocks are freed (after the step it is in, as the
               engine defers aborts)

Every request ends completed or failed with a reason; `leaks()` says what does not hold at the end.
Role switches are services/simulate/switching.py.
"""

from __future__ import annotations

from collections import deque

from common.errors import InvalidArgument
from common.kv.block_pool import OutOfBlocks
from common.load import SLO, LoadForecast
from common.modes import ServingMode, serving_mode
from common.profile import LatencyProfile
from common.types import Role, SamplingParams
from services.bench.metrics import RequestResult
from services.bench.outcome import StatusSample
from services.decode.local_prefill import Chunk
from services.decode.scheduler import DecodeSeq, SeqState
from services.gateway.dispatch import QUEUE_GIVE_UP_S, Dispatcher
from services.gateway.load_recorder import LoadRecorder
from services.gateway.routing import WorkerView
from services.gateway.scheduling import Path, SchedulingPolicy, ShortBatcher
from services.gateway.validation import validate_context
from services.simulate.events import EventLoop
from services.simulate.hardware import StepTimer
from services.simulate.switching import Switcher
from services.simulate.workers import SimRequest, SimWorker

FIRST_TOKEN = 0  # the simulator has no vocabulary; every token is this id and none is EOS


class Cluster:
    def __init__(self, loop: EventLoop, profile: LatencyProfile, prefill: int, decode: int, *, kv_blocks: int,
                 block_size: int, max_batch_size: int, prefill_token_budget: int, link_gbps: float,
                 request_timeout_s: float, mode: ServingMode | None = None, chunk_tokens: int = 2048,
                 decode_queue_limit: int = 1024) -> None:
        self.mode = mode or serving_mode("static")
        if not self.mode.disaggregated:
            prefill, decode = 0, prefill + decode  # every worker decodes, and prefills its own requests
        elif prefill < 1 or decode < 1:
            raise ValueError(f"need at least one worker of each role, got {prefill}P/{decode}D")
        self.loop = loop
        self.profile = profile
        self.prefill_token_budget = prefill_token_budget
        # The scheduling policy's thresholds, from the planner's forecast (set_forecast); until
        # the first forecast every prompt takes the long path (at once to a prefill worker).
        self.policy: SchedulingPolicy | None = None
        self.batcher: ShortBatcher | None = None
        self.refused = 0
        self.step_time = StepTimer(profile)
        self.kv_bytes_per_token = profile.model.kv_bytes_per_token
        self.request_timeout_s = request_timeout_s
        roles = [Role.PREFILL] * prefill + [Role.DECODE] * decode
        self.workers = [SimWorker.build(f"w{i:02d}", role, kv_blocks, block_size, max_batch_size, prefill_token_budget,
                                        link_gbps, chunk_tokens) for i, role in enumerate(roles)]
        self.by_id = {w.worker_id: w for w in self.workers}
        self._prefill_views = {w.worker_id: WorkerView(w.worker_id, w.worker_id, 0, block_size) for w in self.workers}
        self.chunk_tokens = chunk_tokens  # a decode worker's step budget (its ultra-short prompts)
        self.chunk_budget = chunk_tokens  # a mixed worker's, as the planner's configuration sets it
        self.switches = Switcher(self)
        self.recorder = LoadRecorder()
        # The gateway's dispatch core and its books: what it sent each prefill worker, not yet
        # back (prefill_ledger), and the requests on each decode worker (decode_load).
        self.dispatch = Dispatcher(self.mode)
        self.prefill_ledger = self.dispatch.prefill_ledger
        self.requests: list[SimRequest] = []
        # Requests waiting for decode room, first come first served: (request, path, local on mixed).
        self.decode_queue: deque[tuple[SimRequest, Path, bool]] = deque()
        self.decode_queue_limit = decode_queue_limit
        self.by_rid: dict[str, SimRequest] = {}
        self.open = 0  # arrived and not ended
        self.pending_arrivals = 0
        self.decode_steps = self.prefill_batches = 0
        self._zeros: dict[int, list[int]] = {}

    # -- arrivals ---------------------------------------------------------------------------
    def submit(self, arrivals: list[tuple[float, int, int]]) -> None:
        """(t, prompt tokens, output tokens) per request, ordered by t. Each arrival schedules the
        next, so the heap holds one arrival at a time."""
        for i, (t, prompt, output) in enumerate(arrivals):
            r = SimRequest(i, f"r{i}", t, prompt, output)
            self.requests.append(r)
            self.by_rid[r.rid] = r
        self.pending_arrivals = len(self.requests)
        if self.requests:
            self.loop.at(self.requests[0].t, self._arrive, 0)

    def active(self) -> bool:
        """Requests still to come or in flight, or a switch under way."""
        return bool(self.pending_arrivals or self.open or any(w.switch for w in self.workers))

    def _arrive(self, index: int) -> None:
        if index + 1 < len(self.requests):
            self.loop.at(self.requests[index + 1].t, self._arrive, index + 1)
        self.pending_arrivals -= 1
        r = self.requests[index]
        self.open += 1
        try:
            validate_context(r.prompt, r.max_tokens, self.profile.model.max_context)
        except InvalidArgument:
            self._fail(r, "INVALID_ARGUMENT")
            return
        path = self.dispatch.path(r.prompt, self.policy)
        prefill_ids = self._prefill_ids()
        mixed = [w.view() for w in self.workers if w.serves(Role.MIXED)] if self.mode.disaggregated else []
        here = self.dispatch.local_worker(mixed, r.prompt, self.policy, bool(prefill_ids),
                                          self.loop.now) if mixed else None
        if self.policy is not None:
            if here is not None:
                reason = self.dispatch.local_refusal(here, r.prompt, self.policy)
            else:
                reason = self.dispatch.admission_refusal(r.prompt, path, self.policy, prefill_ids, self.loop.now)
            if reason is not None:  # admission control: refused at once, counted as an SLO miss
                self.refused += 1
                self.recorder.refused_by_admission(r.prompt, r.max_tokens)
                self._fail(r, "RESOURCE_EXHAUSTED")
                return
        self.loop.at(r.t + self.request_timeout_s, self._timeout, r)
        # As the gateway: behind others waiting for decode room, or when no worker has it now, the
        # request waits in the decode queue (first come first served) for its wait budget.
        if self.decode_queue or not self._place(r, path, here):
            self._queue_for_decode(r, path, here is not None)

    def _place(self, r: SimRequest, path: Path, here: WorkerView | None) -> bool:
        """Reserve r's decode KV and send its prompt on its way: on the mixed workers (`here`
        first) when one prefills it itself, else on the decode workers by `path`. False: no worker
        has room (or a seat) now."""
        if here is not None:
            worker = self._reserve_decode(r, only=Role.MIXED, first=here.worker_id)
            if worker is None:
                return False
            self._prefill_here(worker, r)
            return True
        worker = self._reserve_decode(r)
        if worker is None:
            return False
        r.decode_worker = worker
        self.count_decode(worker, r, +1)
        self.recorder.arrived(r.prompt, r.max_tokens)
        if path is Path.ULTRA_SHORT:
            r.phase = "local"
            worker.local.add(r, r.prompt)
            self.kick_decode(worker)
        elif path is Path.SHORT:
            r.phase = "held"
            batch = self.batcher.add(r, r.prompt, self.loop.now)
            if not batch and self._least_loaded_prefill()[0] == 0:
                batch = self.batcher.flush()  # a prefill worker is idle: bound late, sent now
            if batch:
                self._dispatch(batch)
            if len(self.batcher):  # r (or what it follows) waits: poll at the wait cap's end
                # A cap lowered by the last forecast may have passed already: release at once.
                self.loop.at(max(self.loop.now, self.batcher.due()), self._poll_batcher)
        else:
            self._dispatch([r])
        return True

    def _prefill_here(self, worker: SimWorker, r: SimRequest) -> None:
        """r, reserved on mixed `worker`, is prefilled there in chunks beside its decodes."""
        r.decode_worker = worker
        self.count_decode(worker, r, +1)
        self.recorder.arrived(r.prompt, r.max_tokens)
        self._queue_local(worker, r)

    # -- the decode queue (services/gateway/decode_queue.py) --------------------------------
    def _queue_for_decode(self, r: SimRequest, path: Path, local: bool) -> None:
        """r waits, behind those already waiting, for decode room: until its deadline, and under
        admission control no longer than its predicted TTFT leaves before the SLO; refused at once
        (RESOURCE_EXHAUSTED) when the queue is full, the budget is spent, or no seat is predicted to
        free for it within the budget (Dispatcher.hopeless_seat_wait)."""
        now = self.loop.now
        budget = r.t + self.request_timeout_s - now - QUEUE_GIVE_UP_S
        slack = self.dispatch.ttft_slack_s(r.prompt, Path.MIXED if local else path, self.policy,
                                           self._prefill_ids(), now)
        if slack is not None:
            budget = min(budget, slack)
        views = [w.view() for w in self.workers if w.serves(Role.MIXED if local else Role.DECODE)]
        hopeless = self.dispatch.hopeless_seat_wait(views, r.prompt, r.max_tokens, self.policy,
                                                    len(self.decode_queue), budget)
        if hopeless is not None:
            self.refused += 1
        if hopeless is not None or budget <= 0 or len(self.decode_queue) >= self.decode_queue_limit:
            self.recorder.rejected()
            self._fail(r, "RESOURCE_EXHAUSTED")
            return
        r.phase = "queued"
        self.decode_queue.append((r, path, local))
        self.loop.at(now + budget, self._queue_expired, r)

    def _queue_expired(self, r: SimRequest) -> None:
        if r.phase != "queued":
            return
        self._leave_queue(r)
        self.recorder.rejected()
        self._fail(r, "RESOURCE_EXHAUSTED")

    def _leave_queue(self, r: SimRequest) -> None:
        for i, (q, _, _) in enumerate(self.decode_queue):
            if q is r:
                del self.decode_queue[i]
                break

    def _serve_queue(self) -> None:
        """Room may have freed: the head tries again, and the next while each one is placed."""
        while self.decode_queue:
            r, path, local = self.decode_queue[0]
            here = None
            if local:  # the mixed worker with the least queued now (any, fit or not: it waited)
                mixed = [w.view() for w in self.workers if w.serves(Role.MIXED)]
                here = self.dispatch.local_worker(mixed, r.prompt, self.policy, False, self.loop.now)
                if here is None:
                    return
            r.phase = "new"
            if not self._place(r, path, here):
                r.phase = "queued"
                return
            self.decode_queue.popleft()

    def _queue_local(self, worker: SimWorker, r: SimRequest) -> None:
        r.phase, r.local_on = "local", True
        self.dispatch.local_ledger.sent(worker.worker_id, r, r.prompt, self.loop.now)
        worker.local.add(r, r.prompt)
        self.kick_decode(worker)

    def set_chunk_budget(self, budget: int) -> None:
        """The planner's chunk budget for mixed workers: each one's next step takes it."""
        self.chunk_budget = budget
        for w in self.workers:
            if w.state.role is Role.MIXED:
                w.local.step_token_budget = budget

    def _prefill_ids(self) -> list[str]:
        return [w.worker_id for w in self.workers if w.serves(Role.PREFILL)]

    def _least_loaded_prefill(self) -> tuple[int, float]:
        """(tokens outstanding, seconds busy) of the serving prefill worker with the fewest tokens."""
        return self.dispatch.least_loaded_prefill_work(self._prefill_ids(), self.loop.now)

    def _reserve_decode(self, r: SimRequest, only: Role = Role.DECODE, first: str | None = None) -> SimWorker | None:
        """Reserve r's whole KV on the first worker that serves `only` (decode: decode and mixed
        workers), in the dispatcher's order (`first` ahead; the workers' reports are their pools:
        never stale here), that has the blocks. None: no worker has room (or, under admission
        control, a seat)."""
        views = [w.view() for w in self.workers if w.serves(only)]
        order = self.dispatch.decode_order(views, r.prompt, r.max_tokens, self.policy, self.loop.now)
        if first is not None:
            order = [v for v in order if v.worker_id == first] + [v for v in order if v.worker_id != first]
        for view in order:  # a seat in each, under admission control: nothing else runs meanwhile
            worker = self._reserve_on(self.by_id[view.worker_id], r)
            if worker is not None:
                return worker
        return None

    def _reserve_on(self, worker: SimWorker, r: SimRequest) -> SimWorker | None:
        """Reserve r's whole KV on `worker`: it, or None when it has not the blocks."""
        try:
            worker.decode.reserve(DecodeSeq(r.rid, r.prompt, SamplingParams(max_tokens=r.max_tokens)))
        except OutOfBlocks:
            return None
        return worker

    def count_decode(self, worker: SimWorker, r: SimRequest, sign: int) -> None:
        """r joins (+1) or leaves (-1) `worker`'s decode batch, as the gateway counts it."""
        if sign > 0:
            self.dispatch.join_decode(worker.worker_id, r.rid, r.prompt, r.max_tokens)
        else:
            self.dispatch.leave_decode(worker.worker_id, r.rid)

    def _poll_batcher(self) -> None:
        batch = self.batcher.poll(self.loop.now)
        if batch:
            self._dispatch(batch)

    def _dispatch(self, batch: list[SimRequest]) -> None:
        """Queue prompts, together, on the prefill worker with the fewest outstanding prompt tokens."""
        chosen = self.dispatch.pick_prefill([self._prefill_views[w] for w in self._prefill_ids()], self.loop.now)
        if chosen is None:  # the last prefill worker became a mixed one: held prompts are prefilled
            for r in batch:  # where they decode (a decode worker, too, prefills in chunks)
                self._queue_local(r.decode_worker, r)
            return
        p = self.by_id[chosen.worker_id]
        for r in batch:
            self.prefill_ledger.sent(p.worker_id, r, r.prompt, self.loop.now)
            r.prefill_worker, r.phase = p, "prefill"
            p.prefill.add(r, r.prompt)
        self._kick_prefill(p)

    def set_forecast(self, forecast: LoadForecast, slo: SLO) -> None:
        """The planner's forecast for the next interval: the policy's thresholds follow it."""
        if not self.mode.policy:
            return
        decoding = [w.decode.num_running for w in self.workers if w.serves(Role.DECODE)]
        typical = max(1, round(sum(decoding) / max(1, len(decoding))))
        self.policy = SchedulingPolicy.for_forecast(forecast, self.profile, slo, self.prefill_token_budget, typical,
                                                    admission=self.mode.admission)
        if self.batcher is None:
            self.batcher = ShortBatcher(self.policy.batch_token_cap, self.policy.batch_wait_cap_s)
        else:  # prompts held keep their place; the new caps apply from now on
            self.batcher.token_cap, self.batcher.wait_cap_s = self.policy.batch_token_cap, self.policy.batch_wait_cap_s

    # -- prefill ----------------------------------------------------------------------------
    def _kick_prefill(self, w: SimWorker) -> None:
        if w.prefill_batch is not None:
            return
        batch = w.prefill.schedule()
        if not batch:
            return
        total = sum(r.prompt for r in batch)
        forward = self.profile.prefill_time(total)
        w.prefill_batch = batch
        self.prefill_batches += 1
        self.loop.after(forward, self._prefill_done, w, self.loop.now, forward, total)

    def _prefill_done(self, w: SimWorker, started: float, forward: float, total: int) -> None:
        batch, w.prefill_batch = w.prefill_batch, None
        landed = w.link.stream_layers(started, forward, total * self.kv_bytes_per_token,
                                      self.profile.model.num_layers)
        w.handoffs += 1
        self.loop.at(landed, self._kv_landed, w, batch)
        self._kick_prefill(w)  # the next forward overlaps this batch's hand-off

    def _kv_landed(self, w: SimWorker, batch: list[SimRequest]) -> None:
        w.handoffs -= 1
        for r in batch:
            if r.phase != "prefill":
                continue  # timed out meanwhile: the gateway let go of it
            self.prefill_ledger.done(w.worker_id, r, self.loop.now)
            self._first_token(r)
        if self.batcher is not None and not self.prefill_ledger.tokens[w.worker_id] and w.serves(Role.PREFILL):
            held = self.batcher.flush()  # w has freed: the short prompts held go to it
            if held:
                self._dispatch(held)
        self.switches.check(w)

    def _prefilled_here(self, d: SimWorker, chunks: list[Chunk[SimRequest]]) -> None:
        """The prompts whose last chunk ran in d's step have their KV in d's pool."""
        for chunk in chunks:
            if chunk.last and chunk.job.phase == "local":  # not timed out meanwhile
                self._first_token(chunk.job)

    def _first_token(self, r: SimRequest) -> None:
        """r's KV is complete on its decode worker and the gateway has its first token."""
        now = self.loop.now
        d = r.decode_worker
        if r.local_on:
            self.dispatch.local_ledger.done(d.worker_id, r, now)
            r.local_on = False
        r.phase, r.first_at, r.last_at, r.tokens = "decode", now, now, 1
        self.recorder.first_token(now - r.t)
        seq = d.decode.kv_complete(r.rid, FIRST_TOKEN)
        if seq.state is SeqState.FINISHED:  # max_tokens 1
            self._complete(r)
            self.switches.check(d)
        else:
            self.became_ready(d, seq)

    # -- decode -----------------------------------------------------------------------------
    def became_ready(self, d: SimWorker, seq: DecodeSeq) -> None:
        """A request can run on d (its KV arrived, or it was moved here): it joins d's next step,
        or, when d is leaving decode, it moves on."""
        if d.switch is not None and d.switch.to_role is Role.PREFILL:
            self.switches.start_move(d, seq)
        self.kick_decode(d)

    def kick_decode(self, d: SimWorker) -> None:
        """Start a step on an idle worker, after every other event of this instant (so that KV
        landing together joins one step)."""
        if d.batch is None and not d.kicked and (d.decode.has_work() or d.local):
            d.kicked = True
            self.loop.at(self.loop.now, self._step, d)

    def _step(self, d: SimWorker) -> None:
        d.kicked = False
        if d.batch is not None:
            return
        batch = d.decode.begin_step()
        chunks = d.local.take(len(batch)) if d.local else []
        if not batch and not chunks:
            return
        n = len(batch)
        context = sum(s.next_position for s in batch) / n + 1 if n else 0.0
        d.batch, d.chunks = batch, chunks
        self.decode_steps += 1
        if chunks:
            seconds = self.profile.mixed_step_time(n, context, sum(c.end - c.start for c in chunks))
        else:
            seconds = self.step_time(n, context)
        self.loop.after(seconds, self._step_done, d)

    def _step_done(self, d: SimWorker) -> None:
        batch, d.batch = d.batch, None
        chunks, d.chunks = d.chunks, []
        n = len(batch)
        zeros = self._zeros.get(n) or self._zeros.setdefault(n, [FIRST_TOKEN] * n)
        end = d.decode.end_step(batch, zeros)  # releases and pauses asked for meanwhile, settled
        now, by_rid = self.loop.now, self.by_rid
        for seq in end.delivered:
            r = by_rid[seq.request_id]
            r.itls.append(now - r.last_at)
            r.last_at = now
            r.tokens += 1
        for seq in end.finished:
            self._complete(by_rid[seq.request_id])
        for rid, seq in end.paused.items():
            d.pause_waiters.pop(rid)(seq)
        self._prefilled_here(d, chunks)
        if self.decode_queue:  # blocks may have freed (finished, released, moved): the head tries
            self._serve_queue()
        self._step(d)  # the engine's loop starts the next step at once
        self.switches.check(d)

    def _release(self, d: SimWorker, rid: str) -> None:
        """As DecodeEngine.release: free a request's blocks, after the step it is in."""
        d.decode.release(rid)

    # -- the end of a request ---------------------------------------------------------------
    def _complete(self, r: SimRequest) -> None:
        now = self.loop.now
        r.phase, r.done_at = "done", now
        self.open -= 1
        self.count_decode(r.decode_worker, r, -1)
        if r.tokens > 1:
            self.recorder.finished((now - r.first_at) / (r.tokens - 1))

    def _fail(self, r: SimRequest, error: str) -> None:
        r.phase, r.done_at, r.error = "done", self.loop.now, error
        self.open -= 1

    def _timeout(self, r: SimRequest) -> None:
        if r.phase == "done":
            return
        if r.phase == "queued":
            self._leave_queue(r)
            self._fail(r, "DEADLINE_EXCEEDED")
            return
        if r.phase == "prefill":
            r.prefill_worker.prefill.remove(r)  # still queued: it never runs (else it runs for nothing)
            self.prefill_ledger.done(r.prefill_worker.worker_id, r)
        elif r.phase == "held":
            self.batcher.remove(r)
        elif r.phase == "local":
            r.decode_worker.local.remove(r)  # a chunk in the step in flight runs for nothing
            if r.local_on:
                self.dispatch.local_ledger.done(r.decode_worker.worker_id, r)
                r.local_on = False
        d = r.decode_worker
        self.count_decode(d, r, -1)
        self._release(d, r.rid)
        self.switches.abort_move(r)
        self._fail(r, "DEADLINE_EXCEEDED")
        if self.decode_queue:
            self._serve_queue()
        self.switches.check(d)
        if r.prefill_worker is not None:
            self.switches.check(r.prefill_worker)

    # -- what the outside sees --------------------------------------------------------------
    def sample(self) -> StatusSample:
        """As services/bench/runner.sample_from_status over the workers' WorkerInfo: each worker's
        running and waiting requests (both engines) counted under its role."""
        s = StatusSample(t=self.loop.now, gateway_running=self.open)
        for w in self.workers:
            pw, pr, dw, dr = w.counts()
            if w.state.role is Role.PREFILL:
                s.prefill_workers += 1
                s.prefill_waiting += pw + dw
                s.prefill_running += pr + dr
            else:
                s.decode_workers += 1
                s.mixed_workers += w.state.role is Role.MIXED
                s.decode_waiting += pw + dw
                s.decode_running += pr + dr
                s.kv_blocks_used += w.pool.num_used
                s.kv_blocks_total += w.pool.num_blocks
        return s

    def results(self) -> list[RequestResult]:
        out = []
        for r in self.requests:
            if r.error is None and r.phase == "done":
                out.append(RequestResult(r.rid, r.t, r.first_at - r.t, r.itls, r.done_at - r.t, r.prompt, r.tokens))
            else:
                out.append(RequestResult(r.rid, r.t, None, [], None, r.prompt, r.tokens, ok=False,
                                         error=r.error or "NOT_ENDED"))
        return out

    def leaks(self) -> list[str]:
        """What should hold at the end of a run and does not: blocks, requests, queues, switches."""
        out = []
        for w in self.workers:
            if w.pool.num_used or w.pool.num_free != w.pool.num_blocks:
                out.append(f"{w.worker_id}: {w.pool.num_used} KV blocks still in use")
            if w.decode.seqs:
                out.append(f"{w.worker_id}: {len(w.decode.seqs)} requests still in its decode scheduler")
            if w.local:
                out.append(f"{w.worker_id}: {w.local.num_waiting} prompts still queued for its own prefill")
            if w.prefill_busy:
                out.append(f"{w.worker_id}: prefill still busy")
            if w.switch or w.state.switching or w.decode.settling or w.pause_waiters:
                out.append(f"{w.worker_id}: a switch, abort or pause still pending")
        if self.batcher is not None and len(self.batcher):
            out.append(f"{len(self.batcher)} short prompts still held for a batch")
        if self.decode_queue:
            out.append(f"{len(self.decode_queue)} requests still in the decode queue")
        unended = [r.rid for r in self.requests if r.phase != "done"]
        if unended:
            out.append(f"{len(unended)} requests never ended, e.g. {unended[:5]}")
        if any(r.phase == "done" and r.error is None and r.done_at is None for r in self.requests):
            out.append("a request ended without a time")
        if (not self.prefill_ledger.empty() or not self.dispatch.local_ledger.empty()
                or any(self.dispatch.decode_load.counts.values())):
            out.append("the gateway's outstanding counts are not back to zero")
        if self.open or self.pending_arrivals:
            out.append(f"{self.open} requests open, {self.pending_arrivals} arrivals pending")
        return out
