"""How far any scheduler could go on a workload (pure): bounds that no serving mode can beat on a
latency profile, and so whether a goal against a baseline can be reached at all in that run.

    TTFT floor   a request's first token needs its prompt prefilled. On the profile the cheapest
                 way to prefill n tokens is `cheapest_prefill_s(n)`: one forward of n tokens, or
                 n split into chunks each a forward of its own (the profile's cost is not
                 subadditive everywhere: two forwards of 4,096 cost less than one of 8,192), with
                 nothing else in the forward, no queue, no KV move. Batching others in, queueing,
                 a mixed step's decodes: each only adds (profile.prefill_time grows with the
                 tokens, and a mixed step costs prefill_time(chunk + decodes) or more)
    TPOT floor   every token after the first takes a forward. The cheapest forward the profile has
                 (a decode of one request at the shortest context, or a mixed step's smallest
                 prefill: `cheapest_forward_s`) is a floor for every request's TPOT. A weak bound:
                 it ignores that others share the step
    goodput      requests a second that met both SLOs: at most every request of the schedule, over
                 the earliest a run can end, the last request's send time

A percentile over the requests a run completed (TTFT, TPOT) can be lowered by completing fewer: a
run that meets the SLOs for a share `a` of the requests completes at least that share, so its
p90 is at least `lowest_percentile` of the floors over the cheapest ceil(a * N) of them. That is
the floor a goal of attainment >= a may be judged against.

Every bound holds for the simulator (services/simulate) and the sim engine (common/modeling/
sim_runner.py), which cost forwards by the same profile; a real model's latency is bounded only
as far as its profile is measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from common.profile import LatencyProfile


def cheapest_prefill_s(profile: LatencyProfile, longest: int) -> np.ndarray:
    """cost[n] for n = 0..longest: the fewest seconds the profile can prefill n tokens in, as one
    forward or as chunks each run alone (cost[0] = 0). Exact: cost[n] = min(prefill_time(n),
    min over 0 < c < n of prefill_time(c) + cost[n - c])."""
    if longest < 0:
        raise ValueError(f"longest must be >= 0, got {longest}")
    alone = np.array([0.0] + [profile.prefill_time(n) for n in range(1, longest + 1)])
    if np.any(np.diff(alone[1:]) < 0):  # the premise of the bound: a forward's batch-mates only add
        raise ValueError(f"profile {profile.name}: prefill time falls with more tokens somewhere up to {longest}")
    cost = alone.copy()
    for n in range(2, longest + 1):
        # a last chunk of c tokens (1..n-1) after the cheapest prefill of the n - c before it
        cost[n] = min(alone[n], float(np.min(alone[1:n] + cost[n - 1:0:-1])))
    return cost


def cheapest_forward_s(profile: LatencyProfile) -> float:
    """The profile's cheapest forward that makes a token for a request already prefilled: a
    decode step of one request, or a mixed step's least prefill (one token of prompt besides the
    one decode). No step of any batch costs less: the batch-monotone profile's steps grow with the
    batch, and for one batch size they are piecewise linear in the context, so least at a knot or
    at the shortest context (one token)."""
    steps = profile.batch_monotone()
    decode = min(steps.decode_step_time(1, x) for x in (1.0, *profile.decode_context))
    return min(decode, profile.mixed_step_time(1, 1.0, 1))


def lowest_percentile(values: Sequence[float], q: float, keep: int) -> float:
    """The lowest `q`-th percentile (numpy's linear interpolation) that any `keep` or more of
    `values` can have: that of the `keep` smallest (a larger subset, or other members, only raise
    every order statistic)."""
    if not 0 < keep <= len(values):
        raise ValueError(f"keep must be in 1..{len(values)}, got {keep}")
    return float(np.percentile(np.sort(np.asarray(values, dtype=float))[:keep], q))


def reach(prompt_tokens: Sequence[int], last_send_s: float, profile: LatencyProfile, baseline: dict,
          goals: dict, q: float = 90.0) -> dict:
    """Whether each goal against `baseline` (a mode's figures: goodput, p90_ttft_ms, p90_tpot_ms)
    can be met by any scheduler serving these requests at attainment >= goals["attainment"]:
    per figure, what the goal asks, the bound, and `reachable` (False: no scheduler can).
    `prompt_tokens`: every request of the schedule; `last_send_s`: its last arrival."""
    n = len(prompt_tokens)
    if n == 0 or min(prompt_tokens) < 1:
        raise ValueError("every request needs its prompt length (>= 1 token)")
    keep = math.ceil(goals["attainment"] * n)
    cost = cheapest_prefill_s(profile, max(prompt_tokens))
    ttft_floor_ms = lowest_percentile(cost[np.asarray(prompt_tokens)], q, keep) * 1e3
    tpot_floor_ms = cheapest_forward_s(profile) * 1e3
    goodput_ceiling = n / last_send_s if last_send_s > 0 else math.inf
    out: dict[str, dict] = {}

    def judge(name: str, asks: float | None, bound: float, reachable) -> None:
        out[name] = {"asks": asks, "bound": bound, "reachable": None if asks is None else bool(reachable(asks, bound))}

    base_goodput = baseline.get("goodput")
    judge("goodput", None if base_goodput is None else goals["goodput_ratio"] * base_goodput, goodput_ceiling,
          lambda asks, bound: asks <= bound)
    for name, floor in (("p90_ttft_ms", ttft_floor_ms), ("p90_tpot_ms", tpot_floor_ms)):
        base = baseline.get(name)
        change = goals[name.replace("_ms", "_change")]
        judge(name, None if base is None else (1 + change) * base, floor, lambda asks, bound: asks >= bound)
    return {"requests": n, "keep": keep, "figures": out}
