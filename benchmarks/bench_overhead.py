"""The cost of the serving path itself: the sim engine on the zero-cost profile (no compute, 32
KV bytes a token), so every millisecond measured is the gateway, gRPC, the workers' engines and
the client. These figures are the floor under every other comparison.

1. Added latency, one request at a time: TTFT = the whole request path (validate, reserve on the
   decode worker, prefill RPC, KV push, first token back); TPOT = the per-token path (decode step
   loop, Decode stream, gateway relay, client).
2. The highest request rate one gateway sustains: open-loop Poisson load at rising rates; a rate
   is sustained when every request completes, throughput keeps up with the offered rate (>= 95%)
   and the client sent on time (p99 lateness < 100 ms).
3. The token-streaming ceiling: the same with long outputs, in tokens per second.

    python benchmarks/bench_overhead.py [--rates 25,50,...] [--duration 6] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.sim_cluster import running_cluster  # noqa: E402
from services.bench.arrivals import arrival_times  # noqa: E402
from services.bench.metrics import summarize  # noqa: E402
from services.bench.report import CEILING_FILE, harness_report  # noqa: E402
from services.bench.runner import RunSettings, run_load  # noqa: E402
from services.bench.workloads import BenchRequest  # noqa: E402

PROMPT_TOKENS = 128


def run(target: str, requests: list[BenchRequest], duration: float, **settings) -> dict:
    """One open-loop run; `settings` go to RunSettings (e.g. the OpenAI backend's)."""
    outcome = asyncio.run(run_load(requests, RunSettings(target=target, progress=False, request_timeout=30,
                                                         **settings)))
    summary = summarize(outcome.results, outcome.duration)
    summary["harness"] = harness_report(outcome, duration)
    return summary


def added_latency(target: str, n: int, **settings) -> dict:
    requests = [BenchRequest(t=i * 0.1, prompt_tokens=PROMPT_TOKENS, prompt=None, output_tokens=32) for i in range(n)]
    return run(target, requests, n * 0.1, **settings)


def open_loop(target: str, rate: float, duration: float, output_tokens: int, seed: int, **settings) -> dict:
    times = arrival_times(rate, duration, seed)
    requests = [BenchRequest(t=t, prompt_tokens=PROMPT_TOKENS, prompt=None, output_tokens=output_tokens)
                for t in times]
    s = run(target, requests, duration, **settings)
    s["offered_rate"] = rate
    s["sustained"] = bool(s["failed"] == 0 and s["request_throughput"] >= 0.95 * len(requests) / duration
                          and s["harness"]["send_lateness_p99_ms"] < 100)
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="25,50,100,200,400")
    parser.add_argument("--token-rates", default="5,10,20,40", help="request rates of the 256-token run")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write-ceiling", action="store_true",
                        help="record the ceiling in services/bench/harness_ceiling.json for dopd bench")
    args = parser.parse_args()
    console = Console(width=160)
    result: dict = {}
    with running_cluster("sim:zero", prefill=1, decode=1, kv_blocks=8192) as cluster:
        target = cluster.gateway_address
        open_loop(target, 10, 2, 16, seed=99)  # warm-up
        result["added_latency"] = lat = added_latency(target, 100)
        table = Table(title="added latency of the serving path, one request at a time (zero-cost profile)")
        for col in ("metric", "median ms", "p90 ms", "p99 ms"):
            table.add_column(col, justify="right")
        for m in ("ttft", "tpot", "itl", "e2el"):
            table.add_row(m.upper(), f"{lat[f'median_{m}_ms']:.2f}", f"{lat[f'p90_{m}_ms']:.2f}",
                          f"{lat[f'p99_{m}_ms']:.2f}")
        console.print(table)
        for key, rates, out_tokens in (("request_rate", args.rates, 16), ("token_rate", args.token_rates, 256)):
            rows = [open_loop(target, float(r), args.duration, out_tokens, seed=i)
                    for i, r in enumerate(rates.split(","))]
            result[key] = rows
            table = Table(title=f"open-loop load, {PROMPT_TOKENS}-token prompts, {out_tokens} output tokens")
            for col in ("offered req/s", "completed req/s", "tokens/s", "failed", "median TTFT ms", "p99 TTFT ms",
                        "median TPOT ms", "client CPU", "p99 send lateness ms", "sustained"):
                table.add_column(col, justify="right")
            for s in rows:
                table.add_row(f"{s['offered_rate']:g}", f"{s['request_throughput']:.1f}",
                              f"{s['output_throughput']:.0f}", str(s["failed"]), f"{s['median_ttft_ms']:.1f}",
                              f"{s['p99_ttft_ms']:.1f}", f"{s['median_tpot_ms']:.2f}",
                              f"{s['harness']['client_cpu_utilization']:.0%}",
                              f"{s['harness']['send_lateness_p99_ms']:.1f}", "yes" if s["sustained"] else "no")
            console.print(table)
    sustained = [s for s in result["request_rate"] if s["sustained"]]
    tokens = [s for s in result["token_rate"] if s["sustained"]]
    result["ceiling"] = {
        "requests_per_s": max((s["request_throughput"] for s in sustained), default=None),
        "tokens_per_s": max((s["output_throughput"] for s in tokens + sustained), default=None),
    }
    console.print(f"one gateway sustains {result['ceiling']['requests_per_s']} req/s (16-token outputs) and "
                  f"{result['ceiling']['tokens_per_s']} streamed tokens/s on this machine")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    if args.write_ceiling and None not in result["ceiling"].values():
        CEILING_FILE.write_text(json.dumps({
            **result["ceiling"], "measured_by": "benchmarks/bench_overhead.py --write-ceiling",
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "note": "one gateway, 1 prefill + 1 decode sim worker on the zero profile, client on the same machine",
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
