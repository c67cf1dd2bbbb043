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
4. The KV ceiling, for each KV transport: the same with prompts whose KV is Llama-3-8B's (128
   KiB a token; the zero-cost profile but for the model's shape), in KV bytes per second moved
   from the prefill to the decode worker; then the lowest time scale at which 16 simulated H100s
   on the README's phase-shift run stay under every ceiling (half of it, as `dopd bench` checks).

    python benchmarks/bench_overhead.py [--rates 25,50,...] [--duration 6] [--kv-transports grpc,nixl]
                                        [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.sim_cluster import running_cluster  # noqa: E402
from common.modeling.sim_runner import profile_layout  # noqa: E402
from common.profile import PROFILE_DIR, load_profile  # noqa: E402
from services.bench.arrivals import arrival_times  # noqa: E402
from services.bench.metrics import summarize  # noqa: E402
from services.bench.report import CEILING_FILE, CEILING_MARGIN, harness_report  # noqa: E402
from services.bench.runner import RunSettings, run_load  # noqa: E402
from services.bench.workloads import BenchRequest, generate  # noqa: E402

PROMPT_TOKENS = 128
KV_MODEL = "llama3-8b-h100"  # whose KV shape the KV ceiling moves
KV_PROMPT_TOKENS = 512  # 64 MiB of Llama-3-8B KV a request
# The README's cluster-scale run: 16 simulated H100s (8P + 8D) on phase-shift at 4 req/s for 30 s.
SIM16 = {"workload": "phase-shift", "rate": 4.0, "duration": 30.0, "seed": 0, "max_context": 8192}


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


def open_loop(target: str, rate: float, duration: float, output_tokens: int, seed: int,
              prompt_tokens: int = PROMPT_TOKENS, **settings) -> dict:
    times = arrival_times(rate, duration, seed)
    requests = [BenchRequest(t=t, prompt_tokens=prompt_tokens, prompt=None, output_tokens=output_tokens)
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
    parser.add_argument("--kv-rates", default="4,8,12,16,20,24,32", help="request rates of the KV run")
    parser.add_argument("--kv-transports", default="grpc,nixl", help="DOPD_KV_TRANSPORT values of the KV run")
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
    result["kv_rate"], result["ceiling"]["kv_bytes_per_s"] = kv_ceiling(
        console, args.kv_transports.split(","), [float(r) for r in args.kv_rates.split(",")], args.duration)
    result["sim16_time_scale"] = sim16_time_scales(console, result["ceiling"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    if args.write_ceiling and None not in result["ceiling"].values():
        CEILING_FILE.write_text(json.dumps({
            **result["ceiling"], "measured_by": "benchmarks/bench_overhead.py --write-ceiling",
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "note": "one gateway, 1 prefill + 1 decode sim worker on the zero profile, client on the same machine",
        }, indent=2) + "\n")
    return 0


def kv_ceiling(console: Console, kv_transports: list[str], rates: list[float], duration: float) -> tuple[dict, dict]:
    """Open-loop runs of KV_PROMPT_TOKENS-token prompts (2 output tokens) on a zero-cost profile of
    KV_MODEL's shape, for each transport; the KV bytes per second of the highest sustained rate."""
    shaped = json.loads((PROFILE_DIR / "zero.json").read_text())
    shaped.update(name=f"zero-{KV_MODEL}", model=json.loads((PROFILE_DIR / f"{KV_MODEL}.json").read_text())["model"])
    per_request = profile_layout(load_profile(KV_MODEL)).bytes_for(KV_PROMPT_TOKENS)
    rows_by, ceiling = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zero-shaped.json"
        path.write_text(json.dumps(shaped))
        for transport in kv_transports:
            # 16,384 blocks of 16 tokens: room for every request of the highest rate at once.
            with running_cluster(f"sim:{path}", kv_blocks=16384, DOPD_KV_TRANSPORT=transport) as cluster:
                target = cluster.gateway_address
                open_loop(target, 2, 2, 2, seed=99, prompt_tokens=KV_PROMPT_TOKENS)  # warm-up
                rows = [open_loop(target, r, duration, 2, seed=i, prompt_tokens=KV_PROMPT_TOKENS)
                        for i, r in enumerate(rates)]
            for row in rows:
                row["kv_bytes_per_s"] = row["request_throughput"] * per_request
            rows_by[transport] = rows
            ceiling[transport] = max((r["kv_bytes_per_s"] for r in rows if r["sustained"]), default=None)
    table = Table(title=f"KV ceiling: open-loop load, {KV_PROMPT_TOKENS}-token prompts of {KV_MODEL}'s KV "
                        f"({per_request / 2**20:.0f} MiB each), zero-cost profile, 1 prefill + 1 decode")
    for col in ("KV transport", "offered req/s", "completed req/s", "KV MB/s", "failed", "median TTFT ms",
                "p99 TTFT ms", "p99 send lateness ms", "sustained"):
        table.add_column(col, justify="right")
    for transport, rows in rows_by.items():
        for s in rows:
            table.add_row(transport, f"{s['offered_rate']:g}", f"{s['request_throughput']:.1f}",
                          f"{s['kv_bytes_per_s'] / 1e6:.0f}", str(s["failed"]), f"{s['median_ttft_ms']:.1f}",
                          f"{s['p99_ttft_ms']:.1f}", f"{s['harness']['send_lateness_p99_ms']:.1f}",
                          "yes" if s["sustained"] else "no")
    console.print(table)
    for transport, value in ceiling.items():
        console.print(f"KV ceiling by {transport}: {'none sustained' if value is None else f'{value / 1e6:.0f} MB/s'}")
    return rows_by, ceiling


def sim16_time_scales(console: Console, ceiling: dict) -> dict:
    """The lowest time scale at which the README's 16-H100 run keeps its peak (per wall second,
    over its arrivals) of KV bytes and of requests under CEILING_MARGIN of each ceiling."""
    requests = generate(SIM16["workload"], rate=SIM16["rate"], duration=SIM16["duration"], seed=SIM16["seed"],
                        max_context=SIM16["max_context"])
    per_token = profile_layout(load_profile(KV_MODEL)).bytes_for(1)
    kv_by_second, requests_by_second = Counter(), Counter()
    for r in requests:  # a prompt's KV moves within its prefill, a few ms after its arrival at scale 1
        kv_by_second[int(r.t)] += r.prompt_tokens * per_token
        requests_by_second[int(r.t)] += 1
    peak_kv, peak_requests = max(kv_by_second.values()), max(requests_by_second.values())
    by_requests = peak_requests / (CEILING_MARGIN * ceiling["requests_per_s"]) if ceiling["requests_per_s"] else None
    out = {"run": SIM16, "peak_kv_bytes_per_s": peak_kv, "peak_requests_per_s": peak_requests,
           "time_scale_for_requests": by_requests, "time_scale_for_kv": {}}
    for transport, kv_ceiling_bytes in ceiling["kv_bytes_per_s"].items():
        out["time_scale_for_kv"][transport] = (peak_kv / (CEILING_MARGIN * kv_ceiling_bytes)
                                               if kv_ceiling_bytes else None)
    console.print(f"16 simulated H100s on {SIM16['workload']} at {SIM16['rate']:g} req/s: peak "
                  f"{peak_kv / 1e6:.0f} MB of KV and {peak_requests} requests in one second of profile time; the "
                  f"time scale that keeps them under {CEILING_MARGIN:.0%} of the ceilings: "
                  + ", ".join(f"{what} {'-' if v is None else f'{v:.2f}'}" for what, v in
                              [("requests", by_requests)] + [(f"KV by {t}", v) for t, v in
                                                             out["time_scale_for_kv"].items()]))
    return out


if __name__ == "__main__":
    sys.exit(main())
