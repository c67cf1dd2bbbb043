"""How well, and how fast, the planner's predictors forecast the next interval of a workload.

Histories come from the project's own workloads (services.bench.workloads): requests binned into
intervals of 1 s and 5 s (IntervalLoad: arrivals, prompt and output lengths). Walk forward: at
each interval k (after a warm-up of 10 intervals) every predictor forecasts interval k from the
intervals before it (the last 300, as the planner core passes them), and the forecast is compared
with what came.

    rate MAE        mean |predicted - actual| of the arrival rate, req/s, over every interval
    rate MAPE       mean |predicted - actual| / actual of the arrival rate, over intervals whose
                    actual rate is > 0 (an interval with no arrivals is skipped: its APE is
                    undefined; how many were skipped is printed). MAPE rewards forecasting low:
                    under bursty arrivals most intervals fall below the mean rate.
    p50/p90 MAPE    the same for the prompt-length median and p90 (and the output-length median),
                    over intervals with arrivals, against that interval's own quantiles
                    (LengthDist.from_samples). One interval can dominate a MAPE: on phase-shift,
                    the first interval of short chat after the long-prompt burst is forecast
                    ~300x too long by every predictor (~250 points of MAPE at 5 s), hence
                    also the median APE of the prompt p50
    predict ms      median and p99 wall time of one predict() call on the growing history, and
                    the CPU time of this process (the machine may be shared: wall - CPU is waiting)
    + split ms      the same including services.planner.split.compute_split(forecast), when that
                    module exists and can be called with a forecast alone

A reference row, "oracle", predicts every interval from the workload's definition: the true
arrival rate of its phase, and the length quantiles pooled over all the requests of its phase. It
is what a perfect model of the process scores against the noisy per-interval actuals: the floor
under every predictor's error (at 8 arrivals an interval, sampling noise alone is ~50% rate MAPE).

A second table times predict() alone on fixed 50- and 300-interval histories (distinct histories
each call, so no memoised fit is reused).

NOTE: BLAS runs one thread here (OPENBLAS_NUM_THREADS=1 etc., set before numpy loads unless the
caller set them): statsmodels makes thousands of tiny BLAS calls per fit, and OpenBLAS's threads
turn each into a wait for a busy core on a shared 2-core machine.

Traces (`--trace FILE...`: JSONL or Azure CSV, merged onto one clock by services.bench.trace.
read_traces, rescaled to `--rate` when given, else at their own rate; `--duration` cuts them) are
scored the same way, with no oracle row (a trace has no generating process to know), and "+ split"
sized as benchmarks/bench_des_azure_hour.py's cluster (16 workers, SLO 1 s / 50 ms, 16384 KV blocks
of 16, batch <= 256, prefill budget 8192). The timing table then uses the trace's own 1 s intervals
when it has enough of them.

    python benchmarks/bench_predictors.py [--quick] [--rate 8] [--duration 600] [--burstiness 0.5]
    python benchmarks/bench_predictors.py --trace FILE... [--rate R] [--duration S] [--intervals 1,5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common.load import SLO, IntervalLoad, LengthDist, LoadForecast  # noqa: E402
from services.bench.trace import read_traces, scale_to_rate  # noqa: E402
from services.bench.workloads import BenchRequest, generate, phase_rates  # noqa: E402
from services.planner.core import PREDICT_WINDOW  # noqa: E402
from services.planner.predictors import make_predictor, predictor_names  # noqa: E402

WARMUP = 10
ORDER = ["constant", "ewma", "holt-winters", "arima"]
# (row label, predictor options) of each row; main() adds "arima refit K" rows for --arima-refit.
LINEUP: list[tuple[str, str, dict]] = [(n, n, {}) for n in ORDER]


def lineup() -> list[tuple[str, object]]:
    """(label, a fresh predictor) for each row, in order."""
    return [(label, make_predictor(name, **options)) for label, name, options in LINEUP if name in predictor_names()]


def bin_requests(requests: Sequence[BenchRequest], duration: float, width: float) -> list[IntervalLoad]:
    n = int(duration // width)
    prompts: list[list[int]] = [[] for _ in range(n)]
    outputs: list[list[int]] = [[] for _ in range(n)]
    for r in requests:
        i = int(r.t // width)
        if i < n:
            prompts[i].append(int(r.prompt_tokens))
            outputs[i].append(int(r.output_tokens))
    return [IntervalLoad(start=i * width, duration=width, arrivals=len(p), prompt_lens=tuple(p),
                         output_lens=tuple(o)) for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))]


class Oracle:
    """Knows the workload: each interval's true rate and its phase's pooled length quantiles."""

    name = "oracle"

    def __init__(self, workload: str, requests: Sequence[BenchRequest], loads: Sequence[IntervalLoad],
                 rate: float, duration: float, burstiness: float) -> None:
        from services.bench.arrivals import RatePhase
        phases = (phase_rates(rate, duration, burstiness) if workload == "phase-shift"
                  else [RatePhase(0.0, duration, rate, burstiness)])
        by_phase = {}
        for ph in phases:
            inside = [r for r in requests if ph.start <= r.t < ph.end]
            by_phase[ph] = LoadForecast(ph.rate, LengthDist.from_samples([r.prompt_tokens for r in inside]),
                                        LengthDist.from_samples([r.output_tokens for r in inside]), "oracle")
        mid = [x.start + x.duration / 2 for x in loads]
        self.forecasts = [next(f for ph, f in by_phase.items() if ph.start <= t < ph.end) for t in mid]

    def predict(self, history: Sequence[IntervalLoad], horizon: int = 1) -> LoadForecast:
        return self.forecasts[len(history) + horizon - 1]


# The clusters "+ split" is sized for: the workloads' (as before traces came) and the Azure hour's
# (benchmarks/bench_des_azure_hour.py).
WORKLOAD_CLUSTER = {"total_workers": 8, "slo": (2.0, 0.2), "kv_blocks": 4096, "max_batch_size": 64,
                    "prefill_token_budget": 512}
TRACE_CLUSTER = {"total_workers": 16, "slo": (1.0, 0.05), "kv_blocks": 16384, "max_batch_size": 256,
                 "prefill_token_budget": 8192}


def split_fn(total_workers: int = 8, slo: tuple[float, float] = (2.0, 0.2), kv_blocks: int = 4096,
             max_batch_size: int = 64, prefill_token_budget: int = 512
             ) -> tuple[Callable[[LoadForecast], object] | None, str]:
    """compute_split as a function of the forecast alone, or None and why not."""
    try:
        from common.profile import load_profile
        from services.planner.split import compute_split
    except ImportError as e:
        return None, f"no compute_split ({e}): the '+ split' columns are left out"
    profile, target = load_profile("llama3-8b-h100"), SLO(ttft_s=slo[0], tpot_s=slo[1])

    def split(forecast: LoadForecast) -> object:
        return compute_split(forecast, profile, target, total_workers, kv_blocks=kv_blocks, block_size=16,
                             max_batch_size=max_batch_size, prefill_token_budget=prefill_token_budget)
    return split, (f"+ split: compute_split(forecast, llama3-8b-h100, SLO {slo[0]:g} s / {slo[1] * 1e3:g} ms, "
                   f"{total_workers} workers, {kv_blocks} KV blocks of 16, batch <= {max_batch_size}, prefill "
                   f"budget {prefill_token_budget}) after predict(), timed together")


def ms(xs: Sequence[float]) -> tuple[float, float]:
    return 1000 * statistics.median(xs), 1000 * float(np.percentile(xs, 99))


def ape(predicted: float, actual: float) -> float:
    return abs(predicted - actual) / actual


def walk_forward(loads: list[IntervalLoad], predictor, split: Callable | None) -> dict:
    predictor.predict(loads[:WARMUP])  # imports statsmodels outside the timed calls
    rate_abs, rate_err, p50_err, p90_err, out_err, t_pred, cpu_pred, t_split = [], [], [], [], [], [], [], []
    skipped = 0
    for k in range(WARMUP, len(loads)):
        history, actual = loads[max(0, k - PREDICT_WINDOW):k], loads[k]  # what the planner core passes
        t0, c0 = time.perf_counter(), time.process_time()
        fc = predictor.predict(history)
        t1, c1 = time.perf_counter(), time.process_time()
        cpu_pred.append(c1 - c0)
        if split is not None:
            split(fc)
            t_split.append(time.perf_counter() - t0)
        t_pred.append(t1 - t0)
        rate_abs.append(abs(fc.rate - actual.rate))
        if actual.rate > 0:
            rate_err.append(ape(fc.rate, actual.rate))
        else:
            skipped += 1
        if actual.prompt_lens:
            dist = LengthDist.from_samples(actual.prompt_lens)
            p50_err.append(ape(fc.prompt.quantile(0.5), dist.quantile(0.5)))
            p90_err.append(ape(fc.prompt.quantile(0.9), dist.quantile(0.9)))
            out_err.append(ape(fc.output.quantile(0.5), LengthDist.from_samples(actual.output_lens).quantile(0.5)))
    return {"mae": np.mean(rate_abs), "rate": np.mean(rate_err), "p50": np.mean(p50_err),
            "p50med": np.median(p50_err), "p90": np.mean(p90_err),
            "out50": np.mean(out_err),
            "t": ms(t_pred), "cpu": ms(cpu_pred), "ts": ms(t_split) if t_split else None, "skipped": skipped,
            "n": len(loads) - WARMUP}


def accuracy_table(title: str, loads: list[IntervalLoad], oracle: Oracle | None, split: Callable | None) -> Table:
    table = Table(title=title)
    cols = ["predictor", "rate MAE req/s", "rate MAPE", "prompt p50 MAPE", "prompt p50 median APE",
            "prompt p90 MAPE", "output p50 MAPE", "predict ms p50", "predict ms p99", "predict CPU ms p50",
            "predict CPU ms p99"]
    if split is not None:
        cols += ["+ split ms p50", "+ split ms p99"]
    for col in cols:
        table.add_column(col, justify="right", no_wrap=col == "predictor")
    reference = [oracle] if oracle is not None else []
    for label, predictor in [(o.name, o) for o in reference] + lineup():
        r = walk_forward(loads, predictor, split)
        row = [label, f"{r['mae']:.2f}"] + [f"{r[k]:.1%}" for k in ("rate", "p50", "p50med", "p90", "out50")]
        if predictor is oracle:
            row += ["-"] * (len(cols) - len(row))
        else:
            row += [f"{r['t'][0]:.2f}", f"{r['t'][1]:.2f}", f"{r['cpu'][0]:.2f}", f"{r['cpu'][1]:.2f}"]
            if r["ts"] is not None:
                row += [f"{r['ts'][0]:.2f}", f"{r['ts'][1]:.2f}"]
        table.add_row(*row)
    table.caption = (f"{r['n']} intervals scored, {r['skipped']} with no arrivals skipped in the rate MAPE; "
                     f"mean {np.mean([x.arrivals for x in loads]):.1f} arrivals per interval"
                     + ("" if oracle is not None else "; no oracle row (a trace)"))
    return table


def timing_table(loads: list[IntervalLoad], calls: int) -> Table:
    table = Table(title=f"predict() alone on fixed-length histories ({calls} distinct histories each), "
                        "wall ms (and CPU ms of this process)")
    for col in ("predictor", "50 pts p50", "50 pts p99", "50 pts CPU p50", "300 pts p50", "300 pts p99",
                "300 pts CPU p50"):
        table.add_column(col, justify="right")
    for name, predictor in lineup():
        predictor.predict(loads[:20])  # imports statsmodels outside the timed calls
        row = [name]
        for length in (50, 300):
            times, cpu = [], []
            for end in range(length, min(len(loads), length + calls)):
                t0, c0 = time.perf_counter(), time.process_time()
                predictor.predict(loads[end - length:end])
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            row += [f"{x:.2f}" for x in ms(times)] + [f"{ms(cpu)[0]:.2f}"]
        table.add_row(*row)
    return table


def trace_requests(paths: Sequence[Path], rate: float | None, duration: float | None
                   ) -> tuple[list[BenchRequest], float]:
    """The traces merged onto one clock (as `dopd simulate --trace`), rescaled to `rate` when given,
    cut at `duration` when given; and the span to bin."""
    requests = read_traces(paths)
    if rate is not None:
        requests = scale_to_rate(requests, rate)
    if duration is not None:
        requests = [r for r in requests if r.t < duration]
    # Binned up to the last arrival (bin_requests drops the partial interval it falls in).
    return requests, duration if duration is not None else max((r.t for r in requests), default=0.0)


def run_trace(args, widths: list[float], console: Console) -> list[IntervalLoad]:
    split, note = split_fn(**TRACE_CLUSTER)
    duration = 120.0 if args.quick and args.duration is None else args.duration
    requests, span = trace_requests(args.trace, args.rate, duration)
    own = len(requests) / span if span > 0 else 0.0
    console.print(f"traces {' + '.join(str(p) for p in args.trace)}: {len(requests)} requests over {span:.0f} s "
                  f"({own:.2f} req/s, {'rescaled with --rate' if args.rate else 'their own rate'}); "
                  f"warm-up {WARMUP} intervals")
    console.print(note)
    console.print("BLAS threads: " + ", ".join(f"{v}={os.environ[v]}" for v in
                                            ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")))
    one_second = []
    for width in widths:
        loads = bin_requests(requests, span, width)
        if width == 1.0:
            one_second = loads
        console.print(accuracy_table(f"{len(args.trace)} trace(s): {len(requests)} requests in {len(loads)} "
                                     f"intervals of {width:g} s", loads, None, split))
        console.print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return one_second


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="120 s of each workload, 1 s intervals only")
    parser.add_argument("--workloads", default="phase-shift,mix")
    parser.add_argument("--trace", type=Path, nargs="+",
                        help="score these JSONL or Azure CSV traces (merged onto one clock) instead of --workloads")
    parser.add_argument("--rate", type=float, help="reference request rate, req/s (workloads: default 8; "
                                                   "traces: rescale to this mean rate, default their own)")
    parser.add_argument("--duration", type=float, help="seconds of each workload (default 600); traces: cut here")
    parser.add_argument("--burstiness", type=float, default=0.5, help="Gamma shape; < 1 is burstier than Poisson")
    parser.add_argument("--intervals", default="1,5", help="interval widths in seconds")
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arima-refit", default="", help="comma-separated K: add rows of ARIMA fitted at one "
                        "forecast in K (refit_every=K; the forecasts between filter under the held parameters)")
    args = parser.parse_args()
    LINEUP.extend((f"arima refit {k}", "arima", {"refit_every": int(k)}) for k in args.arima_refit.split(",") if k)
    widths = [1.0] if args.quick else [float(w) for w in args.intervals.split(",")]
    console = Console(width=180)
    calls = 30 if args.quick else 100
    t_start = time.perf_counter()
    if args.trace:
        loads = run_trace(args, widths, console)
        if len(loads) < 300 + calls:  # too short for the 300-interval histories: the mix workload's
            loads = bin_requests(generate("mix", 8.0, 300.0 + calls, seed=args.seed, burstiness=args.burstiness,
                                          max_context=args.max_context), 300.0 + calls, 1.0)
        console.print(timing_table(loads, calls))
        console.print(f"total {time.perf_counter() - t_start:.0f} s")
        return 0
    args.rate = 8.0 if args.rate is None else args.rate
    duration = 120.0 if args.quick else (600.0 if args.duration is None else args.duration)
    split, note = split_fn()
    console.print(f"workloads at reference rate {args.rate:g} req/s, burstiness {args.burstiness:g}, "
                  f"{duration:g} s, max_context {args.max_context}, seed {args.seed}; warm-up {WARMUP} intervals")
    console.print(note)
    console.print("BLAS threads: " + ", ".join(f"{v}={os.environ[v]}" for v in
                                            ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")))
    for workload in args.workloads.split(","):
        requests = generate(workload, args.rate, duration, seed=args.seed, burstiness=args.burstiness,
                            max_context=args.max_context)
        for width in widths:
            loads = bin_requests(requests, duration, width)
            oracle = Oracle(workload, requests, loads, args.rate, duration, args.burstiness)
            console.print(accuracy_table(f"{workload}: {len(requests)} requests in {len(loads)} intervals of "
                                         f"{width:g} s", loads, oracle, split))
            console.print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    span = 300.0 + calls
    loads = bin_requests(generate("mix", args.rate, span, seed=args.seed, burstiness=args.burstiness,
                                  max_context=args.max_context), span, 1.0)
    console.print(timing_table(loads, calls))
    console.print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
