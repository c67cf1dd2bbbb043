"""Predictors with no model fit: constant (the last interval) and EWMA. Both forecast flat (the
same answer for every horizon). Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from common.load import IntervalLoad, LoadForecast
from services.planner.predictors.base import (
    assemble,
    check_alpha,
    check_horizon,
    ewma,
    log_ewma,
    observe,
    register_predictor,
)


@register_predictor("constant")
@dataclass(frozen=True)
class ConstantPredictor:
    """The next interval is the last one: its rate, and the lengths of the last interval that had
    arrivals (an interval with none carries no lengths, so the last known ones carry forward)."""

    name: ClassVar[str]

    def predict(self, history: Sequence[IntervalLoad], horizon: int = 1) -> LoadForecast:
        check_horizon(horizon)
        obs = observe(history, 1)
        prompt = obs.prompt[-1] if len(obs.prompt) else None
        output = obs.output[-1] if len(obs.output) else None
        rate = float(obs.rate[-1]) if len(obs.rate) else 0.0
        return assemble(self.name, rate, prompt, output, (0.0, None, None))


@register_predictor("ewma")
@dataclass(frozen=True)
class EwmaPredictor:
    """Exponentially weighted moving averages, s_0 = x_0, s_t = alpha x_t + (1 - alpha) s_(t-1):
    of the rate over every interval, and of each length quantile and the mean over the intervals
    with arrivals, level by level (so quantiles stay ordered) and in log space: a weighted
    geometric mean. Lengths span 10 to 10,000 tokens; averaged in tokens, one interval of long
    prompts would hold a short-prompt forecast high for many intervals. Only the last `window`
    points are read; alpha 0.3 leaves weight 0.7**200 ~ 1e-31 beyond the default window."""

    alpha: float = 0.3
    window: int = 200
    name: ClassVar[str]

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    def predict(self, history: Sequence[IntervalLoad], horizon: int = 1) -> LoadForecast:
        check_horizon(horizon)
        obs = observe(history, self.window)
        rate = float(ewma(obs.rate, self.alpha)) if len(obs.rate) else 0.0
        prompt = log_ewma(obs.prompt, self.alpha) if len(obs.prompt) else None
        output = log_ewma(obs.output, self.alpha) if len(obs.output) else None
        return assemble(self.name, rate, prompt, output, (0.0, None, None))
