"""One planner decision, pure: from the interval that just ended, the history and the workers'
reports to a forecast, a target split and the role changes to make. No I/O and no clock reads,
so the planner service runs it every interval and the virtual-time simulator runs it unchanged.

    forecast = predictor.predict(history, horizon)   horizon: intervals ahead that a switch takes
    target   = compute_split(forecast, profile, SLO, workers)
    target   = choose_configuration(..., target, ...)  with mixed workers (`mixed`): aggregation or
                                                     the split, by predicted capacity, checked
                                                     against what the configuration served
    changes  = policy.decide(now, workers, target)   hysteresis, cooldown, cap, emergency

Proactive: the forecast looks `horizon` intervals ahead, where `horizon` covers the time a role
switch takes (measured, smoothed), so the split is changed before the load it is for arrives.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from common.load import SLO, IntervalLoad, LoadForecast, Predictor, Split, WorkerLoad
from common.profile import LatencyProfile
from services.planner.configuration import (
    OBSERVE_INTERVALS,
    SETTLE_INTERVALS,
    Choice,
    ObservedDerating,
    choose_configuration,
    family_of,
)
from services.planner.policy import PolicyConfig, ReconfigPolicy, RoleChange
from services.planner.split import PoolShape, compute_split

# The history a prediction sees: enough for ARIMA's window and more, bounded so a decision's cost
# does not grow with the planner's age.
PREDICT_WINDOW = 300
# Intervals a planner keeps in memory (status and restarts read them; a decision only the last
# PREDICT_WINDOW).
HISTORY_KEPT = 10_000


@dataclass
class Decision:
    forecast: LoadForecast
    target: Split
    changes: list[RoleChange]
    horizon: int
    seconds: float  # the decision's own time (model fit included), on the host's clock
    choice: Choice | None = None  # the configuration core's choice and why (None: mixed workers off)


@dataclass
class PlannerCore:
    predictor: Predictor
    profile: LatencyProfile
    slo: SLO
    shape: PoolShape
    interval_s: float  # one interval, in the clock `now` is on
    switching: bool = True  # False: forecast and target only (the `static` mode)
    policy: ReconfigPolicy = field(default_factory=lambda: ReconfigPolicy(PolicyConfig()))
    switch_seconds: float = 0.0  # smoothed time of one role switch (EWMA of measured ones)
    # The configuration core (services/planner/configuration.py) chooses between the split and
    # aggregation with mixed workers; False: the split only (the planner before mixed workers).
    mixed: bool = False
    chosen: Split | None = None  # the configuration chosen last
    decisions: int = 0  # decide() calls so far (each after one more interval)
    chosen_since: int = 0  # the decision at which the current family was chosen
    observed: ObservedDerating = field(default_factory=ObservedDerating)
    last_choice: Choice | None = None
    recent_choices: list[Choice] = field(default_factory=list)  # the last OBSERVE_INTERVALS

    def horizon(self) -> int:
        """Intervals ahead to forecast: the next one, plus those a switch takes to complete."""
        return 1 + math.ceil(self.switch_seconds / self.interval_s) if self.interval_s > 0 else 1

    def observe_switch(self, now: float, change: RoleChange, ok: bool, seconds: float) -> None:
        self.policy.record_switch(now, change, ok)
        if ok:
            self.switch_seconds = seconds if self.switch_seconds == 0 else 0.7 * self.switch_seconds + 0.3 * seconds

    def decide(self, now: float, history: list[IntervalLoad], workers: list[WorkerLoad]) -> Decision:
        started = time.perf_counter()
        self.decisions += 1
        horizon = self.horizon()
        forecast = self.predictor.predict(history[-PREDICT_WINDOW:], horizon)
        total = sum(1 for w in workers if w.role in ("prefill", "decode", "mixed"))
        target = compute_split(forecast, self.profile, self.slo, max(total, 1), kv_blocks=self.shape.kv_blocks,
                               block_size=self.shape.block_size, max_batch_size=self.shape.max_batch_size,
                               prefill_token_budget=self.shape.prefill_token_budget)
        choice = None
        if self.mixed and self.switching and total >= 2:
            current = self.chosen
            if current is None and workers and all(w.role == "mixed" for w in workers):
                current = Split(0, 0, mixed=total, chunk_budget=self.shape.prefill_token_budget)
            if current is not None:  # what the configuration served, once settled, against the SLOs
                served = self.decisions - self.chosen_since - SETTLE_INTERVALS  # intervals since it settled
                # The model's least capacity for it over the judged intervals (their forecasts differ).
                rates = [c.model_rates.get(family_of(current), 0.0) for c in self.recent_choices[-OBSERVE_INTERVALS:]]
                model = min(rates) if len(rates) >= OBSERVE_INTERVALS else None
                self.observed.observe(now, family_of(current), history[-served:] if served > 0 else [], self.slo,
                                      model)
            choice = self.last_choice = choose_configuration(
                forecast, self.profile, self.slo, total, self.shape, target, current,
                derating=self.observed.active(now))
            self.recent_choices = [*self.recent_choices[-OBSERVE_INTERVALS + 1:], choice]
            if current is None or family_of(choice.target) != family_of(current):
                self.chosen_since = self.decisions
            target = self.chosen = choice.target
        changes = self.policy.decide(now, workers, target) if self.switching and total >= 2 else []
        return Decision(forecast, target, changes, horizon, time.perf_counter() - started, choice)


def merge_reports(reports: list[IntervalLoad], start: float, duration: float) -> IntervalLoad:
    """Several gateways' reports of one interval as one (the planner sees the whole cluster)."""
    return IntervalLoad(
        start=start, duration=duration, arrivals=sum(r.arrivals for r in reports),
        prompt_lens=tuple(x for r in reports for x in r.prompt_lens),
        output_lens=tuple(x for r in reports for x in r.output_lens),
        rejected=sum(r.rejected for r in reports),
        ttft=tuple(x for r in reports for x in r.ttft), tpot=tuple(x for r in reports for x in r.tpot))
