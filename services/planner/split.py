"""The split: how many of N workers should prefill and how many decode. Pure: no I/O, no clock.

    compute_split(forecast, profile, slo, total_workers, *, kv_blocks, block_size, max_batch_size,
                  prefill_token_budget, ...) -> Split

It starts from DOPD's rule (FACTS.md, "The field": one decode worker frees c slots every
OSL * TPOT seconds, one prefill worker fills a slot every TTFT) and changes three things:

1. Prefill. Its cost is convex in prompt length, so the work is E[prefill_time(L)] over the
   predicted distribution (LengthDist.buckets()), not prefill_time(E[L]). A prefill worker is one
   server with a FIFO queue: it may run only as busy (utilisation rho) as keeps the queueing wait
   plus the p-quantile prompt's own forward within the TTFT SLO (see prefill_need).
2. Decode. The concurrency c_max one worker holds is the smallest of: the largest batch whose step
   fits the TPOT SLO at the batch's mean context, what the KV pool holds when every request
   reserves prompt + max_tokens - 1 tokens up front (common/kv/block_pool.py), and max_batch_size.
   Both the context and the KV per request are length-biased: a request with a long output stays
   in the batch longer, so the tail of the output distribution weighs more than its mean says.
   Needed concurrency is Little's law: rate * E[output] * step time (see decode_need).
3. Fitting. The two raw needs (fractional workers) are fitted into total_workers by one greedy
   rule, which meets both needs when they fit, then hands spare workers to the role with the least
   headroom, and under a shortfall balances the two loads need / count (see fit_split).

The needs are linear in the rate (rho_max and c_max do not depend on it), so a zero rate uses the
needs at one request per second: the split the predicted mix would want at any rate, ready for
the first burst, rather than an arbitrary half/half.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from common.load import SLO, LengthDist, LoadForecast, Split
from common.profile import LatencyProfile

PREFILL = "prefill"
DECODE = "decode"


@dataclass(frozen=True)
class PoolShape:
    """What the split needs to know of the workers' engines."""

    kv_blocks: int
    block_size: int
    max_batch_size: int
    prefill_token_budget: int


@dataclass(frozen=True)
class PrefillFigures:
    mean_work_s: float  # E[w(L)]: seconds of prefill worker time one request costs
    residual_s: float  # E[w^2] / (2 E[w]): mean residual work a newcomer finds in service
    service_s: float  # the p-quantile prompt's own forward (+ ttft_overhead_s)
    rho_max: float  # the utilisation a prefill worker may run at and keep that prompt's TTFT
    capacity_rps: float  # requests per second one prefill worker takes at rho_max
    work_per_s: float  # rate * E[w]: prefill worker-seconds needed per second
    need: float  # work_per_s / rho_max, in (fractional) workers
    ttft_feasible: bool  # False: that prompt's forward alone misses the SLO; rho_max is a floor


@dataclass(frozen=True)
class DecodeFigures:
    context: float  # time-weighted mean context of the running batch
    blocks_per_request: float  # time-weighted mean KV blocks a resident request holds
    c_tpot: int  # largest batch whose step fits the TPOT SLO (0: none does)
    c_kv: int  # requests the KV pool holds
    c_max: int  # min(c_tpot, c_kv, max_batch_size)
    limited_by: str  # "tpot" | "kv" | "max_batch_size"
    step_s: float  # step time at a batch of c_max (>= 1)
    concurrency: float  # Little's law: rate * E[output] * step_s
    need: float  # concurrency / (c_max * occupancy), in (fractional) workers
    tpot_feasible: bool  # False: even a batch of one misses the TPOT SLO


def _prefill_work(profile: LatencyProfile, length: float, budget: int, credit_batching: bool) -> float:
    """Worker time one prompt costs. With credit_batching, a prompt shorter than the budget is
    charged its token share of a full budget's forward when that is cheaper than running alone:
    under load the FIFO scheduler packs the queue up to the budget, so a forward's fixed cost (large
    on a GPU: 10.0 ms for 128 tokens vs 3.4 ms as a share of 8192 on llama3-8b-h100) is shared. The
    credit never turns into a charge: on a curve whose per-token cost grows with the batch we keep
    the prompt's own cost, since at the utilisations we plan for the queue is mostly short."""
    alone = profile.prefill_time(round(length))
    if credit_batching and 0 < length < budget:
        return min(alone, length / budget * profile.prefill_time(budget))
    return alone


def prefill_need(rate: float, prompt: LengthDist, profile: LatencyProfile, slo: SLO, *, token_budget: int,
                 ttft_quantile: float = 0.9, max_utilisation: float = 0.9, min_utilisation: float = 0.1,
                 credit_batching: bool = True, ttft_overhead_s: float = 0.0) -> PrefillFigures:
    """Prefill workers needed for `rate` requests/s of prompts drawn from `prompt`.

    Queue model (M/G/1, Pollaczek-Khinchine): at utilisation rho the mean wait is
    rho * R / (1 - rho), with R = E[w^2] / (2 E[w]) the mean residual work. The p-quantile prompt
    then sees TTFT ~ wait + its own forward S, so with slack = SLO - S the largest admissible
    utilisation is rho_max = slack / (slack + R), clamped to [min_utilisation, max_utilisation].
    This pairs a mean wait with a tail prompt; the wait's own tail is left to max_utilisation and
    to rounding workers up. A heavy-tailed prompt mix raises E[w], R and S at once."""
    buckets = prompt.buckets()
    works = [(p, _prefill_work(profile, length, token_budget, credit_batching)) for length, p in buckets]
    mean_work = sum(p * w for p, w in works)
    mean_sq = sum(p * w * w for p, w in works)
    residual = mean_sq / (2 * mean_work) if mean_work > 0 else 0.0
    service = profile.prefill_time(round(prompt.quantile(ttft_quantile))) + ttft_overhead_s
    slack = slo.ttft_s - service
    feasible = slack > 0
    rho = slack / (slack + residual) if feasible and residual > 0 else (max_utilisation if feasible else 0.0)
    rho_max = min(max_utilisation, max(min_utilisation, rho))
    work_per_s = rate * mean_work
    return PrefillFigures(
        mean_work_s=mean_work, residual_s=residual, service_s=service, rho_max=rho_max,
        capacity_rps=rho_max / mean_work if mean_work > 0 else math.inf, work_per_s=work_per_s,
        need=work_per_s / rho_max, ttft_feasible=feasible)


def decode_need(rate: float, prompt: LengthDist, output: LengthDist, profile: LatencyProfile, slo: SLO, *,
                kv_blocks: int, block_size: int, max_batch_size: int, occupancy: float = 0.9) -> DecodeFigures:
    """Decode workers needed for `rate` requests/s.

    Over the joint buckets (prompt and output taken as independent), a request of output O stays
    O steps, so each (P, O) pair is weighted by p * O (length bias):
      context   = sum p O (P + O/2) / E[O]   (the batch's mean context, E[P] + E[O^2] / 2E[O])
      blocks    = sum p O ceil((P + O - 1) / block_size) / E[O]   (KV reserved up front)
    c_kv = kv_blocks // blocks; c_tpot = largest b <= max_batch_size with step(b, context) <= TPOT,
    where step is the profile made monotone in the batch (LatencyProfile.batch_monotone: a measured
    grid may dip, a bigger batch never steps faster; the gateway seats requests by the same steps).
    `occupancy` is how full the c_max slots may be on average (batch and KV fill fluctuate, and a
    request that finds no KV is refused), so need = rate * E[O] * step(c_max) / (c_max * occupancy)."""
    pairs = [(lp + 0.0, lo + 0.0, pp * po) for lp, pp in prompt.buckets() for lo, po in output.buckets()]
    mean_out = sum(p * o for _, o, p in pairs)
    if mean_out > 0:
        context = sum(p * o * (lp + o / 2) for lp, o, p in pairs) / mean_out
        blocks = sum(p * o * math.ceil(max(lp + o - 1, 1) / block_size) for lp, o, p in pairs) / mean_out
    else:
        context, blocks = prompt.quantile(0.5), math.ceil(max(prompt.quantile(0.5), 1) / block_size)
    blocks = round(blocks, 9)  # float noise must not cost a seat: 18.999999999999996 is 19
    steps = profile.batch_monotone()
    c_tpot = steps.largest_batch_within(slo.tpot_s, context, max_batch_size)
    c_kv = int(kv_blocks // blocks) if blocks > 0 else max_batch_size
    c_max = min(c_tpot, c_kv, max_batch_size)
    # c_tpot never exceeds max_batch_size (scanned up to it): at that value the batch cap binds.
    limited_by = "kv" if c_kv < c_tpot else ("max_batch_size" if c_tpot == max_batch_size else "tpot")
    seats = max(c_max, 1)  # infeasible (TPOT or KV): plan one request per worker, flagged below
    step = steps.decode_step_time(seats, context)
    concurrency = rate * mean_out * step
    return DecodeFigures(
        context=context, blocks_per_request=blocks, c_tpot=c_tpot, c_kv=c_kv, c_max=c_max,
        limited_by=limited_by, step_s=step, concurrency=concurrency, need=concurrency / (seats * occupancy),
        tpot_feasible=c_tpot >= 1)


def fit_split(prefill: float, decode: float, total: int) -> tuple[int, int, str]:
    """Fit two raw needs (fractional workers) into `total` workers: (prefill, decode, how).

    One greedy rule (D'Hondt-style apportionment): start from one of each, then give each further
    worker to the role with the highest load need / count. While a role's need is unmet its load
    is > 1 and a met role's is <= 1, so the needs are met first whenever they fit; the spare then
    goes to the role with the least headroom (count / need); under a shortfall the result is the
    one that minimises the larger load, i.e. the loads are balanced. Exact ties go to the role with
    fewer workers, then to prefill. Invariants: counts >= 0, sum == total, each >= 1 if total >= 2.
    A single worker takes the role with the larger need."""
    if total < 0:
        raise ValueError(f"total_workers must be >= 0, got {total}")
    if total == 0:
        return 0, 0, "empty"
    if total == 1:
        return (1, 0, "single") if prefill >= decode else (0, 1, "single")
    p, d = 1, 1
    for _ in range(total - 2):
        lp, ld = prefill * d, decode * p  # prefill / p vs decode / d, without dividing
        if math.isclose(lp, ld, rel_tol=1e-9, abs_tol=1e-12):
            if p <= d:
                p += 1
            else:
                d += 1
        elif lp > ld:
            p += 1
        else:
            d += 1
    wanted = max(1, math.ceil(prefill - 1e-9)) + max(1, math.ceil(decode - 1e-9))
    how = "exact" if wanted == total else ("spare" if wanted < total else "shortfall")
    return p, d, how


def compute_split(forecast: LoadForecast, profile: LatencyProfile, slo: SLO, total_workers: int, *,
                  kv_blocks: int, block_size: int, max_batch_size: int, prefill_token_budget: int,
                  ttft_quantile: float = 0.9, max_utilisation: float = 0.9, min_utilisation: float = 0.1,
                  decode_occupancy: float = 0.9, credit_batching: bool = True,
                  ttft_overhead_s: float = 0.0) -> Split:
    """The split of `total_workers` for the predicted load. `detail` holds every intermediate
    figure (prefill_* and decode_* fields, raw needs, their integer ceilings, how they were fitted,
    and DOPD's own prefill:decode ratio for comparison). See the module docstring."""
    if kv_blocks < 1 or block_size < 1 or max_batch_size < 1 or prefill_token_budget < 1:
        raise ValueError("kv_blocks, block_size, max_batch_size and prefill_token_budget must be positive")
    if not (0 < min_utilisation <= max_utilisation < 1) or not (0 < decode_occupancy <= 1):
        raise ValueError("need 0 < min_utilisation <= max_utilisation < 1 and 0 < decode_occupancy <= 1")
    rate = max(forecast.rate, 0.0)
    plan_rate = rate if rate > 0 else 1.0  # needs are linear in the rate: the mix sets the ratio
    pre = prefill_need(plan_rate, forecast.prompt, profile, slo, token_budget=prefill_token_budget,
                       ttft_quantile=ttft_quantile, max_utilisation=max_utilisation,
                       min_utilisation=min_utilisation, credit_batching=credit_batching,
                       ttft_overhead_s=ttft_overhead_s)
    dec = decode_need(plan_rate, forecast.prompt, forecast.output, profile, slo, kv_blocks=kv_blocks,
                      block_size=block_size, max_batch_size=max_batch_size, occupancy=decode_occupancy)
    # Round away float noise so that a need of exactly 2 does not become 2.0000000001 -> 3.
    need_p, need_d = round(pre.need, 9), round(dec.need, 9)
    p, d, how = fit_split(need_p, need_d, total_workers)

    detail: dict = {"rate": rate, "planned_at_rate": plan_rate, "total_workers": total_workers}
    detail.update({f"prefill_{k}": v for k, v in asdict(pre).items()})
    detail.update({f"decode_{k}": v for k, v in asdict(dec).items()})
    detail.update(prefill_need_workers=max(1, math.ceil(need_p - 1e-9)),
                  decode_need_workers=max(1, math.ceil(need_d - 1e-9)), fit=how)
    # DOPD's rule with means, for comparison: prefill instances per decode instance.
    if dec.c_max >= 1 and forecast.output.mean > 0:
        ttft_mean = profile.prefill_time(round(forecast.prompt.mean))
        tpot = profile.decode_step_time(dec.c_max, forecast.prompt.mean + forecast.output.mean / 2)
        detail["dopd_ratio"] = dec.c_max * ttft_mean / (forecast.output.mean * tpot)
    return Split(prefill=p, decode=d, detail=detail)
