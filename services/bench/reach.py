"""How far any scheduler could go on a workload (pure): bounds that no serving mode can beat on a
latency profile, and so whether a goal against a baseline can be reached at all in that run.

    TTFT floor   a request's first token needs its prompt prefilled, in one forward or in chunks
                 that run one after another. A forward that holds c of its tokens holds at most
                 `Limits.max_forward_tokens` in all and costs at least prefill_time(m) for the m
                 tokens it holds (a mixed step adds its decodes' attention on top), so at least
                 the least prefill_time over [c, max_forward_tokens]. `cheapest_prefill_s(n)` is
                 the least such sum over every split of n: no queue, no KV move, batch-mates at
                 their cheapest. No premise on the profile's shape: on llama3-8b-h100 two forwards
                 of 4,096 cost less than one of 8,192, and the split finds it
    TPOT floor   every token after the first takes a forward of its worker: a decode step of at
                 most `Limits.max_batch` requests at a mean context in [1, max_context], or a
                 mixed step (prefill_time of at least 2 tokens, plus attention >= 0).
                 `cheapest_forward_s` is the least of them over that whole domain (a step's time
                 is piecewise linear in the context, so least at a knot or an end). A weak bound,
                 and one for the simulator only: on the real services TPOT is timed at the client,
                 where tokens that queued behind a slow reader arrive together, so a request's
                 measured TPOT can fall under it
    goodput      requests a second that met both SLOs in the run: at most every request of the
                 schedule, over the earliest a run can end, the last request's send time. Not
                 DistServe's rate goodput (the highest rate kept within the SLOs), which this
                 does not bound

A percentile over the requests a run completed (TTFT, TPOT) can be lowered by completing fewer: a
run that meets the SLOs for a share `a` of the requests completes at least that share, so its
p90 is at least `lowest_percentile` of the floors over the cheapest ceil(a * N) of them. That is
the floor a goal of attainment >= a may be judged against: a run that refuses more could go lower.

The simulator (services/simulate) and the sim engine (common/modeling/sim_runner.py) cost every
forward by the profile, so the bounds hold for them (TPOT: the simulator); a real model's latency
is bounded only as far as its profile is measured, and is not bounded here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.profile import LatencyProfile


@dataclass(frozen=True)
class Limits:
    """What one forward of the run can hold (the cluster's settings, or more: a larger limit only
    lowers the bounds)."""

    max_batch: int  # requests a decode step carries at most
    max_forward_tokens: int  # tokens a forward holds at most: a prefill batch, or a step's chunk and decodes
    max_context: int  # tokens a request's context reaches at most

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_forward_tokens, self.max_context) < 1:
            raise ValueError(f"every limit must be >= 1: {self}")


def least_forward_holding(profile: LatencyProfile, limits: Limits) -> np.ndarray:
    """least[c] for c = 0..max_forward_tokens: the fewest seconds a forward that holds at least c
    tokens can take (the least prefill_time over [max(c, 1), max_forward_tokens])."""
    top = limits.max_forward_tokens
    times = np.array([profile.prefill_time(m) for m in range(1, top + 1)])
    least = np.minimum.accumulate(times[::-1])[::-1]
    return np.concatenate(([least[0]], least))


def cheapest_prefill_s(profile: LatencyProfile, longest: int, limits: Limits) -> np.ndarray:
    """cost[n] for n = 0..longest: the fewest seconds any schedule can prefill a prompt of n
    tokens in (cost[0] = 0): cost[n] = min over a last chunk of c tokens (1..n) of
    least_forward_holding(c) + cost[n - c]."""
    if not 0 <= longest <= limits.max_forward_tokens:
        raise ValueError(f"longest must be in 0..{limits.max_forward_tokens} (a prompt runs in one forward at "
                         f"most), got {longest}")
    least = least_forward_holding(profile, limits)
    cost = np.zeros(longest + 1)
    for n in range(1, longest + 1):
        # a last chunk of c = n, n-1, ..., 1 tokens after the cheapest prefill of the n - c before it
        cost[n] = float(np.min(least[n:0:-1] + cost[:n]))
    return cost


def cheapest_forward_s(profile: LatencyProfile, limits: Limits) -> float:
    """The fewest seconds any forward that makes a request's next token can take: a decode step
    of 1..max_batch requests at a mean context in [1, max_context] (for one batch size the step is
    piecewise linear in the context: least at a knot or an end), or a mixed step, which costs
    prefill_time of its chunk and decodes (2 tokens or more) plus attention >= 0."""
    contexts = sorted({1.0, float(limits.max_context), *(float(x) for x in profile.decode_context
                                                         if 1 <= x <= limits.max_context)})
    decode = min(profile.decode_step_time(b, x) for b in range(1, limits.max_batch + 1) for x in contexts)
    mixed = float(least_forward_holding(profile, limits)[2]) if limits.max_forward_tokens >= 2 else math.inf
    return min(decode, mixed)


def lowest_percentile(values: Sequence[float], q: float, keep: int) -> float:
    """The lowest `q`-th percentile (numpy's linear interpolation) that any `keep` or more of
    `values` can have: that of the `keep` smallest (a larger subset, or other members, only raise
    every order statistic)."""
    if not 0 < keep <= len(values):
        raise ValueError(f"keep must be in 1..{len(values)}, got {keep}")
    return float(np.percentile(np.sort(np.asarray(values, dtype=float))[:keep], q))


def reach(prompt_tokens: Sequence[int], last_send_s: float, profile: LatencyProfile, limits: Limits,
          baseline: dict, goals: dict, q: float = 90.0, tpot: bool = True) -> dict:
    """Whether each goal against `baseline` (a mode's figures: goodput, p90_ttft_ms, p90_tpot_ms)
    can be met by any scheduler serving these requests at attainment >= goals["attainment"]:
    per figure, what the goal asks, the bound, and `reachable` (False: no scheduler can; None: no
    bound, or nothing asked). `prompt_tokens`: every request of the schedule; `last_send_s`: its
    last arrival; `tpot`: whether the TPOT floor holds for the engine (the simulator only)."""
    n = len(prompt_tokens)
    if n == 0 or min(prompt_tokens) < 1:
        raise ValueError("every request needs its prompt length (>= 1 token)")
    keep = math.ceil(goals["attainment"] * n)
    cost = cheapest_prefill_s(profile, max(prompt_tokens), limits)
    ttft_floor_ms = lowest_percentile(cost[np.asarray(prompt_tokens)], q, keep) * 1e3
    tpot_floor_ms = cheapest_forward_s(profile, limits) * 1e3 if tpot else None
    goodput_ceiling = n / last_send_s if last_send_s > 0 else math.inf
    out: dict[str, dict] = {}

    def judge(name: str, asks: float | None, bound: float | None, reachable) -> None:
        verdict = None if asks is None or bound is None else bool(reachable(asks, bound))
        out[name] = {"asks": asks, "bound": bound, "reachable": verdict}

    base_goodput = baseline.get("goodput")
    judge("goodput", None if base_goodput is None else goals["goodput_ratio"] * base_goodput, goodput_ceiling,
          lambda asks, bound: asks <= bound)
    for name, floor in (("p90_ttft_ms", ttft_floor_ms), ("p90_tpot_ms", tpot_floor_ms)):
        base = baseline.get(name)
        change = goals[name.replace("_ms", "_change")]
        judge(name, None if base is None else (1 + change) * base, floor, lambda asks, bound: asks >= bound)
    return {"requests": n, "keep": keep, "figures": out}
