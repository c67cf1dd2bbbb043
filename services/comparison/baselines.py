"""The baselines of `dopd bench compare` beyond the serving modes themselves: the fixed designs as
their users run them, and at their best in hindsight. Pure: names, budgets and the prefix a
placement chosen in advance is fitted on.

    aggregated       vLLM-style chunked-prefill aggregation at vLLM's chunk budget (2048 tokens
                     a step), or at --chunk-tokens when given
    aggregated-best  the same at the best of AGGREGATED_BUDGETS, in hindsight
    static           every split run, the best in hindsight (services/comparison/compare.py)
    static-apriori   the split DistServe's placement would deploy: the simulator's best split on
                     what is known in advance (a trace's first APRIORI_TRACE_S, at most its first
                     fifth, or a workload's first phase), then kept for the whole run

`aggregated-best` and `static-apriori` are variants: each runs its base serving mode
(common/modes.py); the comparison keeps which budget or split it chose and why.
"""

from __future__ import annotations

VARIANTS = {"aggregated-best": "aggregated", "static-apriori": "static"}
AGGREGATED_BUDGETS = (512, 2048, 8192)
VLLM_CHUNK_BUDGET = 2048  # vLLM's max_num_batched_tokens default with chunked prefill
APRIORI_TRACE_S = 600.0  # a trace's first 10 minutes
STEADY_FIRST_PHASE = 0.2  # a workload without phases: its first fifth, as long as phase-shift's first phase
# The fixed designs the best is taken over in hindsight (dopd must never fall below it).
FIXED_IN_HINDSIGHT = ("static", "aggregated", "aggregated-best")
BASELINES = FIXED_IN_HINDSIGHT
# DOPD's goals against the better baseline (the issue's, after the DOPD paper's figures).
GOALS = {"goodput_ratio": 1.5, "p90_ttft_change": -0.5, "p90_tpot_change": -0.2, "attainment": 0.99}
# The peers as their users run them (the headline is judged against these).
PEERS = ("aggregated", "static-apriori")


def base_mode(name: str) -> str:
    """The serving mode a compare mode runs (itself, for a serving mode)."""
    return VARIANTS.get(name, name)


def apriori_until(workload: str | None, duration: float | None, trace_span_s: float | None = None) -> float:
    """Seconds of the run that a placement chosen in advance is fitted on: a trace's first
    APRIORI_TRACE_S, or its first STEADY_FIRST_PHASE where that is shorter (a 10-minute cut would
    otherwise be known whole in advance); a workload's first phase (phase-shift's quiet chat; a
    steady workload's first STEADY_FIRST_PHASE of `duration`)."""
    if workload is None:
        span = trace_span_s if trace_span_s is not None else float("inf")
        return min(APRIORI_TRACE_S, STEADY_FIRST_PHASE * span)
    from services.bench.sources import DEFAULT_DURATION
    from services.bench.workloads import PHASE_SHIFT

    length = duration if duration is not None else DEFAULT_DURATION
    first = PHASE_SHIFT[0].end if workload == "phase-shift" else STEADY_FIRST_PHASE
    return first * length
