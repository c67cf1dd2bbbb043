"""The gateway tier's cost and its scaling with processes (issue 26): the sim engine's zero-cost
profile (no compute), 1 prefill + 1 decode worker, and 1 or 2 gateway processes on one port
(`dopd up --gateways N`, SO_REUSEPORT), through the gRPC API (the harness spreads its requests
over `--connections` connections, each of its own) and through the OpenAI HTTP API.

For each (gateways, front end) and each request rate: an open-loop token stream (128-token
prompts, 256 output tokens a request); the tokens/s streamed and whether the rate was sustained
(as bench_overhead.py judges it); every gateway process's CPU seconds (/proc) per 1,000 streamed
tokens and per request, summed over the gateways; and the whole machine's CPU (every process of
the cluster and the client), to say whether the cores, not the gateways, were the limit.

    python benchmarks/bench_gateways.py [--rates 10,20,40] [--duration 6] [--connections 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.bench_http_vs_grpc import cpu_seconds  # noqa: E402
from benchmarks.bench_overhead import open_loop  # noqa: E402
from benchmarks.sim_cluster import running_cluster  # noqa: E402

MODEL = "sim:zero"
OUTPUT_TOKENS = 256


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measured(cluster, rate: float, duration: float, seed: int, **settings) -> dict:
    gateways = [p for p in cluster.procs if p.role == "gateway"]
    before = {p.name: cpu_seconds(p.popen.pid) for p in gateways}
    busy0, wall0 = machine_busy_s(), time.perf_counter()
    s = open_loop(cluster.gateway_address, rate, duration, OUTPUT_TOKENS, seed=seed, **settings)
    busy, wall = machine_busy_s() - busy0, time.perf_counter() - wall0
    per_gateway = {p.name: cpu_seconds(p.popen.pid) - before[p.name] for p in gateways}
    tokens = s["total_output_tokens"]
    gateway_cpu = sum(per_gateway.values())
    return {
        "offered_rate": rate, "sustained": s["sustained"], "tokens_per_s": s["output_throughput"],
        "completed_per_s": s["request_throughput"], "failed": s["failed"], "median_ttft_ms": s["median_ttft_ms"],
        "output_tokens": tokens, "completed": s["completed"], "gateway_cpu_s": per_gateway,
        "gateway_cpu_s_per_1k_tokens": 1000 * gateway_cpu / tokens if tokens else None,
        "gateway_cpu_ms_per_request": 1000 * gateway_cpu / s["completed"] if s["completed"] else None,
        "machine_cpu_utilization": busy / wall / (os.cpu_count() or 1),
        "client_cpu_utilization": s["harness"]["client_cpu_utilization"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="10,20,40", help="request rates (256 output tokens each)")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=8, help="gRPC connections the harness spreads over")
    parser.add_argument("--gateways", default="1,2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    console = Console(width=170)
    rows = []
    for n in (int(g) for g in args.gateways.split(",")):
        with running_cluster(MODEL, prefill=1, decode=1, kv_blocks=8192, gateways=n) as cluster:
            fronts = {"grpc": {"connections": args.connections},
                      "http": {"backend": "openai", "base_url": cluster.http_url, "model": MODEL}}
            for kw in fronts.values():  # warm-up, both paths
                open_loop(cluster.gateway_address, 10, 1, 16, seed=99, **kw)
            for front, kw in fronts.items():
                for i, rate in enumerate(float(r) for r in args.rates.split(",")):
                    rows.append({"gateways": n, "front": front, **measured(cluster, rate, args.duration, i, **kw)})
    table = Table(title=f"{OUTPUT_TOKENS}-token streams, zero-cost profile, 1 prefill + 1 decode sim worker, "
                        f"{os.cpu_count()} cores; gateway CPU summed over the gateways")
    for col in ("gateways", "front", "offered req/s", "tokens/s", "sustained", "median TTFT ms",
                "gateway CPU s / 1k tokens", "gateway CPU ms / request", "CPU by gateway (s)", "machine CPU",
                "client CPU"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["gateways"]), r["front"], f"{r['offered_rate']:g}", f"{r['tokens_per_s']:.0f}",
                      "yes" if r["sustained"] else "no", f"{r['median_ttft_ms']:.1f}",
                      f"{r['gateway_cpu_s_per_1k_tokens']:.3f}", f"{r['gateway_cpu_ms_per_request']:.1f}",
                      " ".join(f"{v:.2f}" for v in r["gateway_cpu_s"].values()),
                      f"{r['machine_cpu_utilization']:.0%}", f"{r['client_cpu_utilization']:.0%}")
    console.print(table)
    for front in ("grpc", "http"):
        best = {n: max((r["tokens_per_s"] for r in rows if r["gateways"] == n and r["front"] == front
                        and r["sustained"]), default=None) for n in sorted({r["gateways"] for r in rows})}
        console.print(f"{front}: highest sustained tokens/s by gateways: "
                      + ", ".join(f"{n}: {'-' if v is None else f'{v:.0f}'}" for n, v in best.items()))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
