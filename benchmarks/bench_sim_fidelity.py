"""Does the sim engine's measured latency match its profile? At low load (one request at a time),
through the real gateway and workers, TTFT should be the profile's prefill time and TPOT its
decode step time at batch 1, within 10%.

The KV of the profiled model really crosses loopback gRPC (a 2,048-token Llama-3-8B prompt is
256 MiB), streamed layer by layer during the simulated prefill. On this 2-core machine that
transfer, and the per-token path, are far slower than a GPU cluster's, so at time scale 1 the
figures measure the harness, not the profile; a time scale stretches the profile until they
don't. This script prints both, to show which time scale a cluster-scale run needs, for each KV
transport (DOPD_KV_TRANSPORT): `grpc` sends the bytes in PushKV chunks; `nixl` has the decode
worker read them out of the prefill worker's registered pool (the sim engine's scratch pool).

    python benchmarks/bench_sim_fidelity.py [--profile llama3-8b-h100] [--time-scales 1,10,30]
                                            [--kv-transports grpc,nixl] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.sim_cluster import running_cluster  # noqa: E402
from common.profile import load_profile  # noqa: E402
from services.bench.metrics import summarize  # noqa: E402
from services.bench.runner import RunSettings, run_load  # noqa: E402
from services.bench.workloads import BenchRequest  # noqa: E402

OUTPUT_TOKENS = 32


def sequential(prompt_len: int, n: int, spacing: float) -> list[BenchRequest]:
    return [BenchRequest(t=i * spacing, prompt_tokens=prompt_len, prompt=None, output_tokens=OUTPUT_TOKENS)
            for i in range(n)]


def measure(profile_name: str, time_scale: float, prompt_lens: list[int], n: int, kv_transport: str) -> list[dict]:
    profile = load_profile(profile_name)
    rows = []
    with running_cluster(f"sim:{profile_name}", time_scale=time_scale, DOPD_KV_TRANSPORT=kv_transport) as cluster:
        for prompt_len in prompt_lens:
            expected_ttft = profile.prefill_time(prompt_len)
            expected_tpot = profile.decode_step_time(1, prompt_len + OUTPUT_TOKENS / 2)
            spacing = 1.5 * (expected_ttft + OUTPUT_TOKENS * expected_tpot) + 0.05
            requests = sequential(prompt_len, n, spacing)
            outcome = asyncio.run(run_load(requests, RunSettings(target=cluster.gateway_address,
                                                                 time_scale=time_scale, progress=False)))
            s = summarize(outcome.results, outcome.duration)
            rows.append({
                "kv_transport": kv_transport, "time_scale": time_scale, "prompt_tokens": prompt_len,
                "completed": s["completed"],
                "profile_ttft_ms": expected_ttft * 1e3, "measured_ttft_ms": s["median_ttft_ms"],
                "ttft_error": s["median_ttft_ms"] / (expected_ttft * 1e3) - 1,
                "profile_tpot_ms": expected_tpot * 1e3, "measured_tpot_ms": s["median_tpot_ms"],
                "tpot_error": s["median_tpot_ms"] / (expected_tpot * 1e3) - 1,
            })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="llama3-8b-h100")
    parser.add_argument("--time-scales", default="1,10,30")
    parser.add_argument("--prompt-lens", default="128,512,2048")
    parser.add_argument("--requests", type=int, default=5, help="sequential requests per prompt length")
    parser.add_argument("--kv-transports", default="grpc", help="DOPD_KV_TRANSPORT values, each measured")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for transport in args.kv_transports.split(","):
        for scale in [float(x) for x in args.time_scales.split(",")]:
            rows += measure(args.profile, scale, [int(x) for x in args.prompt_lens.split(",")], args.requests,
                            transport)
    table = Table(title=f"sim engine vs profile {args.profile} at low load (medians; target: within 10%)")
    for col in ("KV transport", "time scale", "prompt", "profile TTFT ms", "measured", "error", "profile TPOT ms",
                "measured", "error", "verdict"):
        table.add_column(col, justify="right")
    for r in rows:
        r["pass"] = bool(abs(r["ttft_error"]) <= 0.10 and abs(r["tpot_error"]) <= 0.10)
        table.add_row(r["kv_transport"], f"{r['time_scale']:g}", str(r["prompt_tokens"]),
                      f"{r['profile_ttft_ms']:.1f}", f"{r['measured_ttft_ms']:.1f}", f"{r['ttft_error']:+.1%}",
                      f"{r['profile_tpot_ms']:.2f}", f"{r['measured_tpot_ms']:.2f}", f"{r['tpot_error']:+.1%}",
                      "PASS" if r["pass"] else "FAIL")
    console = Console(width=160)
    console.print(table)
    lowest = report_lowest(console, rows)
    if args.out:
        args.out.write_text(json.dumps({"profile": args.profile, "rows": rows, "lowest_passing_time_scale": lowest},
                                       indent=2))
    return 0


def lowest_passing_scale(rows: list[dict]) -> float | None:
    """The lowest time scale from which every measured scale passes for every row of it."""
    lowest = None
    for scale in sorted({r["time_scale"] for r in rows}, reverse=True):
        if not all(r["pass"] for r in rows if r["time_scale"] == scale):
            break
        lowest = scale
    return lowest


def report_lowest(console: Console, rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per transport: the lowest passing time scale for each prompt length and for all of them."""
    out: dict[str, dict[str, float | None]] = {}
    for transport in dict.fromkeys(r["kv_transport"] for r in rows):
        mine = [r for r in rows if r["kv_transport"] == transport]
        out[transport] = {str(p): lowest_passing_scale([r for r in mine if r["prompt_tokens"] == p])
                          for p in dict.fromkeys(r["prompt_tokens"] for r in mine)}
        out[transport]["all"] = lowest_passing_scale(mine)
        console.print(f"{transport}: lowest time scale that passes (and every higher one measured): "
                      + ", ".join(f"{k if k == 'all' else k + '-token prompts'} "
                                  f"{'none of those measured' if v is None else f'{v:g}'}"
                                  for k, v in out[transport].items()))
    return out


if __name__ == "__main__":
    sys.exit(main())
