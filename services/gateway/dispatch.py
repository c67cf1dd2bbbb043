"""Where a request goes, and whether it is taken: the one dispatch core that the gateway
(services/gateway/lifecycle.py, in wall time, over gRPC) and the simulator
(services/simulate/cluster.py, in virtual time) both drive. Pure: no I/O, no clock; callers pass
`now` (their clock's seconds) and the workers as they see them.

    path        by the serving mode and DOPD's policy (long, short, ultra-short; aggregated:
                prefilled where it decodes)
    admission   the policy's refusal when the predicted TTFT is already past the SLO
    decode      the order in which decode workers are asked to reserve, and whether one has a
                seat within the TPOT SLO; when none has one, whether waiting can help
    prefill     the least loaded prefill worker (a preferred one first: where a short batch went)
    local       a mixed worker that prefills the prompt itself, when its chunks, behind the prompts
                queued there, meet the TTFT SLO and a step with a whole chunk meets the stall SLO
                (`local_worker`); otherwise the prompt is disaggregated. With no prefill worker
                serving, the mixed worker with the least queued work takes it
    books       what was sent to each prefill worker (`PrefillLedger`) and what is held on each
                decode worker (`DecodeLoad`), the prompts each mixed worker prefills itself
                (`local_ledger`), which the choices above read; workers whose
                streams broke lately, which go last

The time a request may wait for a decode seat, and the decode queue itself, are the caller's:
the gateway waits in its DecodeQueue, the simulator refuses at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from common.kv.block_pool import kv_tokens_for
from common.modes import ServingMode
from services.gateway.decode_load import DecodeLoad
from services.gateway.routing import WorkerView, decode_preference, pick_prefill
from services.gateway.scheduling import Path, PrefillLedger, SchedulingPolicy, mean_context

# Why a request found no decode worker under admission control: every batch is at its seats.
NO_SEAT = "every decode worker's batch is at its seats within the TPOT SLO"
# A worker whose stream broke goes last in every choice for this long (the planner drops a dead
# worker within its heartbeat TTL; this is the gateway not waiting for that).
LOST_WORKER_S = 10.0
# A request leaves the decode queue this long before its deadline, so that the client hears why
# (RESOURCE_EXHAUSTED with the reason, not a bare DEADLINE_EXCEEDED).
QUEUE_GIVE_UP_S = 0.25


class Dispatcher:
    def __init__(self, mode: ServingMode, time_scale: float = 1.0) -> None:
        """`time_scale`: wall seconds per profile second (the sim engine's); the policy reasons in
        profile seconds, `now` is in the caller's."""
        self.mode = mode
        self.time_scale = time_scale
        self.prefill_ledger = PrefillLedger()  # prompts sent to each prefill worker, first token not back
        self.decode_load = DecodeLoad()  # the requests held on each decode worker
        self.local_ledger = PrefillLedger()  # prompts a mixed worker prefills itself, first token not back
        self._lost_until: dict[str, float] = {}  # worker id -> `now` until which it goes last
        # With other gateways beside this one, the prefill workers' own reports of their queued
        # tokens (WorkerInfo.prefill_waiting_tokens): the prompts the others sent are in them, not
        # in this gateway's ledger. Empty when this gateway is alone (its ledger is exact).
        self.reported_prefill_tokens: dict[str, int] = {}

    # -- the path and admission -------------------------------------------------------------
    def path(self, prompt_len: int, policy: SchedulingPolicy | None) -> Path:
        if not self.mode.disaggregated:
            return Path.ULTRA_SHORT  # aggregated: prefilled where it decodes
        return policy.path(prompt_len) if policy is not None else Path.LONG

    def least_loaded_prefill_work(self, prefill_ids: Iterable[str], now: float) -> tuple[int, float]:
        """(tokens outstanding, profile seconds busy) of the prefill worker with the fewest tokens."""
        tokens, busy = self.prefill_ledger.least_loaded(prefill_ids, now, self.reported_prefill_tokens)
        return tokens, busy / self.time_scale

    def admission_refusal(self, prompt_len: int, path: Path, policy: SchedulingPolicy | None,
                          prefill_ids: Iterable[str], now: float) -> str | None:
        """Why the request is refused at once (its predicted TTFT is already past the SLO), or None."""
        if policy is None:
            return None
        return policy.refusal(prompt_len, path, *self.least_loaded_prefill_work(prefill_ids, now))

    def ttft_slack_s(self, prompt_len: int, path: Path, policy: SchedulingPolicy | None,
                     prefill_ids: Iterable[str], now: float) -> float | None:
        """Profile seconds the request's predicted TTFT leaves before the SLO (None: no policy)."""
        if policy is None:
            return None
        return policy.ttft_slack(prompt_len, path, *self.least_loaded_prefill_work(prefill_ids, now))

    # -- decode -----------------------------------------------------------------------------
    def decode_order(self, workers: list[WorkerView], prompt_len: int, max_tokens: int,
                     policy: SchedulingPolicy | None, now: float) -> list[WorkerView]:
        """Decode workers, best first: the policy's order (smallest batch among those whose last
        report shows room, then most free blocks), or the gateway's own; those that look full
        last (their reports may be stale). Under admission control, only those with a seat
        within the TPOT SLO (SchedulingPolicy.has_seat): none may be left. Workers whose
        streams broke lately go last (the order is kept otherwise)."""
        needed = kv_tokens_for(prompt_len, max_tokens)
        if policy is None:
            order = decode_preference(workers, self.decode_load.counts, needed)
        else:
            context = mean_context(prompt_len, max_tokens)
            candidates = {w.worker_id: self.decode_load.candidate(w) for w in workers}
            by_id = {w.worker_id: w for w in workers}
            order = [by_id[c.worker_id] for c in policy.decode_workers(list(candidates.values()), needed, context)]
            order += [w for w in decode_preference(workers, self.decode_load.counts, needed)
                      if w not in order and policy.has_seat(candidates[w.worker_id], context)]
        return sorted(order, key=lambda w: self.recently_lost(w.worker_id, now))

    def has_seat(self, worker: WorkerView, prompt_len: int, max_tokens: int, policy: SchedulingPolicy | None) -> bool:
        """Whether `worker`'s batch still seats the request within the TPOT SLO (always, with no policy)."""
        return policy is None or policy.has_seat(self.decode_load.candidate(worker), mean_context(prompt_len,
                                                                                                   max_tokens))

    def seat_limit(self, worker: WorkerView, prompt_len: int, max_tokens: int, policy: SchedulingPolicy | None) -> int:
        """The seats `worker` may hold with the request among them (SchedulingPolicy.seat_limit;
        0: no limit), for the worker to enforce across gateways."""
        return 0 if policy is None else policy.seat_limit(self.decode_load.candidate(worker),
                                                          mean_context(prompt_len, max_tokens))

    def no_seat(self, policy: SchedulingPolicy) -> str:
        return f"{NO_SEAT} ({policy.slo.tpot_s * 1e3:.0f} ms)"

    def hopeless_seat_wait(self, workers: list[WorkerView], prompt_len: int, max_tokens: int,
                           policy: SchedulingPolicy | None, queued: int, budget_s: float) -> str | None:
        """Why waiting cannot help (to refuse now rather than after the wait), or None: no decode
        worker has a seat for the request and none is predicted to free for it, behind the
        `queued` requests ahead, within `budget_s` (caller's seconds)."""
        if policy is None:
            return None
        candidates = [self.decode_load.candidate(w, with_tokens_left=True) for w in workers]
        context = mean_context(prompt_len, max_tokens)
        if not candidates or any(policy.has_seat(c, context) for c in candidates):
            return None
        wait = policy.seat_wait_s(candidates, queued) * self.time_scale
        if wait <= budget_s:
            return None
        return (f"overloaded: {self.no_seat(policy)}, and with {queued} requests queued ahead a seat is predicted "
                f"to free in {wait:.2f} s, past the {max(0.0, budget_s):.2f} s this request may wait")

    def join_decode(self, worker_id: str, request_id: str, prompt_len: int, max_tokens: int) -> None:
        """The request joins `worker_id`'s decode batch, as the dispatcher counts it."""
        self.decode_load.join(worker_id, request_id, mean_context(prompt_len, max_tokens), max_tokens)

    def leave_decode(self, worker_id: str, request_id: str) -> None:
        self.decode_load.leave(worker_id, request_id)

    def made(self, worker_id: str, request_id: str, tokens_left: int) -> None:
        self.decode_load.made(worker_id, request_id, tokens_left)

    # -- prefill ----------------------------------------------------------------------------
    def pick_prefill(self, workers: list[WorkerView], now: float, prefer: str | None = None) -> WorkerView | None:
        """The `prefer`red worker if it is among `workers`, else the one with the fewest prompt
        tokens outstanding, workers whose streams broke lately only when no other is left."""
        preferred = [w for w in workers if w.worker_id == prefer]
        if preferred:
            return preferred[0]
        trusted = [w for w in workers if not self.recently_lost(w.worker_id, now)] or workers
        return pick_prefill(trusted, self.prefill_ledger.tokens)

    # -- local prefill on mixed workers ----------------------------------------------------
    def local_ttft_s(self, worker: WorkerView, prompt_len: int, policy: SchedulingPolicy) -> float:
        """Profile seconds until `prompt_len` tokens queued on mixed `worker` have had their last
        chunk: its queued prompts' chunks first, each step its chunk budget less its decodes."""
        c = self.decode_load.candidate(worker)
        chunk = max(1, worker.chunk_budget - c.batch_size)
        steps = math.ceil((self.local_ledger.tokens[worker.worker_id] + prompt_len) / chunk)
        context = c.context_tokens / c.batch_size if c.batch_size else 0.0
        return steps * policy.profile.mixed_step_time(c.batch_size, context, min(chunk, prompt_len))

    def local_worker(self, mixed: list[WorkerView], prompt_len: int, policy: SchedulingPolicy | None,
                     prefill_serving: bool, now: float) -> WorkerView | None:
        """The mixed worker that prefills the prompt itself, or None: disaggregate it. Least
        queued local work first; one fits when the prompt's predicted TTFT there meets the SLO and
        (under a stall SLO) a step with a whole chunk meets it (with no policy, and so no profile:
        when it has no prompt of its own queued). With no prefill worker serving, the least queued
        one, fit or not."""
        trusted = [w for w in mixed if not self.recently_lost(w.worker_id, now)] or mixed
        order = sorted(trusted, key=lambda w: (self.local_ledger.tokens[w.worker_id], w.worker_id))
        if not order:
            return None
        if policy is None:  # no profile to predict with: a mixed worker with no prompt of its own queued
            idle = [w for w in order if not self.local_ledger.tokens[w.worker_id]]
            return idle[0] if idle else (None if prefill_serving else order[0])
        for w in order:
            if self.local_ttft_s(w, prompt_len, policy) > policy.slo.ttft_s:
                continue
            if policy.slo.itl_s is not None:
                c = self.decode_load.candidate(w)
                context = c.context_tokens / c.batch_size if c.batch_size else 0.0
                if policy.profile.mixed_step_time(c.batch_size, context, w.chunk_budget) > policy.slo.itl_s:
                    continue
            return w
        return None if prefill_serving else order[0]

    def local_refusal(self, worker: WorkerView, prompt_len: int, policy: SchedulingPolicy | None) -> str | None:
        """Admission control on a mixed worker: why the prompt is refused there (its predicted
        TTFT, behind that worker's queued prompts, is past the SLO), or None."""
        if policy is None or not policy.admission:
            return None
        ttft = self.local_ttft_s(worker, prompt_len, policy)
        if ttft <= policy.slo.ttft_s:
            return None
        return (f"overloaded: predicted time to first token {ttft * 1e3:.0f} ms on mixed worker {worker.worker_id} "
                f"is past the {policy.slo.ttft_s * 1e3:.0f} ms SLO, and no prefill worker serves")

    # -- lost workers -----------------------------------------------------------------------
    def lost(self, worker_id: str, now: float) -> None:
        """`worker_id`'s stream broke: it goes last in every choice for LOST_WORKER_S (caller's seconds)."""
        self._lost_until[worker_id] = now + LOST_WORKER_S

    def recently_lost(self, worker_id: str, now: float) -> bool:
        until = self._lost_until.get(worker_id)
        if until is None:
            return False
        if now < until:
            return True
        del self._lost_until[worker_id]
        return False
