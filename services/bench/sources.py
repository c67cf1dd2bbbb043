"""Where a run's requests come from, and how a run is summed up on the terminal: the one home of
both for `dopd bench`, `dopd simulate`, `dopd reach` and `dopd bench compare`.

    build_requests(args, rate)  a seeded workload (services/bench/workloads.py), or trace files
                                merged onto one clock (services/bench/trace.py), rescaled to `rate`
                                and cut as the arguments say; with the schedule's duration
    max_context_of(args)        the run's context limit
    print_summary(results, out) the lines both commands print at the end of a run
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_RATE = 1.0
DEFAULT_DURATION = 60.0
DEFAULT_MAX_CONTEXT = 2048  # workloads only: a trace is cut only to a --max-context given


def max_context_of(args) -> int | None:
    """The run's context limit: --max-context, else the workloads' default; None: a trace as it is."""
    if args.max_context is not None:
        return args.max_context
    return DEFAULT_MAX_CONTEXT if args.workload else None


def build_requests(args, rate: float | None):
    """The run's requests and its schedule's duration: a seeded workload, or the trace files
    merged onto one clock (rescaled to `rate` when given, cut at --duration)."""
    from services.bench.trace import clamp_trace, read_traces, scale_to_rate
    from services.bench.workloads import generate

    until = getattr(args, "until", None)  # `dopd simulate --until`: a prefix of the whole run's schedule
    if args.workload:
        duration = args.duration if args.duration is not None else DEFAULT_DURATION
        reqs = generate(args.workload, rate=rate or DEFAULT_RATE, duration=duration, seed=args.seed,
                        burstiness=args.burstiness, max_context=max_context_of(args))
        if until is not None:
            reqs, duration = [r for r in reqs if r.t < until], min(duration, until)
        return reqs, duration
    reqs = read_traces(args.trace)
    if (limit := max_context_of(args)) is not None:
        reqs = clamp_trace(reqs, limit)
    if rate is not None:
        reqs = scale_to_rate(reqs, rate)
    cut = min((c for c in (args.duration, until) if c is not None), default=None)
    if cut is not None:
        reqs = [r for r in reqs if r.t < cut]
    duration = cut if cut is not None else max((r.t for r in reqs), default=0.0)
    return reqs, duration


def fmt(v) -> str:
    """A figure as the summary prints it: - for none, one decimal for a float."""
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def print_summary(r: dict, out_dir: Path) -> None:
    h = r["harness"]
    print(f"{r['completed']}/{r['requests']} completed, {r['failed']} failed {r['errors'] or ''} "
          f"in {r['duration_s']:.1f} s -> {out_dir}")
    for m in ("ttft", "tpot", "itl", "e2el"):
        print(f"  {m.upper():5} ms  mean {fmt(r[f'mean_{m}_ms'])}  median {fmt(r[f'median_{m}_ms'])}  "
              f"p90 {fmt(r[f'p90_{m}_ms'])}  p99 {fmt(r[f'p99_{m}_ms'])}")
    print(f"  stalls ms  each request's p99 gap: median {fmt(r['median_request_p99_itl_ms'])}  "
          f"p99 {fmt(r['p99_request_p99_itl_ms'])}  longest gap {fmt(r['max_itl_ms'])}")
    attainment = "-" if r["slo_attainment"] is None else f"{r['slo_attainment']:.4f}"
    print(f"  SLO attainment {attainment}  goodput {r['goodput']:.2f} req/s  "
          f"throughput {r['request_throughput']:.2f} req/s, {r['output_throughput']:.1f} tok/s")
    if h["saturated"]:
        print(f"  warning: the harness may be the limit: {'; '.join(h['saturation_reasons'])}", file=sys.stderr)
