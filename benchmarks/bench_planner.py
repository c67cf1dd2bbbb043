"""Does the planner earn its keep? The same workload, on the same simulated GPU cluster (the sim
engine: the real services, forward passes timed by a latency profile, real-size KV on the wire),
served with a static split and with the dynamic planner switching roles in place.

For each mode: bring up the cluster (`dopd up --engine sim`), run `dopd bench` on it, take it
down. Then print attainment, goodput, p90 TTFT/TPOT and role switches side by side, and plot the
P/D split against the arrival rate over time.

    python benchmarks/bench_planner.py --workers 16 --profile llama3-8b-h100 --workload phase-shift \\
        --rate 6 --duration 30 --time-scale 15 --slo-ttft 300 --slo-tpot 40 --static-split 1:15 \\
        --out docs/results/bench-planner
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.report import console  # noqa: E402
from services.cli import main as dopd  # noqa: E402
from services.client import planner_plan  # noqa: E402
from services.launcher import Cluster, ClusterSpec, free_port  # noqa: E402


def run_mode(mode: str, split: tuple[int, int], args) -> dict:
    out = args.out / mode
    spec = ClusterSpec(model=f"sim:{args.profile}", prefill=split[0], decode=split[1], port=free_port(),
                       log_dir=Path(tempfile.mkdtemp(prefix=f"dopd-planner-{mode}-")), kv_blocks=args.kv_blocks,
                       time_scale=args.time_scale, planner="dynamic" if mode == "dynamic" else "static",
                       predictor=args.predictor, slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot,
                       extra_env={"DOPD_MAX_BATCH_SIZE": "256", "DOPD_PREFILL_TOKEN_BUDGET": "8192",
                                  "DOPD_KV_TIMEOUT_S": str(30 * args.time_scale),
                                  "DOPD_COOLDOWN_S": str(args.cooldown)})
    console.print(f"[bold]{mode}[/bold]: {split[0]}P:{split[1]}D on sim:{args.profile}, logs in {spec.log_dir}")
    cluster = Cluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(600)
        rc = dopd(["bench", "--target", cluster.gateway_address, "--workload", args.workload, "--rate", str(args.rate),
                   "--duration", str(args.duration), "--burstiness", str(args.burstiness), "--seed", str(args.seed),
                   "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot), "--time-scale",
                   str(args.time_scale), "--max-context", str(args.max_context), "--request-timeout",
                   str(args.request_timeout), "--out", str(out), "--no-progress"])
        import asyncio

        plan = asyncio.run(planner_plan(cluster.proc("planner").address))
    finally:
        cluster.stop()
    results = json.loads((out / "results.json").read_text())
    results["bench_rc"] = rc
    results["plan"] = plan
    return results


def first_phase_split(args) -> tuple[int, int]:
    """The static split that is best for the workload's first phase: the split our own core
    (services/planner/split.py) computes for that phase's length mix at a rate that saturates the
    cluster, i.e. the split that balances prefill and decode load for that mix (DistServe's
    placement, for the first phase)."""
    from common.load import SLO, LengthDist, LoadForecast
    from common.profile import load_profile
    from services.bench.workloads import generate
    from services.planner.split import compute_split

    reqs = generate(args.workload, rate=args.rate, duration=args.duration * 20, seed=args.seed,
                    burstiness=args.burstiness, max_context=args.max_context)
    first = [r for r in reqs if r.t < args.duration * 20 * 0.2] or reqs  # phase-shift: its first fifth
    forecast = LoadForecast(1000.0, LengthDist.from_samples([r.prompt_tokens for r in first]),
                            LengthDist.from_samples([r.output_tokens for r in first]))
    split = compute_split(forecast, load_profile(args.profile), SLO(args.slo_ttft / 1e3, args.slo_tpot / 1e3),
                          args.workers, kv_blocks=args.kv_blocks, block_size=16, max_batch_size=256,
                          prefill_token_budget=8192)
    return split.prefill, split.decode


def plot_split(runs: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(len(runs) + 1, 1, figsize=(12, 3 + 2.5 * len(runs)), sharex=True)
    first = next(iter(runs.values()))
    arrivals = first["timeline"]["arrivals_per_s"]
    axes[0].bar([i + 0.5 for i in range(len(arrivals))], arrivals, width=1.0, alpha=0.6)
    axes[0].set_ylabel("arrivals / s")
    axes[0].set_title("arrival rate (profile time)")
    for ax, (mode, r) in zip(axes[1:], runs.items(), strict=True):
        samples = [s for s in r["timeline"]["samples"] if s.get("error") is None]
        ts = [s["t"] for s in samples]
        ax.step(ts, [s["prefill_workers"] for s in samples], where="post", label="prefill workers", linewidth=2)
        ax.step(ts, [s["decode_workers"] for s in samples], where="post", label="decode workers", linestyle="--")
        ax.set_ylabel("workers")
        ax.set_title(f"{mode}: attainment {r['slo_attainment']:.3f}, goodput {r['goodput']:.2f} req/s")
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s, profile)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--profile", default="llama3-8b-h100")
    parser.add_argument("--workload", default="phase-shift")
    parser.add_argument("--rate", type=float, default=6.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--burstiness", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-scale", type=float, default=15.0)
    parser.add_argument("--slo-ttft", type=float, default=300.0)
    parser.add_argument("--slo-tpot", type=float, default=40.0)
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--kv-blocks", type=int, default=4096)
    parser.add_argument("--predictor", default="arima")
    parser.add_argument("--cooldown", type=float, default=2.0, help="planner cooldown, profile seconds")
    parser.add_argument("--static-split", default="auto",
                        help="P:D of the static run and the dynamic start; auto: the best for the first phase")
    parser.add_argument("--modes", default="static,dynamic")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p, d = first_phase_split(args) if args.static_split == "auto" else (int(x) for x in args.static_split.split(":"))
    if p + d != args.workers:
        parser.error(f"--static-split {args.static_split} is not {args.workers} workers")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs = {mode: run_mode(mode, (p, d), args) for mode in args.modes.split(",")}
    rows = []
    for mode, r in runs.items():
        switches = [s for s in (r["plan"] or {}).get("recent_switches", []) if s.get("ok")]
        rows.append({"mode": mode, "split_start": f"{p}P:{d}D", "completed": r["completed"], "failed": r["failed"],
                     "requests": r["requests"], "slo_attainment": r["slo_attainment"], "goodput": r["goodput"],
                     "p90_ttft_ms": r["p90_ttft_ms"], "p90_tpot_ms": r["p90_tpot_ms"],
                     "p99_ttft_ms": r["p99_ttft_ms"], "role_switches": len(switches),
                     "harness_saturated": r["harness"]["saturated"]})
    for row in rows:
        console.print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    plot_split(runs, args.out / "split_vs_rate.png")
    (args.out / "summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows, "wall_s": time.time() - started}, indent=2))
    console.print(f"wrote {args.out / 'summary.json'} and {args.out / 'split_vs_rate.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
