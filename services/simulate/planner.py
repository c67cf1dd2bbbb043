"""The planner in virtual time: every interval what services/planner/controller.py does, minus
Redis and gRPC. The gateway's LoadRecorder gives the interval's load, each worker its WorkerLoad
(as its heartbeat would, read at the tick), the real PlannerCore decides, and each RoleChange
becomes a modelled switch (services/simulate/switching.py) whose outcome and duration go back to
the core (observe_switch), as the controller reports a SetRole's.
"""

from __future__ import annotations

from common.load import IntervalLoad
from common.types import Role
from services.planner.core import HISTORY_KEPT, PlannerCore
from services.planner.policy import RoleChange
from services.simulate.cluster import Cluster
from services.simulate.switching import Switch


class PlannerDriver:
    def __init__(self, cluster: Cluster, core: PlannerCore) -> None:
        self.cluster = cluster
        self.core = core
        self.intervals: list[IntervalLoad] = []
        self.decisions: list[tuple[float, int, int, float]] = []  # (t, target P, target D, forecast rate)
        self.choices: list[dict] = []  # the configuration core's choice at each tick, and why
        self.decision_seconds = 0.0  # the core's own time on the host's clock (not simulated)

    def start(self) -> None:
        self.cluster.loop.after(self.core.interval_s, self.tick)

    def tick(self) -> None:
        c = self.cluster
        now = c.loop.now
        self.intervals.append(c.recorder.take(now))
        del self.intervals[:-HISTORY_KEPT]
        decision = self.core.decide(now, self.intervals, [w.load() for w in c.workers])
        self.decision_seconds += decision.seconds
        target = decision.target
        self.decisions.append((now, target.prefill, target.total - target.prefill, decision.forecast.rate))
        if decision.choice is not None:
            record = decision.choice.record()
            if not self.choices or self.choices[-1]["target"] != record["target"]:
                self.choices.append({"t": now, **record})
        if target.mixed:
            c.set_chunk_budget(target.chunk_budget)
        c.set_forecast(decision.forecast, self.core.slo)
        for change in decision.changes:
            worker = c.by_id[change.worker_id]
            c.switches.begin(worker, Role(change.to_role),
                             lambda sw, change=change: self._switched(change, sw), change.reason)
        if c.active():
            c.loop.after(self.core.interval_s, self.tick)

    def _switched(self, change: RoleChange, sw: Switch) -> None:
        self.core.observe_switch(self.cluster.loop.now, change, True, sw.seconds)
