"""What the OpenAI-compatible HTTP API adds over the gRPC API: the same requests through both front
ends of one gateway, on the sim engine's zero-cost profile (no compute), so every millisecond is
the serving path (bench_overhead.py measures the gRPC path alone).

1. One request at a time (128-token prompts, 32 output tokens, 10 a second): TTFT, TPOT and ITL
   through each front end, and the difference: the added latency per request and per token.
2. A token stream under load (open loop, 256 output tokens a request): the gateway's CPU seconds
   per 1000 streamed tokens through each (from /proc: the gateway process alone), i.e. what one
   gateway core can stream through each front end.

The two run alternately (gRPC, HTTP, gRPC, HTTP...) `--rounds` times and the medians of the
rounds are reported, so that a drift of the machine's speed does not fall on one side.

    python benchmarks/bench_http_vs_grpc.py [--rounds 3] [--n 100] [--rate 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.bench_overhead import added_latency, open_loop  # noqa: E402
from benchmarks.sim_cluster import running_cluster  # noqa: E402

MODEL = "sim:zero"
METRICS = ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "median_itl_ms", "p99_itl_ms")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=100, help="requests of the one-at-a-time run")
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s of the token-stream run")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of the token-stream run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    console = Console(width=140)
    rounds: dict[str, list[dict]] = {"grpc": [], "openai": []}
    with running_cluster(MODEL, prefill=1, decode=1, kv_blocks=8192) as cluster:
        target, gateway_pid = cluster.gateway_address, cluster.proc("gateway").popen.pid
        backends = {"grpc": {}, "openai": {"backend": "openai", "base_url": cluster.http_url, "model": MODEL}}
        for kw in backends.values():  # warm-up, both paths
            open_loop(target, 10, 1, 16, seed=99, **kw)
        for r in range(args.rounds):
            for name, kw in backends.items():
                lat = added_latency(target, args.n, **kw)
                cpu0 = cpu_seconds(gateway_pid)
                stream = open_loop(target, args.rate, args.duration, 256, seed=r, **kw)
                cpu = cpu_seconds(gateway_pid) - cpu0
                rounds[name].append({**{m: lat[m] for m in METRICS}, "failed": lat["failed"] + stream["failed"],
                                     "tokens": stream["total_output_tokens"],
                                     "gateway_cpu_s_per_1k_tokens": 1000 * cpu / max(1, stream["total_output_tokens"]),
                                     "tokens_per_s": stream["output_throughput"]})
                console.print(f"round {r + 1} {name}: TTFT p50 {lat['median_ttft_ms']:.2f} ms, TPOT p50 "
                              f"{lat['median_tpot_ms']:.3f} ms, gateway CPU "
                              f"{rounds[name][-1]['gateway_cpu_s_per_1k_tokens']:.3f} s / 1k tokens")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rounds.items()}
    table = Table(title=f"gRPC vs the OpenAI HTTP API, one gateway, zero-cost profile (median of {args.rounds} "
                        "rounds)")
    for col in ("metric", "gRPC", "HTTP (OpenAI)", "HTTP - gRPC"):
        table.add_column(col, justify="right")
    for m in (*METRICS, "gateway_cpu_s_per_1k_tokens"):
        g, h = med["grpc"][m], med["openai"][m]
        table.add_row(m, f"{g:.3f}", f"{h:.3f}", f"{h - g:+.3f}")
    console.print(table)
    added_per_token = med["openai"]["median_tpot_ms"] - med["grpc"]["median_tpot_ms"]
    console.print(f"added latency per token of HTTP over gRPC (median TPOT): {added_per_token:+.3f} ms; per request "
                  f"(median TTFT): {med['openai']['median_ttft_ms'] - med['grpc']['median_ttft_ms']:+.3f} ms; "
                  f"failed requests: gRPC {sum(r['failed'] for r in rounds['grpc'])}, HTTP "
                  f"{sum(r['failed'] for r in rounds['openai'])}")
    cap = {k: 1000 / v["gateway_cpu_s_per_1k_tokens"] for k, v in med.items() if v["gateway_cpu_s_per_1k_tokens"]}
    console.print("tokens one gateway core could stream at this CPU cost: " +
                  ", ".join(f"{k} {v:,.0f}/s" for k, v in cap.items()))
    if args.out:
        args.out.write_text(json.dumps({"rounds": rounds, "median": med, "added_tpot_ms": added_per_token}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
