"""In-place role switches, timed, on a real model (issue: the planner's role switch).

Cluster: 1 prefill + 2 decode workers (default smollm2; --model tiny-random for a quick look).
Each trial:
  1. one decode worker is empty and serving prefill (A), the other (B) decodes alone;
  2. 16 requests with ~240-token prompts are sent; once all 16 run on B at ~256 tokens of context,
  3. A switches prefill -> decode (drain of in-flight prefills: none by then),
  4. B switches decode -> prefill: its 16 running requests are live-migrated to A,
  5. the clients' streams go on; each records the arrival time of every token.
The next trial runs with A and B swapped. A baseline trial without switches gives the longest
pause between two tokens without a switch.

Prints p50/p99 of both switch directions, bytes migrated, migration rate, and the longest pause
any client saw, next to the same without a switch. Goals: prefill -> decode <= 50 ms; decode ->
prefill <= 250 ms p50 including migration; no client pause longer than its own KV's migration
plus one decode step.

    python benchmarks/bench_role_switch.py [--model smollm2] [--trials 8] [--transport auto|grpc] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import Figure, Report, at_most, console  # noqa: E402
from common.convert import ROLE_TO_PB  # noqa: E402
from common.pb import gateway_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402
from common.rpc.channels import internal_channel
from common.types import Role  # noqa: E402
from services.client import generate_request, worker_stats  # noqa: E402
from services.launcher import Cluster, ClusterSpec, free_port  # noqa: E402

N_REQUESTS = 16
T0 = time.perf_counter()


def log(message: str) -> None:
    console.print(f"[dim]{time.perf_counter() - T0:7.1f}s[/dim] {message}")


async def stream(gateway: str, prompt: list[int], max_tokens: int, times: list[float]) -> list[float]:
    """Arrival times (perf_counter) of every token of one greedy request, into `times`."""
    async with grpc.aio.insecure_channel(gateway) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(
            generate_request(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True), timeout=600)
        async for msg in call:
            now = time.perf_counter()
            times.extend([now] * len(msg.token_ids))
            if msg.finish_reason:
                assert len(times) == max_tokens, f"{len(times)} tokens of {max_tokens}"
    return times


async def set_role(address: str, role: Role) -> worker_pb2.SetRoleResponse:
    async with internal_channel(address) as ch:
        return await worker_pb2_grpc.WorkerStub(ch).SetRole(worker_pb2.SetRoleRequest(role=ROLE_TO_PB[role]),
                                                            timeout=300)


async def trial(cluster: Cluster, a: str, b: str, args, switch: bool, seed: int) -> dict:
    """A serves prefill and is empty; B decodes the 16 requests; then A -> decode, B -> prefill."""
    addr = {p.name: p.address for p in cluster.procs}
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, 10000, size=args.prompt_tokens).tolist() for _ in range(N_REQUESTS)]
    tokens_so_far: list[list[float]] = [[] for _ in prompts]
    clients = [asyncio.create_task(stream(cluster.gateway_address, p, args.max_tokens, ts))
               for p, ts in zip(prompts, tokens_so_far, strict=True)]
    # Until all 16 run on B with ~256 tokens of context (prompt + a few tokens).
    while (await worker_stats(addr[b])).decode_running < N_REQUESTS:
        await asyncio.sleep(0.05)
        if any(c.done() for c in clients):
            raise RuntimeError("a request ended before all 16 were running")
    await asyncio.sleep(args.settle)
    running = sum(len(c) for c in tokens_so_far)
    out: dict = {"switch": switch, "context": args.prompt_tokens + running / N_REQUESTS}
    marks = []
    if switch:
        t = time.perf_counter()
        p2d = await set_role(addr[a], Role.DECODE)
        t_mid = time.perf_counter()
        d2p = await set_role(addr[b], Role.PREFILL)
        marks = [t, time.perf_counter()]
        out.update(p2d_ms=p2d.total_seconds * 1e3, p2d_rpc_ms=(t_mid - t) * 1e3, d2p_ms=d2p.total_seconds * 1e3,
                   d2p_migration_ms=d2p.migration_seconds * 1e3, migrated=d2p.migrated_requests,
                   migrated_bytes=d2p.migrated_bytes, migrated_bytes_shared=d2p.migrated_bytes_shared,
                   longest_request_pause_ms=d2p.longest_request_pause_seconds * 1e3,
                   longest_request_migration_ms=d2p.longest_request_migration_seconds * 1e3,
                   fell_back=d2p.fell_back_to_drain, d2p_rpc_ms=(marks[1] - t_mid) * 1e3)
    times = await asyncio.gather(*clients)
    gaps = [np.diff(ts) for ts in times]
    out["max_gap_ms"] = max(float(g.max()) for g in gaps) * 1e3
    out["median_gap_ms"] = float(np.median(np.concatenate(gaps))) * 1e3
    if marks:
        # The longest gap of each client that spans the switch (its own pause).
        spans = [max((float(t1 - t0) for t0, t1 in zip(ts[:-1], ts[1:], strict=True) if t1 >= marks[0]
                      and t0 <= marks[1]), default=0.0) for ts in times]
        out["pause_during_switch_ms"] = [s * 1e3 for s in spans]
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def run(cluster: Cluster, args) -> list[dict]:
    # decode-1 starts as the empty prefill-serving worker A; decode-0 decodes (B).
    addr = {p.name: p.address for p in cluster.procs}
    await set_role(addr["decode-1"], Role.PREFILL)
    a, b = "decode-1", "decode-0"
    trials = []
    log("baseline trial (no switch)")
    base = await trial(cluster, a, b, args, switch=False, seed=0)
    log(f"baseline: longest gap {base['max_gap_ms']:.0f} ms, median {base['median_gap_ms']:.0f} ms")
    trials.append(base)
    for i in range(args.trials):
        r = await trial(cluster, a, b, args, switch=True, seed=i + 1)
        trials.append(r)
        log(f"trial {i + 1}/{args.trials}: {a} P->D {r['p2d_ms']:.1f} ms; {b} D->P {r['d2p_ms']:.1f} ms "
            f"({r['migrated']} moved, {r['migrated_bytes'] / 1e6:.1f} MB, migration {r['d2p_migration_ms']:.1f} ms, "
            f"longest request pause {r['longest_request_pause_ms']:.1f} ms); client gaps: max "
            f"{r['max_gap_ms']:.0f} ms, median {r['median_gap_ms']:.0f} ms")
        a, b = b, a
    return trials


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=220)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--settle", type=float, default=0.5, help="seconds decoding before the switch")
    parser.add_argument("--transport", default="auto", choices=["auto", "grpc", "shm", "nixl"],
                        help="DOPD_KV_TRANSPORT of every worker (auto: NIXL where installed, else shared memory "
                             "on one host)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="dopd-bench-switch-"))
    spec = ClusterSpec(model=args.model, prefill=1, decode=2, port=free_port(), log_dir=log_dir, kv_blocks=1024,
                       planner="off", extra_env={"DOPD_KV_TRANSPORT": args.transport})
    log(f"cluster: {args.model}, 1 prefill + 2 decode workers, KV transport {args.transport}, logs in {log_dir}")
    cluster = Cluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(600)
        trials = asyncio.run(run(cluster, args))
    finally:
        cluster.stop()

    base, switched = trials[0], trials[1:]
    p2d = [t["p2d_ms"] for t in switched]
    d2p = [t["d2p_ms"] for t in switched]
    mb = [t["migrated_bytes"] / 1e6 for t in switched]
    rate = [t["migrated_bytes"] / 1e6 / (t["d2p_migration_ms"] / 1e3) for t in switched if t["d2p_migration_ms"]]
    step_ms = statistics.median(t["median_gap_ms"] for t in trials)
    report = Report()
    context = statistics.median(t["context"] for t in switched)
    s = f"{args.model} 1P+2D, {N_REQUESTS} running at ~{context:.0f} ctx, KV transport {args.transport}"
    report.add(Figure(s, "prefill -> decode p50", pct(p2d, 50), "ms", "<= 50 ms", at_most(pct(p2d, 50), 50)))
    report.add(Figure(s, "prefill -> decode p99", pct(p2d, 99), "ms"))
    report.add(Figure(s, "decode -> prefill p50 (incl. migration)", pct(d2p, 50), "ms", "<= 250 ms",
                      at_most(pct(d2p, 50), 250)))
    report.add(Figure(s, "decode -> prefill p99", pct(d2p, 99), "ms"))
    report.add(Figure(s, "requests migrated per switch", statistics.median(t["migrated"] for t in switched),
                      note=f"fell back to drain: {sum(t['fell_back'] for t in switched)} of {len(switched)}"))
    shared = sum(t["migrated_bytes_shared"] for t in switched) / max(1, sum(t["migrated_bytes"] for t in switched))
    report.add(Figure(s, "KV migrated per switch", statistics.median(mb), "MB",
                      note=f"{shared:.0%} read by the target out of the source's pool (shm)"))
    report.add(Figure(s, "migration rate", statistics.median(rate), "MB/s", note="median over switches"))
    report.add(Figure(s, "decode step (median gap between tokens)", step_ms, "ms"))
    worst_pause = max(max(t["pause_during_switch_ms"]) for t in switched)
    bound = max(t["longest_request_migration_ms"] for t in switched) + step_ms
    report.add(Figure(s, "longest client pause, no switch", base["max_gap_ms"], "ms"))
    report.add(Figure(s, "longest client pause across a switch", worst_pause, "ms",
                      "<= own migration + 1 step", at_most(worst_pause, bound),
                      note=f"bound: longest move of one request {bound - step_ms:.0f} ms + step {step_ms:.0f} ms"))
    table = report.table()
    table.title = f"in-place role switch: {args.model}"
    console.print(table)
    report.details["trials"] = {str(i): t for i, t in enumerate(trials)}
    if args.out:
        report.dump(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
