"""Offered load at 3x what the cluster can serve, on the real services (sim engine): the admitted
requests should still meet their SLOs, the rest be refused at once, and memory stay flat.

    python benchmarks/bench_overload.py [--profile smollm2-cpu2] [--workers 4] [--factor 3] [--duration 40]
                                        [--time-scale 1] [--out DIR]

1. Capacity, in virtual time (services/simulate, the same pure cores): the `mix` workload on the
   same cluster in dopd mode with admission control off, at rising rates; the capacity C is the
   highest rate whose SLO attainment is still >= 90% (a bisection between the last rate that
   held and the first that did not).
2. The real services (`dopd up --engine sim`, services/launcher.py: gateway in dopd mode, with
   the scheduling policy's admission control, the dynamic planner, sim workers on the profile
   (default smollm2-cpu2, SmolLM2 as measured on this machine's CPUs: its capacity is within what
   one gateway and loopback gRPC carry here at 3x, which a GPU profile's is not) run
   `--time-scale` times slower, own redis-server): a warm-up at C, then `--factor` x C for
   `--duration` profile seconds (`dopd bench`'s runner, open loop, seeded).
   Reported: requests offered, completed (admitted) and refused (RESOURCE_EXHAUSTED) and how fast
   the refusals came; the admitted requests' attainment, p90 TTFT and TPOT, and rate against C;
   each process's resident memory before and after the overload.

Times are profile seconds unless marked wall. Writes DIR/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common.profile import load_profile  # noqa: E402
from services.bench.metrics import meets_slo, summarize  # noqa: E402
from services.bench.runner import RunSettings, run_load  # noqa: E402
from services.bench.workloads import generate  # noqa: E402
from services.launcher import Cluster, ClusterSpec, free_port, rss_table  # noqa: E402
from services.simulate.hardware import default_link_gbps  # noqa: E402
from services.simulate.sim import SimConfig, simulate  # noqa: E402

TARGET_ATTAINMENT = 0.90


def pool(args) -> dict:
    return {"kv_blocks": args.kv_blocks, "max_batch_size": args.max_batch_size,
            "prefill_token_budget": args.prefill_token_budget}


def des_attainment(args, rate: float) -> float:
    profile = load_profile(args.profile)
    cfg = SimConfig(profile=profile, workers=args.workers, mode="dopd", admission=False,
                    link_gbps=default_link_gbps(profile), slo_ttft_s=args.slo_ttft / 1e3,
                    slo_tpot_s=args.slo_tpot / 1e3, **pool(args))
    requests = generate("mix", rate, args.duration, seed=args.seed, max_context=args.max_context)
    out = simulate(requests, cfg)
    return summarize(out.results, out.duration, args.slo_ttft, args.slo_tpot)["slo_attainment"] or 0.0


def capacity(args) -> float:
    """The highest rate (req/s, to 5%) at which the DES keeps attainment >= TARGET_ATTAINMENT."""
    lo, hi = 0.0, 1.0
    while (a := des_attainment(args, hi)) >= TARGET_ATTAINMENT:
        print(f"  DES at {hi:6.2f} req/s: attainment {a:.1%}")
        lo, hi = hi, hi * 2
    print(f"  DES at {hi:6.2f} req/s: attainment {a:.1%}")
    while hi - lo > 0.05 * hi:
        mid = (lo + hi) / 2
        a = des_attainment(args, mid)
        print(f"  DES at {mid:6.2f} req/s: attainment {a:.1%}")
        lo, hi = (mid, hi) if a >= TARGET_ATTAINMENT else (lo, mid)
    return lo


def pct(xs, q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


async def load(args, cluster: Cluster, rate: float, duration: float, seed: int):
    requests = generate("mix", rate, duration, seed=seed, max_context=args.max_context)
    settings = RunSettings(target=cluster.gateway_address, time_scale=args.time_scale, seed=seed,
                           request_timeout=args.request_timeout, progress=False)
    return requests, await run_load(requests, settings)


def describe(args, name: str, rate: float, duration: float, requests, outcome, cap: float) -> dict:
    results = outcome.results
    done = [r for r in results if r.ok]
    refused = [r for r in results if r.error == "RESOURCE_EXHAUSTED"]
    other = [r for r in results if not r.ok and r.error != "RESOURCE_EXHAUSTED"]
    good = [r for r in done if meets_slo(r, args.slo_ttft, args.slo_tpot)]
    summary = summarize(results, outcome.duration, args.slo_ttft, args.slo_tpot)
    refusal = [r.error_after for r in refused if r.error_after is not None]
    doc = {"offered_rate": rate, "offered": len(requests), "completed": len(done), "refused": len(refused),
           "other_failures": len(other), "other_errors": sorted({r.error for r in other}),
           "admitted_attainment": len(good) / len(done) if done else None,
           "admitted_rate": len(done) / duration, "capacity": cap,
           "refusal_p50_s": pct(refusal, 50), "refusal_p99_s": pct(refusal, 99),
           "refusal_max_s": max(refusal, default=None),
           "ttft_p90_s": seconds(summary["p90_ttft_ms"]), "tpot_p90_s": seconds(summary["p90_tpot_ms"]),
           "goodput": summary["goodput"], "attainment_of_offered": summary["slo_attainment"]}
    print(f"\n{name}: offered {len(requests)} requests at {rate:.2f} req/s ({rate / cap:.1f}x capacity) over "
          f"{duration:g} s")
    print(f"  completed {len(done)} ({doc['admitted_rate']:.2f} req/s, {doc['admitted_rate'] / cap:.2f}x capacity); "
          f"refused {len(refused)} (RESOURCE_EXHAUSTED); other failures {len(other)} {doc['other_errors']}")
    print(f"  refusals came after p50 {fmt_ms(doc['refusal_p50_s'])}, p99 {fmt_ms(doc['refusal_p99_s'])}, "
          f"max {fmt_ms(doc['refusal_max_s'])} (profile time; x{args.time_scale:g} on the wall clock)")
    doc["refusals_by_reason"] = refusal_reasons(refused)
    for reason, f in doc["refusals_by_reason"].items():
        print(f"    {f['count']:4d} x {reason}: after p50 {fmt_ms(f['p50_s'])}, max {fmt_ms(f['max_s'])}")
    att = doc["admitted_attainment"]
    print(f"  admitted requests within both SLOs: {'-' if att is None else f'{att:.1%}'}; p90 TTFT "
          f"{fmt_ms(doc['ttft_p90_s'])} (SLO {args.slo_ttft:g} ms), p90 TPOT {fmt_ms(doc['tpot_p90_s'])} "
          f"(SLO {args.slo_tpot:g} ms); goodput {doc['goodput']:.2f} req/s")
    return doc


def refusal_reasons(refused) -> dict:
    """The refusals grouped by what the server said (its message up to the first figure or colon
    clause: the kind of refusal, not its numbers), each with how many and how fast."""
    groups: dict[str, list[float]] = {}
    for r in refused:
        words = []
        for word in (r.error_detail or "(no message)").split():
            if any(ch.isdigit() for ch in word):
                break
            words.append(word)
        groups.setdefault(" ".join(words).rstrip(":;,") or "(numbers only)", []).append(r.error_after or 0.0)
    return {reason: {"count": len(ts), "p50_s": pct(ts, 50), "max_s": max(ts)}
            for reason, ts in sorted(groups.items(), key=lambda kv: -len(kv[1]))}


def memory_table(before: dict, after: dict) -> dict:
    print("  resident memory (MiB) before -> after the overload:")
    lines, growth = rss_table(before, after)
    for line in lines:
        print("    " + line)
    if growth:
        worst = max(growth, key=growth.get)
        print(f"    largest growth: {worst} {growth[worst]:+.1%}")
    return growth


async def main_async(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"capacity of {args.workers} workers ({args.profile}, mix, dopd mode without admission control, SLO "
          f"{args.slo_ttft:g}/{args.slo_tpot:g} ms), virtual time:")
    cap = args.capacity or capacity(args)
    print(f"capacity C = {cap:.2f} req/s (attainment >= {TARGET_ATTAINMENT:.0%} in the DES)")
    spec = ClusterSpec(model=f"sim:{args.profile}", prefill=args.workers // 2, decode=args.workers - args.workers // 2,
                       port=free_port(), http_port=0, log_dir=out / "logs",
                       redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_prefix="dopd-overload:",
                       kv_blocks=args.kv_blocks, time_scale=args.time_scale, planner="dynamic", mode="dopd",
                       slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot,
                       extra_env={"DOPD_PREFILL_TOKEN_BUDGET": str(args.prefill_token_budget),
                                  "DOPD_MAX_BATCH_SIZE": str(args.max_batch_size)})
    cluster = Cluster(spec)
    cluster.start()
    doc = {"settings": vars(args), "capacity": cap}
    try:
        await asyncio.to_thread(cluster.wait_ready, 600)
        t0 = time.monotonic()
        requests, outcome = await load(args, cluster, cap, args.warmup, args.seed + 1)
        doc["warmup"] = describe(args, "warm-up at capacity", cap, args.warmup, requests, outcome, cap)
        before = cluster.memory()
        rate = args.factor * cap
        requests, outcome = await load(args, cluster, rate, args.duration, args.seed)
        doc["overload"] = describe(args, f"overload at {args.factor:g}x", rate, args.duration, requests, outcome, cap)
        await asyncio.sleep(2.0)
        after = cluster.memory()
        doc["rss_kib_before"] = {n: v[1] for n, v in before.items()}
        doc["rss_kib_after"] = {n: v[1] for n, v in after.items()}
        doc["rss_growth"] = memory_table(before, after)
        print(f"  wall time {time.monotonic() - t0:.0f} s")
    finally:
        cluster.stop()
    (out / "overload.json").write_text(json.dumps(doc, indent=1))
    print(f"-> {out / 'overload.json'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="smollm2-cpu2", help="the sim workers' latency profile")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of the capacity")
    p.add_argument("--capacity", type=float, default=0.0, help="req/s; default: found in the DES")
    p.add_argument("--duration", type=float, default=60.0, help="profile seconds of overload")
    p.add_argument("--warmup", type=float, default=20.0, help="profile seconds at capacity first")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--kv-blocks", type=int, default=2048)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--prefill-token-budget", type=int, default=512)
    # SLOs a CPU can meet for mix's summaries (prompts up to 2k tokens): 5 s to the first token.
    p.add_argument("--slo-ttft", type=float, default=5000.0, help="ms")
    p.add_argument("--slo-tpot", type=float, default=300.0, help="ms")
    # Long enough for mix's longest output (512 tokens) at the TPOT SLO: a deadline miss is then
    # a request that waited, not one that was simply long.
    p.add_argument("--request-timeout", type=float, default=300.0, help="profile seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/overload")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
