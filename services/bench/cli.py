"""`dopd bench`: run a workload or a trace open loop against a gateway and write DIR/results.json
(metrics, config, harness ceiling, timeline), DIR/requests.jsonl (one line per request) and
DIR/*.png; `dopd bench sweep` runs it at several rates for DistServe's goodput.

    dopd bench --target ADDR (--workload NAME | --trace FILE...) [--rate R] [--burstiness B]
               [--duration S] [--seed N] --slo-ttft MS --slo-tpot MS --out DIR
               [--time-scale F] [--max-context N] [--request-timeout S]
    dopd bench sweep ... (--rates R1,R2,... | --min-rate R [--max-rate R]) [--max-runs N]
    dopd bench compare --modes aggregated,static,dopd [--engine des|sim --profile NAME | --model M]
               --workers N ... (services/comparison/compare.py: each mode's cluster brought up, run
               and taken down in turn; the best static split searched)

Traces: JSONL (services/bench/trace.py) or Azure CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`);
several are merged onto one clock (`read_traces`), as `dopd simulate` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from services.bench import sources
from services.bench.api import BenchSpec, TargetError, bench_once, bench_run, config_doc, served
from services.bench.metrics import SLO_ITL_HELP
from services.bench.sources import DEFAULT_DURATION, DEFAULT_MAX_CONTEXT, DEFAULT_RATE, fmt, source_of


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be numbers > 0, got {text!r}")
    return rates


def add_bench_parser(subparsers, compare=None) -> argparse.ArgumentParser:
    """Add `bench` (and its `sweep` mode) to a `dopd` subparsers object; it runs `run_bench`.
    `compare`: (add its arguments, run it) for the `compare` mode, from the tool above this one
    (services/comparison, which services/cli.py hands in: the harness imports nothing of it)."""
    from services.bench.workloads import WORKLOADS

    p = subparsers.add_parser("bench", help="benchmark a cluster: latency percentiles, SLO attainment, goodput",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=("run", "sweep", "compare"), default="run",
                   help="run once (default), sweep rates for the highest that meets the SLOs, or compare "
                        "serving modes (each mode's cluster brought up by the command)")
    p.add_argument("--target", help="the gateway's gRPC address host:port (run, sweep; with --backend openai "
                                    "optional: it adds the cluster's status samples)")
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="send requests through the gRPC API (default) or the OpenAI-compatible HTTP API")
    p.add_argument("--base-url", help="openai: the API's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("DOPD_API_KEY", ""),
                   help="the gateway's API key, sent as 'authorization: Bearer KEY' on either backend "
                        "(default $DOPD_API_KEY)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", choices=sorted(WORKLOADS), help="a built-in seeded workload")
    source.add_argument("--trace", type=Path, nargs="+",
                        help="JSONL or Azure CSV trace(s), merged onto one clock")
    p.add_argument("--rate", type=float, help=f"requests/s (workloads: default {DEFAULT_RATE}; traces: rescale "
                                              "the trace's times to this mean rate)")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape: 1 = Poisson, < 1 burstier")
    p.add_argument("--duration", type=float, help=f"seconds of arrivals (workloads: default {DEFAULT_DURATION}; "
                                                  "traces: drop requests from this time on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, required=True, metavar="MS", help="TTFT SLO in ms")
    p.add_argument("--slo-tpot", type=float, required=True, metavar="MS", help="TPOT SLO in ms")
    p.add_argument("--slo-itl", type=float, metavar="MS", help=SLO_ITL_HELP)
    p.add_argument("--out", type=Path, required=True, help="directory for results.json and the plots")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="send at t x F wall seconds; latencies are divided by F (results in profile time)")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"prompt + output tokens at most, the prompt cut first (workloads: default "
                        f"{DEFAULT_MAX_CONTEXT}; traces: as they are unless given)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds (profile time) per request")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--rates", type=_rates, help="comma-separated rates to run, e.g. 0.5,1,2,4")
    sweep.add_argument("--min-rate", type=float, help="doubling search from this rate, then bisection")
    sweep.add_argument("--max-rate", type=float, help="the search's ceiling")
    sweep.add_argument("--max-runs", type=int, default=8, help="runs at most")
    sweep.add_argument("--attainment-target", type=float, default=0.9,
                       help="fraction of requests meeting both SLOs (DistServe: 0.9)")
    if compare is not None:
        add_arguments, run = compare
        add_arguments(p)
        p.set_defaults(compare_run=run)
    p.set_defaults(func=run_bench)
    return p


def bench_spec(args) -> BenchSpec:
    """The run `dopd bench`'s arguments describe (a sweep replaces its rate and out per run)."""
    return BenchSpec(source=source_of(args), slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot, out=args.out,
                     slo_itl_ms=args.slo_itl, target=args.target, backend=args.backend, base_url=args.base_url,
                     api_key=args.api_key, time_scale=args.time_scale, request_timeout_s=args.request_timeout,
                     progress=not args.no_progress)


def at_rate(spec: BenchSpec, rate: float | None, out: Path | None = None) -> BenchSpec:
    """The run at `rate` (a sweep's, under `out`)."""
    return replace(spec, source=replace(spec.source, rate=rate), out=out or spec.out)


def build_requests(args, rate: float | None):
    """The requests (and the schedule's duration) the arguments describe, at `rate`."""
    return sources.build_requests(replace(source_of(args), rate=rate))


def run_config(args, rate: float | None, model: str, duration: float, requests: int) -> dict:
    """results.json's `config` for the arguments at `rate` (services/bench/api.config_doc)."""
    return config_doc(at_rate(bench_spec(args), rate), model, duration, requests)


def run_bench(args) -> int:
    """`dopd bench` and `dopd bench sweep`. 0 when the run(s) finished and some request completed;
    1 when the gateway does not answer or no request completed; 2 on bad arguments."""
    from services.bench.sweep import RateSearch, run_sweep

    if args.mode == "compare":
        if getattr(args, "compare_run", None) is None:
            print("error: `bench compare` runs from the dopd command (services/cli.py)", file=sys.stderr)
            return 2
        return args.compare_run(args)
    if args.backend == "openai" and not args.base_url:
        print("error: --backend openai needs --base-url", file=sys.stderr)
        return 2
    if args.target is None and args.backend == "grpc":
        print(f"error: `bench {args.mode}` needs --target", file=sys.stderr)
        return 2
    if args.mode == "run" and (args.rates or args.min_rate or args.max_rate):
        print("error: --rates/--min-rate/--max-rate are for `bench sweep`", file=sys.stderr)
        return 2
    if args.mode == "sweep" and (args.rates is None) == (args.min_rate is None):
        print("error: `bench sweep` takes one of --rates and --min-rate", file=sys.stderr)
        return 2
    spec = bench_spec(args)
    if args.mode == "run":
        return bench_once(spec)[0]
    try:
        model, kv = served(spec)  # once for the whole sweep
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    spec = replace(spec, model=model, kv=kv)
    try:
        search = RateSearch(rates=args.rates, min_rate=args.min_rate, max_rate=args.max_rate,
                            target=args.attainment_target, max_runs=args.max_runs)
        result = run_sweep(search, lambda rate: bench_run(at_rate(spec, rate, args.out / f"rate-{rate:g}")),
                           args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"goodput (highest rate with >= {args.attainment_target:.0%} of requests meeting both SLOs): "
          f"{fmt(result['goodput_rate'])} req/s -> {args.out / 'sweep.json'}")
    return 0
