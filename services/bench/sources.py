"""Where a run's requests come from, and how a run is summed up on the terminal: the one home of
both for `dopd bench`, `dopd simulate`, `dopd reach` and `dopd bench compare`.

    RequestSource               a seeded workload or trace files, at a rate, cut as asked: what
                                the commands take alike (`source_of(args)` from their arguments)
    build_requests(source)      a seeded workload (services/bench/workloads.py), or trace files
                                merged onto one clock (services/bench/trace.py), rescaled to the
                                source's rate and cut as it says; with the schedule's duration
    max_context_of(source)      the run's context limit
    print_summary(results, out) the lines both commands print at the end of a run
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RATE = 1.0
DEFAULT_DURATION = 60.0
DEFAULT_MAX_CONTEXT = 2048  # workloads only: a trace is cut only to a --max-context given


@dataclass(frozen=True)
class RequestSource:
    """A run's requests: a built-in workload (`workload`) or trace files merged onto one clock
    (`trace`), one of the two. `rate`: requests/s (workloads: default DEFAULT_RATE; traces:
    rescaled to it when given); `duration`: seconds of arrivals (workloads: default
    DEFAULT_DURATION; traces: cut there); `until`: serve only what is sent before it, the schedule
    kept as for the whole duration (`dopd simulate --until`)."""

    workload: str | None = None
    trace: tuple[Path, ...] | None = None
    rate: float | None = None
    duration: float | None = None
    burstiness: float = 1.0  # Gamma shape: 1 = Poisson, < 1 burstier
    seed: int = 0
    max_context: int | None = None  # None: the workloads' default; a trace as it is
    until: float | None = None

    def __post_init__(self) -> None:
        if (self.workload is None) == (not self.trace):
            raise ValueError("a request source is a workload or trace files, one of the two")


def source_of(args) -> RequestSource:
    """The source the arguments of `dopd bench`, `dopd simulate` or `dopd bench compare` name,
    the numbers as their parsers take them (a caller may have set an int where they parse a float)."""
    def num(kind, value):
        return None if value is None else kind(value)

    return RequestSource(workload=args.workload, trace=tuple(Path(t) for t in args.trace) if args.trace else None,
                         rate=num(float, args.rate), duration=num(float, args.duration),
                         burstiness=float(args.burstiness), seed=int(args.seed),
                         max_context=num(int, args.max_context), until=num(float, getattr(args, "until", None)))


def max_context_of(source: RequestSource) -> int | None:
    """The run's context limit: the source's, else the workloads' default; None: a trace as it is."""
    if source.max_context is not None:
        return source.max_context
    return DEFAULT_MAX_CONTEXT if source.workload else None


def build_requests(source: RequestSource):
    """The run's requests and its schedule's duration: a seeded workload, or the trace files
    merged onto one clock (rescaled to the source's rate when given, cut at its duration)."""
    from services.bench.trace import clamp_trace, read_traces, scale_to_rate
    from services.bench.workloads import generate

    until, rate = source.until, source.rate  # until: a prefix of the whole run's schedule
    if source.workload:
        duration = source.duration if source.duration is not None else DEFAULT_DURATION
        reqs = generate(source.workload, rate=rate or DEFAULT_RATE, duration=duration, seed=source.seed,
                        burstiness=source.burstiness, max_context=max_context_of(source))
        if until is not None:
            reqs, duration = [r for r in reqs if r.t < until], min(duration, until)
        return reqs, duration
    reqs = read_traces(source.trace)
    if (limit := max_context_of(source)) is not None:
        reqs = clamp_trace(reqs, limit)
    if rate is not None:
        reqs = scale_to_rate(reqs, rate)
    cut = min((c for c in (source.duration, until) if c is not None), default=None)
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
