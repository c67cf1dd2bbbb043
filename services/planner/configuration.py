"""The configuration core's model, a first step of issue 24's item 3: for a forecast, the highest
request rate each configuration of N workers is predicted to carry within the SLOs, so that the
planner can choose among aggregation, a prefill/decode split, and (later) blends. Pure: no I/O, no
clock. It does not drive the planner yet; `benchmarks/bench_configuration.py` checks its
predictions against the rates the simulator measured (a finished `bench_matrix.py` run).

    split_capacity(forecast, profile, slo, prefill, decode, shape)      P prefill + D decode workers
    aggregated_capacity(forecast, profile, slo, workers, budget, shape) every worker prefills its own
                                                                        prompts in chunks beside its
                                                                        decodes, `budget` tokens a step
    rank_configurations(...)                                            every split and budget, best first

A split's capacity comes from services/planner/split.py's needs, which are linear in the rate: the
rate at which P and D workers are exactly enough. An aggregated worker is modelled in steady state:
at a rate r a worker's step of s seconds holds B = r E[O] s decodes (Little) and takes r E[P] s
prompt tokens (what arrives meanwhile), s = mixed_step_time(B, context, r E[P] s) (a fixed point);
the rate is feasible while that step meets the TPOT SLO, the prompt tokens fit the step's budget
beside the decodes, the decodes fit the batch and the KV pool, the p90 prompt's chunks (each step
then carries a whole budget) finish within the TTFT SLO, and, under a stall SLO, a step with a
whole budget of chunk stays within it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.load import SLO, IntervalLoad, LoadForecast, Split
from common.profile import LatencyProfile
from services.planner.split import PoolShape, decode_need, prefill_need


@dataclass(frozen=True)
class Capacity:
    name: str  # "split 3:5" | "aggregated 2048"
    rate: float  # predicted highest rate (req/s, the whole cluster) within the SLOs
    limited_by: str
    detail: dict = field(default_factory=dict)


def split_capacity(forecast: LoadForecast, profile: LatencyProfile, slo: SLO, prefill: int, decode: int,
                   shape: PoolShape) -> Capacity:
    pre = prefill_need(1.0, forecast.prompt, profile, slo, token_budget=shape.prefill_token_budget)
    dec = decode_need(1.0, forecast.prompt, forecast.output, profile, slo, kv_blocks=shape.kv_blocks,
                      block_size=shape.block_size, max_batch_size=shape.max_batch_size)
    name = f"split {prefill}:{decode}"
    if not pre.ttft_feasible or not dec.tpot_feasible:
        return Capacity(name, 0.0, "ttft" if not pre.ttft_feasible else "tpot")
    by_prefill, by_decode = prefill / pre.need, decode / dec.need  # needs at 1 req/s, in workers
    limited = "prefill" if by_prefill < by_decode else "decode"
    return Capacity(name, min(by_prefill, by_decode), limited,
                    {"by_prefill": by_prefill, "by_decode": by_decode, "decode_c_max": dec.c_max})


@dataclass(frozen=True)
class _AggregatedState:
    tpot: float  # mean seconds a token, over every step a request sees
    batch: float  # decodes in a worker's batch (Little: rate x E[O] x TPOT)
    chunk: float  # prompt tokens a chunk step takes beside them
    full_step: float  # a step that carries a whole chunk
    chunk_time: float  # share of the worker's time in chunk steps
    chunk_steps: float  # share of the steps that carry a chunk


def _aggregated_state(rate: float, mean_prompt: float, mean_output: float, context: float, budget: int,
                      profile: LatencyProfile) -> _AggregatedState | None:
    """One worker at `rate` req/s: a prompt is chunked as soon as it arrives, a whole budget beside
    the decodes every step until it is done (as LocalPrefill does), so a step either carries a full
    chunk or only decodes. None: the chunks alone would take all its time."""
    tpot = max(profile.decode_step_time(1, context), 1e-9)
    state = None
    for _ in range(60):  # a fixed point in the batch; a contraction while the rate is feasible
        batch = rate * mean_output * tpot
        chunk = budget - batch
        if chunk < 1:
            return None
        b = max(1, round(batch))
        # (a zero-cost profile's steps take no time: a floor keeps the fixed point finite)
        full = max(profile.mixed_step_time(b, context, int(chunk)), 1e-9)
        plain = max(profile.decode_step_time(b, context), 1e-9)
        chunk_steps_per_s = rate * mean_prompt / chunk
        chunk_time = chunk_steps_per_s * full
        if chunk_time >= 1.0:
            return None
        plain_steps_per_s = (1.0 - chunk_time) / plain
        new = 1.0 / (chunk_steps_per_s + plain_steps_per_s)
        state = _AggregatedState(new, batch, chunk, full, chunk_time,
                                 chunk_steps_per_s / (chunk_steps_per_s + plain_steps_per_s))
        if abs(new - tpot) <= 1e-7 * tpot:
            break
        tpot = new
    return state


TAIL_OUTPUT_QUANTILE = 0.25
TAIL_Z = 2.5


def _tail_tpot(st: _AggregatedState, mean_prompt: float, output: float) -> float:
    """The TPOT of a request near the tail (its z-score TAIL_Z): it sees `output` steps, and the
    chunk steps among them come in runs, one run a prompt (mean_prompt / chunk steps long), so their
    count varies as a Poisson count of runs does."""
    plain = (st.tpot - st.chunk_steps * st.full_step) / max(1e-9, 1.0 - st.chunk_steps)
    run = max(1.0, mean_prompt / st.chunk)
    runs = st.chunk_steps * output / run
    share = min(1.0, (runs + TAIL_Z * math.sqrt(runs)) * run / output) if runs > 0 else 0.0
    return plain + share * (st.full_step - plain)


def aggregated_capacity(forecast: LoadForecast, profile: LatencyProfile, slo: SLO, workers: int, budget: int,
                        shape: PoolShape) -> Capacity:
    dec = decode_need(1.0, forecast.prompt, forecast.output, profile, slo, kv_blocks=shape.kv_blocks,
                      block_size=shape.block_size, max_batch_size=shape.max_batch_size)
    context, c_kv = dec.context, dec.c_kv
    mean_prompt, mean_output = forecast.prompt.mean, max(forecast.output.mean, 1.0)
    p90 = forecast.prompt.quantile(0.9)
    tail_output = max(forecast.output.quantile(TAIL_OUTPUT_QUANTILE), 1.0)

    def limit(rate: float) -> str | None:
        """What the rate breaks, or None when it is within every bound."""
        st = _aggregated_state(rate, mean_prompt, mean_output, context, budget, profile)
        if st is None:
            return "budget"
        if _tail_tpot(st, mean_prompt, tail_output) > slo.tpot_s:
            return "tpot"
        if st.batch > min(shape.max_batch_size, c_kv):
            return "batch" if shape.max_batch_size <= c_kv else "kv"
        # The p90 prompt's own chunks (a step of at most its own tokens each), stretched by the
        # others' chunks queued with it.
        own = profile.mixed_step_time(max(1, round(st.batch)), context, int(min(st.chunk, p90)))
        if math.ceil(p90 / st.chunk) * own / (1.0 - st.chunk_time) > slo.ttft_s:
            return "ttft"
        # A request's p99 gap is a chunk step as soon as one step in a hundred carries a chunk.
        if slo.itl_s is not None and st.chunk_steps >= 0.01 and st.full_step > slo.itl_s:
            return "stall"
        return None

    name = f"aggregated {budget}"
    first = limit(1e-6)
    if first is not None:
        return Capacity(name, 0.0, first)
    lo, hi = 1e-6, 1.0
    while limit(hi) is None and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if limit(mid) is None else (lo, mid)
    return Capacity(name, lo * workers, limit(hi) or "", {"per_worker": lo})


def rank_configurations(forecast: LoadForecast, profile: LatencyProfile, slo: SLO, workers: int,
                        shape: PoolShape, budgets: tuple[int, ...] = (512, 2048, 8192)) -> list[Capacity]:
    """Every split of `workers` and aggregation at each budget, by predicted capacity, best first."""
    out = [split_capacity(forecast, profile, slo, p, workers - p, shape) for p in range(1, workers)]
    out += [aggregated_capacity(forecast, profile, slo, workers, b, shape) for b in budgets]
    return sorted(out, key=lambda c: (-c.rate, c.name))


# Aggregation's chunk budgets the core chooses among (vLLM's 2048 and the matrix's 512 and 8192
# among them). A budget changes no role: a mixed worker's next step takes it.
BUDGETS = (256, 512, 1024, 2048, 8192)
# The current configuration is kept while the forecast is within this share of its predicted
# capacity: every configuration carries such a load, and changing would only churn.
HEADROOM = 0.8
# Past that, another family (a split or aggregation) is taken only for this predicted gain over the
# current one's capacity: the change pauses work (a prefill worker drains, decodes migrate when
# mixed workers become prefill workers), which a small predicted gain may not repay.
GAIN_TO_CHANGE = 1.15
# A family seen to fail gives way to the other, not yet seen to fail, when the other's predicted
# capacity is at least this share of the failing one's (derated) capacity.
EXPLORE = 0.8
# A mixed worker's budget is retuned (a SetRole each) only for this predicted gain over the one it has.
BUDGET_GAIN = 1.05


@dataclass(frozen=True)
class Choice:
    """The configuration chosen, and why: its predicted capacity, the runner-up's, the current's."""

    target: Split
    predicted: Capacity
    runner_up: Capacity | None
    current: Capacity | None
    why: str
    model_rates: dict = field(default_factory=dict, compare=False)  # family -> the model's capacity, not derated

    def record(self) -> dict:
        """For the decision record and `dopd status`."""
        def cap(c: Capacity | None) -> dict | None:
            return None if c is None else {"name": c.name, "rate": round(c.rate, 3), "limited_by": c.limited_by}
        return {"target": self.target.name, "predicted": cap(self.predicted), "runner_up": cap(self.runner_up),
                "current": cap(self.current), "why": self.why}


def _family(split: Split) -> str:
    return f"aggregated {split.chunk_budget}" if split.mixed and not split.prefill else "split"


def family_of(split: Split) -> str:
    """The family a configuration belongs to, as observed ceilings are kept: "split" or "aggregated"."""
    return "aggregated" if split.mixed and not split.prefill else "split"


def _derated(cap: Capacity, factor: float | None) -> Capacity:
    """`cap` times the factor its family was seen to fall short of the model by (ObservedDerating)."""
    if factor is None or factor >= 1.0:
        return cap
    return Capacity(cap.name, cap.rate * factor, "observed", {**cap.detail, "model_rate": cap.rate})


# A configuration is judged by what it served once it has settled: the intervals after
# SETTLE_INTERVALS of it, OBSERVE_INTERVALS of them together, with at least OBSERVE_MIN_REQUESTS.
SETTLE_INTERVALS = 2
OBSERVE_INTERVALS = 5
OBSERVE_MIN_REQUESTS = 20
OBSERVED_TARGET = 0.9  # the share of requests within every SLO that rate goodput asks for (DistServe's)
DERATING_TTL_S = 120.0  # a derating is forgotten after this (the load's mix may have changed)


def observed_attainment(intervals: Sequence[IntervalLoad], slo: SLO) -> tuple[float, float, int] | None:
    """(share of requests within the TTFT and TPOT SLOs, the offered rate, requests seen) over
    `intervals`, from what the gateway recorded: first tokens (refusals count as misses) and
    finished requests' TPOTs, the worse of the two. None: too few requests to judge."""
    ttft = [x for i in intervals for x in i.ttft]
    tpot = [x for i in intervals for x in i.tpot]
    refused = sum(i.rejected for i in intervals)
    if len(ttft) + refused < OBSERVE_MIN_REQUESTS or len(tpot) < OBSERVE_MIN_REQUESTS // 2:
        return None
    ttft_ok = sum(x <= slo.ttft_s for x in ttft) / (len(ttft) + refused)
    tpot_ok = sum(x <= slo.tpot_s for x in tpot) / len(tpot)
    duration = sum(i.duration for i in intervals)
    rate = sum(i.arrivals + i.rejected for i in intervals) / duration if duration > 0 else 0.0
    return min(ttft_ok, tpot_ok), rate, len(ttft) + refused


@dataclass
class ObservedDerating:
    """The model's check against what was served: when the configuration in effect, settled,
    meets the SLOs for fewer than OBSERVED_TARGET of its requests at a rate its model said it
    carries (the model predicts a mean step; a tail of slow steps, a burst, a mix it does not
    know can break it), its family's predictions are scaled by offered / predicted for
    DERATING_TTL_S, so the core can choose the other family. A failure at a rate the model already
    said was too much teaches nothing (every configuration may fail there) and changes nothing.
    Pure: the caller passes the intervals, the model's rate and its clock."""

    factors: dict[str, tuple[float, float]] = field(default_factory=dict)  # family -> (factor, since)

    def observe(self, now: float, family: str, intervals: Sequence[IntervalLoad], slo: SLO,
                model_rate: float | None) -> None:
        """`intervals`: the settled ones served by `family` only, oldest first; `model_rate`: the
        capacity the model last predicted for it (None: unknown, nothing is learnt)."""
        if model_rate is None or model_rate <= 0 or len(intervals) < OBSERVE_INTERVALS:
            return
        judged = observed_attainment(intervals[-OBSERVE_INTERVALS:], slo)
        if judged is None or judged[0] >= OBSERVED_TARGET or not 0 < judged[1] <= model_rate:
            return
        old = self.factors.get(family)
        factor = judged[1] / model_rate
        self.factors[family] = (min(factor, old[0]) if old else factor, now)

    def active(self, now: float) -> dict[str, float]:
        self.factors = {f: c for f, c in self.factors.items() if now - c[1] < DERATING_TTL_S}
        return {f: factor for f, (factor, _) in self.factors.items()}


def choose_configuration(forecast: LoadForecast, profile: LatencyProfile, slo: SLO, workers: int,
                         shape: PoolShape, split_target: Split, current: Split | None,
                         budgets: tuple[int, ...] = BUDGETS, derating: Mapping[str, float] | None = None) -> Choice:
    """Aggregation at its best budget, or the split family (`split_target`: the P:D split of
    services/planner/split.py, whose capacity is the best split's), by predicted capacity at the
    forecast's mix, each family's scaled by its observed derating (ObservedDerating);
    `current` (the configuration chosen last; None: none yet) is kept while it carries the
    forecast with HEADROOM, or while the best other family gains less than GAIN_TO_CHANGE."""
    derating = derating or {}
    splits = [split_capacity(forecast, profile, slo, p, workers - p, shape) for p in range(1, workers)]
    best_split = max(splits, key=lambda c: c.rate) if splits else Capacity("split", 0.0, "workers")
    model = {"split": best_split.rate}
    best_split = _derated(best_split, derating.get("split"))
    aggregated = [aggregated_capacity(forecast, profile, slo, workers, b, shape) for b in budgets]
    model["aggregated"] = max(c.rate for c in aggregated)
    aggregated = sorted((_derated(c, derating.get("aggregated")) for c in aggregated), key=lambda c: (-c.rate, c.name))
    families = {"split": (best_split, split_target)}
    best_agg = aggregated[0]
    if current is not None and current.mixed and not current.prefill:  # the budget it has, unless
        held = next((c for c in aggregated if c.name == f"aggregated {current.chunk_budget}"), None)
        if held is not None and best_agg.rate <= BUDGET_GAIN * held.rate:  # another is clearly better
            best_agg = held
    budget = int(best_agg.name.split()[-1])
    families[best_agg.name] = (best_agg, Split(0, 0, mixed=workers, chunk_budget=budget))
    ranked = sorted(families.items(), key=lambda kv: -kv[1][0].rate)
    (best_name, (best_cap, best_target)), (_, (second_cap, _)) = ranked[0], ranked[1]
    if current is None:
        return Choice(best_target, best_cap, second_cap, None, "first choice: the highest predicted capacity", model)
    cur_name = _family(current)
    if cur_name.startswith("aggregated"):
        cur_name = best_agg.name  # a budget changes no role: the best budget is free to take
    cur_cap, cur_target = families.get(cur_name, (None, None))
    if cur_cap is None:
        return Choice(best_target, best_cap, second_cap, cur_cap, "the highest predicted capacity", model)
    # The best family other than the current one, and what it must promise to be taken.
    other_cap, other_target = next(f for n, f in ranked if n != cur_name)
    if forecast.rate <= HEADROOM * cur_cap.rate:  # (derated or not)
        return Choice(cur_target, cur_cap, other_cap, cur_cap,
                      f"kept: {forecast.rate:.1f} req/s is within {HEADROOM:.0%} of its capacity", model)
    if cur_cap.limited_by == "observed":
        # Seen to fail where its model said it carries: it gives way to a family not yet seen to
        # fail that its model puts within EXPLORE of it (both models may be off; one is known to
        # be), and else to any predicted gain.
        gain = EXPLORE if other_cap.limited_by != "observed" else 1.0 + 1e-9
    else:
        if best_name == cur_name:
            return Choice(cur_target, cur_cap, other_cap, cur_cap, "the highest predicted capacity", model)
        gain = GAIN_TO_CHANGE
    if other_cap.rate < gain * cur_cap.rate:
        return Choice(cur_target, cur_cap, other_cap, cur_cap,
                      f"kept: {other_cap.name} promises less than {gain:.2f}x of it", model)
    return Choice(other_target, other_cap, cur_cap, cur_cap,
                  f"changed: {other_cap.rate:.1f} req/s predicted against {cur_cap.rate:.1f}"
                  + (" (seen to fail)" if cur_cap.limited_by == "observed" else ""), model)
