"""What the planner reasons about, as plain data, shared by the gateway, the planner and the
simulator (it lives in common/ so that none of them reaches into another). Pure: no I/O, no grpc,
redis, asyncio or torch.

    IntervalLoad   what the gateway saw in one planner interval (arrivals, their lengths, latencies)
    WorkerLoad     what one worker reported at the end of an interval (queues, KV, role)
    LengthDist     a length distribution by its quantiles (not only its mean)
    LoadForecast   a predictor's answer: next interval's arrival rate and length distributions
    SLO            the latency targets the split is computed for

Times are seconds on whatever clock the caller runs (wall clock for the services, profile time
for the sim engine and the virtual-time simulator); nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

# The quantile levels a LengthDist keeps. Fine enough at the tail (p90, p99) for the convex prefill
# cost of long prompts to show, coarse enough to forecast each level as its own series.
QUANTILE_LEVELS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty sequence (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token lengths: its value at each of QUANTILE_LEVELS, and its mean."""

    quantiles: tuple[float, ...]
    mean: float

    def __post_init__(self) -> None:
        if len(self.quantiles) != len(QUANTILE_LEVELS):
            raise ValueError(f"need {len(QUANTILE_LEVELS)} quantiles, got {len(self.quantiles)}")
        if any(b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)):
            raise ValueError(f"quantiles must not decrease: {self.quantiles}")

    @classmethod
    def from_samples(cls, lengths: Sequence[float]) -> LengthDist:
        if not lengths:
            raise ValueError("no lengths to describe")
        xs = sorted(float(x) for x in lengths)
        return cls(tuple(_quantile(xs, q) for q in QUANTILE_LEVELS), sum(xs) / len(xs))

    @classmethod
    def constant(cls, length: float) -> LengthDist:
        return cls(tuple(float(length) for _ in QUANTILE_LEVELS), float(length))

    def quantile(self, q: float) -> float:
        """The value at level q, interpolated between the kept levels (clamped outside them)."""
        levels, values = QUANTILE_LEVELS, self.quantiles
        if q <= levels[0]:
            return values[0]
        if q >= levels[-1]:
            return values[-1]
        for i in range(1, len(levels)):
            if q <= levels[i]:
                w = (q - levels[i - 1]) / (levels[i] - levels[i - 1])
                return values[i - 1] + w * (values[i] - values[i - 1])
        return values[-1]  # unreachable

    def buckets(self) -> list[tuple[float, float]]:
        """(length, probability) pairs that stand for the distribution when taking the expected
        value of a non-linear cost: each kept quantile carries the probability mass around it
        (half-way to its neighbours), so E[f(L)] ~ sum(p * f(length))."""
        levels = QUANTILE_LEVELS
        edges = [0.0] + [(a + b) / 2 for a, b in zip(levels, levels[1:], strict=False)] + [1.0]
        return [(v, edges[i + 1] - edges[i]) for i, v in enumerate(self.quantiles)]


@dataclass(frozen=True)
class IntervalLoad:
    """What the gateway saw in one planner interval [start, start + duration)."""

    start: float
    duration: float
    arrivals: int  # requests accepted in the interval
    prompt_lens: tuple[int, ...] = ()  # one per arrival
    output_lens: tuple[int, ...] = ()  # requested max_tokens, one per arrival
    rejected: int = 0  # refused at once (overload, admission control)
    ttft: tuple[float, ...] = ()  # seconds, requests whose first token came in the interval
    tpot: tuple[float, ...] = ()  # seconds, requests that finished in the interval

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def rate(self) -> float:
        """Arrivals per second (refused ones included: they are load the cluster was offered)."""
        return (self.arrivals + self.rejected) / self.duration if self.duration > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> IntervalLoad:
        return cls(start=float(doc["start"]), duration=float(doc["duration"]), arrivals=int(doc["arrivals"]),
                   prompt_lens=tuple(int(x) for x in doc.get("prompt_lens", ())),
                   output_lens=tuple(int(x) for x in doc.get("output_lens", ())),
                   rejected=int(doc.get("rejected", 0)),
                   ttft=tuple(float(x) for x in doc.get("ttft", ())),
                   tpot=tuple(float(x) for x in doc.get("tpot", ())))


@dataclass(frozen=True)
class WorkerLoad:
    """One worker as it reported itself at the end of an interval."""

    worker_id: str
    role: str  # "prefill" | "decode"
    prefill_waiting: int = 0  # requests queued for a prefill batch
    prefill_waiting_tokens: int = 0
    decode_running: int = 0  # requests in the running decode batch
    decode_waiting: int = 0  # reserved, waiting for KV or a seat in the batch
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    switching: bool = False  # a role switch is under way

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class LoadForecast:
    """A prediction of the next interval."""

    rate: float  # requests per second
    prompt: LengthDist
    output: LengthDist
    predictor: str = ""


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    # The stall SLO: each request's p99 inter-token gap (DynaServe's P99 TBT), when one is set.
    # Carried to the planner for the configuration it chooses; the split does not read it.
    itl_s: float | None = None


class Predictor(Protocol):
    """Predicts the interval `horizon` intervals after the last one of the history (oldest first).
    Implementations keep no state that the history does not hold, so a restarted planner predicts
    the same."""

    name: str

    def predict(self, history: Sequence[IntervalLoad], horizon: int = 1) -> LoadForecast: ...


@dataclass(frozen=True)
class Split:
    """How many workers should serve each role (a configuration of the cluster): prefill, decode,
    and mixed workers that prefill whole requests in chunks of at most `chunk_budget` tokens a step
    beside their decodes (services/planner/configuration.py chooses them)."""

    prefill: int
    decode: int
    detail: dict = field(default_factory=dict, compare=False)  # how it was computed, for status and logs
    mixed: int = 0
    chunk_budget: int = 0  # tokens a mixed worker's step carries (decodes and chunks); 0: no mixed worker

    @property
    def total(self) -> int:
        return self.prefill + self.decode + self.mixed

    @property
    def rest_role(self) -> str:
        """The role of the workers that are not prefill workers ("decode" or "mixed"): a
        configuration has one or the other, never both."""
        return "mixed" if self.mixed else "decode"

    @property
    def name(self) -> str:
        if self.mixed and not self.prefill:
            return f"aggregated {self.chunk_budget}"
        if self.mixed:
            return f"blend {self.prefill}:{self.mixed}m@{self.chunk_budget}"
        return f"split {self.prefill}:{self.decode}"
