"""One hour of both Azure LLM inference traces (conv + code, merged onto one clock) arriving at one
16-worker cluster, in virtual time (services/simulate): every static split P:(16-P), then the
dynamic planner started from the best of them; and the issue's speed goal, timed alone.

    python benchmarks/bench_des_azure_hour.py --rate R [--duration S] [--jobs 2] [--out DIR]

The cluster: profile llama3-8b-h100, 16384 KV blocks of 16 per worker, decode batch <= 256, prefill
budget 8192 tokens a forward (as docs/results/planner-des). SLOs TTFT 1000 ms, TPOT 50 ms:
  - TTFT: prompts reach 8k tokens; an 8k prefill alone takes ~270 ms and a 4.7k one ~150 ms on this
    profile, so 1 s leaves a long prompt room for one full 8192-token forward ahead of it plus its
    own, while a prefill queue that builds up for more than a second or two misses it;
  - TPOT: a full 256-sequence decode batch steps in ~41 ms at a mean context of 2k tokens and ~68 ms
    at 4k, so 50 ms holds while decode workers keep their batches (and contexts) moderate: too few
    decode workers, and it is missed.
Either pool can be the bottleneck, so the split matters; --rate rescales the merged trace (order
and relative gaps kept) so that the best static split is under real pressure.

The best static split: highest goodput (requests/s completed within both SLOs), ties by attainment.
The planner's run starts from it with the default predictor and policy (`dopd simulate --mode
dopd-no-policy`: the planner alone, which is what `--mode dopd` ran before the scheduling policy
joined it; `dopd bench compare --engine des` compares every mode).
The speed run is the issue's goal as stated: one hour of the conv trace alone, at its own rate,
16 workers, dopd mode (default 8:8 start), in at most 2 minutes of wall time on one core (one BLAS
thread); it runs after everything else, alone in this process (`--speed-only`: it and nothing
else). With --jobs 2 the static runs go two at a time, each on its own core: their sim/wall ratios
are then those of a shared machine.

Writes DIR/des_azure_hour.json (the table and the run settings; no per-request data) and
DIR/split_vs_rate.png (workers per role over time for dopd and the best static, against the
arrival rate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# One core means one BLAS thread: the planner's predictor (statsmodels) makes many tiny BLAS calls,
# and OpenBLAS's threads would both spread it over cores and wait on them (bench_predictors.py).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from common.profile import load_profile  # noqa: E402
from services.bench.metrics import summarize  # noqa: E402
from services.bench.trace import read_traces, scale_to_rate  # noqa: E402
from services.simulate.hardware import default_link_gbps  # noqa: E402
from services.simulate.sim import SimConfig, SimOutcome, simulate  # noqa: E402

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
CONV, CODE = TRACES / "AzureLLMInferenceTrace_conv.csv", TRACES / "AzureLLMInferenceTrace_code.csv"
PROFILE = "llama3-8b-h100"
WORKERS = 16
POOL = {"kv_blocks": 16384, "block_size": 16, "max_batch_size": 256, "prefill_token_budget": 8192}
SLO_TTFT_MS, SLO_TPOT_MS = 1000.0, 50.0
SPEED_GOAL_S = 120.0


def load(paths, rate: float | None, duration: float | None):
    """As `dopd simulate --trace`: merged, rescaled to `rate`, cut at `duration`."""
    requests = read_traces(paths)
    if rate is not None:
        requests = scale_to_rate(requests, rate)
    if duration is not None:
        requests = [r for r in requests if r.t < duration]
    return requests


def config(mode: str, split: tuple[int, int] | None) -> SimConfig:
    profile = load_profile(PROFILE)
    return SimConfig(profile=profile, workers=WORKERS, mode=mode, split=split,
                     link_gbps=default_link_gbps(profile), slo_ttft_s=SLO_TTFT_MS / 1e3,
                     slo_tpot_s=SLO_TPOT_MS / 1e3, **POOL)


def row(name: str, split: tuple[int, int] | None, out: SimOutcome) -> dict:
    """One line of the table: the run's metrics, its switches, and the host's time."""
    m = summarize(out.results, out.duration, SLO_TTFT_MS, SLO_TPOT_MS)
    return {"run": name, "split": list(split) if split else None, "requests": m["requests"],
            "completed": m["completed"], "goodput": m["goodput"], "attainment": m["slo_attainment"],
            "ttft_attainment": m["ttft_attainment"], "tpot_attainment": m["tpot_attainment"],
            "p90_ttft_ms": m["p90_ttft_ms"], "p90_tpot_ms": m["p90_tpot_ms"], "p99_ttft_ms": m["p99_ttft_ms"],
            "switches": len(out.switches), "migrated": sum(s["migrated"] for s in out.switches),
            "drained": sum(s["drained"] for s in out.switches), "sim_s": out.duration, "wall_s": out.wall_s,
            "cpu_s": out.cpu_s, "sim_to_wall": out.duration / out.wall_s if out.wall_s > 0 else None,
            "decision_s": out.decision_seconds, "events": out.events, "leaks": out.leaks}


def static_run(args: tuple) -> dict:
    """One static split (a process pool's task: arguments in, a table row out)."""
    paths, rate, duration, p = args
    out = simulate(load(paths, rate, duration), config("static", (p, WORKERS - p)))
    return row(f"static {p}:{WORKERS - p}", (p, WORKERS - p), out)


def best_of(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r["goodput"], r["attainment"] or 0.0))


def print_table(rows: list[dict]) -> None:
    head = (f"{'run':<14} {'goodput':>8} {'attain':>7} {'TTFT ok':>7} {'TPOT ok':>7} {'p90 TTFT':>9} "
            f"{'p90 TPOT':>9} {'switches':>8} {'migrated':>8} {'sim/wall':>8} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['run']:<14} {r['goodput']:8.2f} {r['attainment']:7.2%} {r['ttft_attainment']:7.2%} "
              f"{r['tpot_attainment']:7.2%} {_ms(r['p90_ttft_ms']):>9} {_ms(r['p90_tpot_ms']):>9} "
              f"{r['switches']:8d} {r['migrated']:8d} {r['sim_to_wall']:7.1f}x {r['wall_s']:7.1f}", flush=True)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def plot(requests, runs: dict[str, SimOutcome], path: Path) -> None:
    """Arrivals per `width` s, and the serving workers of each role over time for each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = max(r.t for r in requests)
    width = max(1.0, round(span / 300))  # ~300 bars
    counts = [0] * (int(span // width) + 1)
    for r in requests:
        counts[int(r.t // width)] += 1
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    ax0.bar([i * width for i in range(len(counts))], [c / width for c in counts], width=width, align="edge",
            alpha=0.6)
    ax0.set_ylabel(f"arrivals / s (per {width:g} s)")
    for (name, out), color in zip(runs.items(), ("tab:blue", "tab:gray"), strict=False):
        ts = [s.t for s in out.samples]
        ax1.step(ts, [s.prefill_workers for s in out.samples], where="post", color=color,
                 label=f"{name}: prefill workers")
        ax1.step(ts, [s.decode_workers for s in out.samples], where="post", color=color, linestyle="--",
                 label=f"{name}: decode workers")
    ax1.set_ylabel("serving workers (switching ones in neither)")
    ax1.set_xlabel("virtual time (s)")
    ax1.set_ylim(0, WORKERS)
    ax1.legend(loc="upper right")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def speed_run() -> dict:
    """The issue's goal: one hour of the conv trace, own rate, 16 workers, dopd mode."""
    requests = load([CONV], None, None)
    out = simulate(requests, config("dopd", None))
    r = row("speed: conv 1 h dopd 8:8", (8, 8), out)
    r["goal_wall_s"] = SPEED_GOAL_S
    r["met"] = out.wall_s <= SPEED_GOAL_S
    return r


def print_speed(speed: dict) -> None:
    print(f"speed (goal: <= {SPEED_GOAL_S:g} s wall on one core): {speed['requests']} requests of conv, own rate, "
          f"dopd from 8:8: {speed['sim_s']:.0f} s simulated in {speed['wall_s']:.1f} s wall ({speed['cpu_s']:.1f} s "
          f"CPU, of which planner decisions {speed['decision_s']:.1f} s): {speed['sim_to_wall']:.1f}x real time, "
          f"{'met' if speed['met'] else 'NOT met'}; {speed['switches']} switches, attainment "
          f"{speed['attainment']:.2%}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, help="rescale the merged trace to this mean rate, req/s "
                                                   "(default: the traces' own)")
    parser.add_argument("--duration", type=float, help="seconds of trace (default: all of it, one hour)")
    parser.add_argument("--splits", default=f"1-{WORKERS - 1}", help="static prefill counts, e.g. 1-15 or 2,3,4")
    parser.add_argument("--jobs", type=int, default=1, help="static runs at a time (processes)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed run")
    parser.add_argument("--speed-only", action="store_true", help="only the speed run (prints, writes nothing)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/des_azure_hour"))
    args = parser.parse_args()
    if args.speed_only:
        print_speed(speed_run())
        return 0
    if "-" in args.splits:
        lo, hi = (int(x) for x in args.splits.split("-"))
        splits = list(range(lo, hi + 1))
    else:
        splits = [int(x) for x in args.splits.split(",")]
    paths = [CONV, CODE]
    requests = load(paths, args.rate, args.duration)
    span = max(r.t for r in requests)
    print(f"{len(requests)} requests (conv + code) over {span:.0f} s: {len(requests) / span:.2f} req/s "
          f"({'rescaled with --rate' if args.rate else 'own rate'}); {WORKERS} workers, {PROFILE}, {POOL}, "
          f"SLO TTFT {SLO_TTFT_MS:g} ms TPOT {SLO_TPOT_MS:g} ms; static splits {splits}, {args.jobs} at a time",
          flush=True)

    t0 = time.perf_counter()
    tasks = [(paths, args.rate, args.duration, p) for p in splits]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            static = list(pool.map(static_run, tasks))
    else:
        static = [static_run(t) for t in tasks]
    print(f"static sweep: {time.perf_counter() - t0:.0f} s wall", flush=True)
    print_table(static)
    best = best_of(static)
    split = tuple(best["split"])
    print(f"best static: {best['run']} (goodput {best['goodput']:.2f} req/s, attainment {best['attainment']:.2%})",
          flush=True)

    # Rerun the best static here for its timeline (the pool's workers return rows, not samples).
    best_out = simulate(requests, config("static", split))
    dopd_out = simulate(requests, config("dopd-no-policy", split))
    dopd = row(f"dopd from {split[0]}:{split[1]}", split, dopd_out)
    print()
    print_table([best, dopd])
    print(f"dopd run: {dopd['wall_s']:.1f} s wall ({dopd['cpu_s']:.1f} s CPU, planner decisions "
          f"{dopd['decision_s']:.1f} s) for {dopd['sim_s']:.0f} s simulated: {dopd['sim_to_wall']:.1f}x real time; "
          f"{dopd['switches']} switches, {dopd['migrated']} requests migrated, {dopd['drained']} finished in place",
          flush=True)
    for r in [*static, dopd]:
        if r["leaks"]:
            print(f"error: {r['run']}: leak check failed: {r['leaks']}", file=sys.stderr)
    plot(requests, {dopd["run"]: dopd_out, f"best static {split[0]}:{split[1]}": best_out},
         args.out / "split_vs_rate.png")

    speed = None
    if not args.no_speed:
        speed = speed_run()
        print()
        print_speed(speed)

    doc = {"traces": [str(p) for p in paths], "rate": args.rate, "duration_s": args.duration,
           "requests": len(requests), "profile": PROFILE, "workers": WORKERS, **POOL,
           "slo_ttft_ms": SLO_TTFT_MS, "slo_tpot_ms": SLO_TPOT_MS, "jobs": args.jobs, "static": static,
           "best_static": best["run"], "dopd": dopd, "speed": speed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "des_azure_hour.json").write_text(json.dumps(doc, indent=1))
    print(f"-> {args.out / 'des_azure_hour.json'}, {args.out / 'split_vs_rate.png'}")
    return 1 if any(r["leaks"] for r in [*static, dopd]) else 0


if __name__ == "__main__":
    sys.exit(main())
