"""The planner's control loop: the async adapter around the pure PlannerCore.

Every interval: take the gateways' load reports and the workers' last heartbeats, append them to
the history (Redis, with an in-memory copy that survives Redis faults), decide, and apply the role
changes through SetRole on the workers, one task each, so that a slow migration never holds up
the next interval. Nothing here is needed to serve: when the planner is away, the gateway routes
by the last topology and the workers keep their roles.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass

import grpc

from common.convert import ROLE_FROM_PB, ROLE_TO_PB
from common.load import IntervalLoad, WorkerLoad
from common.pb import common_pb2, planner_pb2, worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool
from common.types import Role
from services.planner import metrics
from services.planner.core import HISTORY_KEPT, Decision, PlannerCore, merge_reports
from services.planner.history import LoadHistory
from services.planner.policy import RoleChange

log = logging.getLogger(__name__)
RECENT_SWITCHES = 32


def worker_load(info: common_pb2.WorkerInfo) -> WorkerLoad:
    return WorkerLoad(worker_id=info.worker_id, role=str(ROLE_FROM_PB.get(info.role, "")),
                      prefill_waiting=info.prefill_waiting, prefill_waiting_tokens=info.prefill_waiting_tokens,
                      decode_running=info.decode_running, decode_waiting=info.decode_waiting,
                      kv_blocks_used=info.kv_blocks_used, kv_blocks_total=info.kv_blocks_total,
                      switching=info.switching)


@dataclass
class Clock:
    """Profile time: wall time divided by the sim engine's time scale (1 for real engines)."""

    time_scale: float = 1.0

    def now(self) -> float:
        return time.monotonic() / self.time_scale


class PlannerController:
    def __init__(self, core: PlannerCore | None, history: LoadHistory, registry, channels: ChannelPool,
                 clock: Clock, switch_timeout_s: float) -> None:
        self.core = core  # None: mode off
        self.history = history
        self.registry = registry
        self.channels = channels
        self.clock = clock
        self.switch_timeout_s = switch_timeout_s
        self.intervals: list[IntervalLoad] = []
        self.pending_reports: list[IntervalLoad] = []
        self.last: Decision | None = None
        self.switches: collections.deque[planner_pb2.RoleSwitch] = collections.deque(maxlen=RECENT_SWITCHES)
        self._tasks: set[asyncio.Task] = set()
        self._interval_start = time.time()

    async def resume(self) -> None:
        """Pick up the history a previous planner left in Redis."""
        records = await self.history.load(time.time())
        self.intervals = [IntervalLoad.from_dict(doc["interval"]) for _, doc in records if "interval" in doc]
        if self.intervals:
            log.info("resumed %d intervals of load history", len(self.intervals))

    def report(self, load: planner_pb2.LoadReport) -> None:
        scale = self.clock.time_scale
        self.pending_reports.append(IntervalLoad(
            start=load.start_unix, duration=load.duration_s / scale, arrivals=load.arrivals,
            prompt_lens=tuple(load.prompt_lens), output_lens=tuple(load.output_lens), rejected=load.rejected,
            ttft=tuple(x / scale for x in load.ttft_s), tpot=tuple(x / scale for x in load.tpot_s)))

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s * self.clock.time_scale)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a bad interval never stops the planner
                log.exception("planner interval failed")

    async def tick(self) -> None:
        wall = time.time()
        reports, self.pending_reports = self.pending_reports, []
        interval = merge_reports(reports, self._interval_start, (wall - self._interval_start) / self.clock.time_scale)
        self._interval_start = wall
        workers = [worker_load(w) for w in self.registry.live(time.monotonic())]
        self.intervals.append(interval)
        del self.intervals[:-HISTORY_KEPT]
        metrics.OBSERVED_RATE.set(interval.rate)
        doc = {"interval": interval.to_dict(), "workers": [w.__dict__ for w in workers]}
        if self.core is not None:
            self.last = self.core.decide(self.clock.now(), self.intervals, workers)
            doc["forecast_rate"] = self.last.forecast.rate
            target = self.last.target
            doc["target"] = [target.prefill, target.decode, target.mixed]
            if self.last.choice is not None:
                doc["configuration"] = self.last.choice.record()
            self._publish(self.last)
            for change in self.last.changes:
                self._spawn(self._apply(change, target.chunk_budget))
            if target.mixed and not self.last.changes:
                self._retune(workers, target.chunk_budget)
        await self.history.append(wall, doc)
        metrics.HISTORY_INTERVALS.set(len(self.intervals))

    def _publish(self, decision: Decision) -> None:
        metrics.PREDICTED_RATE.set(decision.forecast.rate)
        metrics.TARGET_WORKERS.labels("prefill").set(decision.target.prefill)
        metrics.TARGET_WORKERS.labels("decode").set(decision.target.decode)
        metrics.TARGET_WORKERS.labels("mixed").set(decision.target.mixed)
        metrics.DECISION_SECONDS.observe(decision.seconds)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, change: RoleChange, chunk_budget: int = 0) -> None:
        budget = chunk_budget if change.to_role == Role.MIXED else 0
        record = await self.switch(change.worker_id, Role(change.to_role), change.reason, budget)
        self.core.observe_switch(self.clock.now(), change, record.ok, record.seconds / self.clock.time_scale)

    def _retune(self, workers: list[WorkerLoad], chunk_budget: int) -> None:
        """Mixed workers whose chunk budget is not the configuration's get it (SetRole to mixed
        with the budget: no switch, the next step takes it)."""
        by_id = {w.worker_id: w for w in self.registry.live(time.monotonic())}
        for w in workers:
            info = by_id.get(w.worker_id)
            if w.role == Role.MIXED and not w.switching and info is not None and info.chunk_budget != chunk_budget:
                self._spawn(self.switch(w.worker_id, Role.MIXED, f"configuration: chunk budget {chunk_budget}",
                                        chunk_budget))

    async def switch(self, worker_id: str, to: Role, reason: str, chunk_budget: int = 0) -> planner_pb2.RoleSwitch:
        """SetRole on one worker (`chunk_budget`: a mixed worker's, 0 for its own setting); the
        outcome is recorded and counted, never raised."""
        info = next((w for w in self.registry.live(time.monotonic()) if w.worker_id == worker_id), None)
        record = planner_pb2.RoleSwitch(worker_id=worker_id, to_role=ROLE_TO_PB[to], at_unix=time.time(),
                                        reason=reason)
        started = time.perf_counter()
        if info is None:
            record.error = "not in the topology"
        else:
            record.from_role = info.role
            stub = worker_pb2_grpc.WorkerStub(self.channels.get(info.address))
            try:
                reply = await stub.SetRole(worker_pb2.SetRoleRequest(role=ROLE_TO_PB[to], chunk_budget=chunk_budget),
                                           timeout=self.switch_timeout_s)
                record.ok = True
                record.migrated_requests, record.migrated_bytes = reply.migrated_requests, reply.migrated_bytes
                record.fell_back_to_drain = reply.fell_back_to_drain
                metrics.ROLE_SWITCHES.labels(str(ROLE_FROM_PB[reply.from_role]), str(to)).inc()
            except grpc.aio.AioRpcError as exc:
                record.error = f"{exc.code().name}: {exc.details()}"
        record.seconds = time.perf_counter() - started
        self.switches.append(record)
        (log.info if record.ok else log.warning)("switch %s -> %s (%s): %s in %.0f ms", worker_id, to, reason,
                                                 "ok" if record.ok else record.error, record.seconds * 1e3)
        return record

    def status(self, mode: str, predictor: str) -> planner_pb2.PlanStatus:
        out = planner_pb2.PlanStatus(mode=mode, predictor=predictor, intervals_recorded=len(self.intervals),
                                     redis_ok=self.history.redis_ok, recent_switches=list(self.switches))
        if self.intervals:
            out.observed_rate = self.intervals[-1].rate
        if self.last is not None:
            f, t = self.last.forecast, self.last.target
            out.target_prefill, out.target_decode = t.prefill, t.decode
            out.target_mixed, out.target_chunk_budget = t.mixed, t.chunk_budget
            if self.last.choice is not None:
                out.configuration = json.dumps(self.last.choice.record())
            out.predicted_rate = f.rate
            out.predicted_prompt_p50, out.predicted_prompt_p90 = f.prompt.quantile(0.5), f.prompt.quantile(0.9)
            out.predicted_output_p50 = f.output.quantile(0.5)
            out.split_detail = json.dumps(t.detail, default=str)
            out.decision_seconds = self.last.seconds
        return out

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.history.close()
