"""How far can `dopd simulate` (virtual time) be trusted? The same short workload through the
simulator and through the real services on the sim engine (`dopd up --engine sim`, time-scaled
under the harness ceiling), side by side: p50/p90/p99 TTFT and TPOT, and SLO attainment.
Goal: within 10% on p90 TTFT and TPOT, within 1 point of attainment.

The simulator's KV link is set to what the sim engine's harness really provides (loopback gRPC,
or NIXL with `--kv-transport nixl`: `--loopback-mbs` wall MB/s, times the time scale), so that
both sides move KV at the same speed; everything else (profile, split, pool, batch limits,
workload, seed) is the same.

    python benchmarks/bench_des_fidelity.py [--cases phase-shift,azure-conv] [--time-scale 10]
                                            [--kv-transport grpc|nixl] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import Figure, Report, at_most, console  # noqa: E402
from services.cli import main as dopd  # noqa: E402
from services.launcher import Cluster, ClusterSpec, free_port  # noqa: E402

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
CASES = {
    # name: (source args, rate, duration)
    "phase-shift": (["--workload", "phase-shift", "--burstiness", "0.5"], 3.0, 60.0),
    "azure-conv": (["--trace", str(TRACES / "azure_conv_10min.jsonl")], 3.0, 60.0),
}
METRICS = ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms")


def common_args(case: str, args) -> list[str]:
    source, rate, duration = CASES[case]
    return [*source, "--rate", str(rate), "--duration", str(duration), "--seed", "0", "--max-context", "8192",
            "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot), "--request-timeout", "60"]


def run_des(case: str, args, out: Path) -> dict:
    link_gbps = args.loopback_mbs * 8 / 1000 * args.time_scale
    rc = dopd(["simulate", "--profile", args.profile, "--workers", str(sum(args.split)), "--mode", "static",
               "--split", f"{args.split[0]}:{args.split[1]}", *common_args(case, args), "--kv-blocks",
               str(args.kv_blocks), "--max-batch-size", "256", "--prefill-token-budget", "8192",
               "--link-gbps", f"{link_gbps:g}", "--out", str(out), "--no-plots"])
    assert rc == 0, f"dopd simulate failed ({rc})"
    return json.loads((out / "results.json").read_text())


def run_sim_engine(case: str, args, out: Path) -> dict:
    spec = ClusterSpec(model=f"sim:{args.profile}", prefill=args.split[0], decode=args.split[1], port=free_port(),
                       log_dir=Path(tempfile.mkdtemp(prefix="dopd-fidelity-")), kv_blocks=args.kv_blocks,
                       time_scale=args.time_scale, planner="static",
                       extra_env={"DOPD_MAX_BATCH_SIZE": "256", "DOPD_PREFILL_TOKEN_BUDGET": "8192",
                                  "DOPD_KV_TIMEOUT_S": str(30 * args.time_scale),
                                  "DOPD_KV_TRANSPORT": args.kv_transport})
    cluster = Cluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(600)
        rc = dopd(["bench", "--target", cluster.gateway_address, *common_args(case, args), "--time-scale",
                   str(args.time_scale), "--out", str(out), "--no-progress"])
    finally:
        cluster.stop()
    assert rc == 0, f"dopd bench failed ({rc})"
    return json.loads((out / "results.json").read_text())


def reuse(out: Path) -> dict | None:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="phase-shift,azure-conv")
    parser.add_argument("--profile", default="llama3-8b-h100")
    parser.add_argument("--split", default="2:2", help="P:D, static on both sides")
    parser.add_argument("--kv-blocks", type=int, default=4096)
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--loopback-mbs", type=float, default=850.0,
                        help="KV MB per wall second over loopback gRPC (FACTS.md, bench_core); by NIXL, "
                             "bench_overhead.py's KV ceiling measured 1223")
    parser.add_argument("--kv-transport", default="grpc", help="the sim engine's DOPD_KV_TRANSPORT")
    parser.add_argument("--slo-ttft", type=float, default=300.0)
    parser.add_argument("--slo-tpot", type=float, default=40.0)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--work", type=Path, help="where each run's results go; a run whose results.json is "
                                                  "already there is not run again")
    args = parser.parse_args()
    args.split = tuple(int(x) for x in args.split.split(":"))
    work = args.work or Path(tempfile.mkdtemp(prefix="dopd-fidelity-out-"))
    report = Report()
    for case in args.cases.split(","):
        des = reuse(work / f"{case}-des") or run_des(case, args, work / f"{case}-des")
        real = reuse(work / f"{case}-sim") or run_sim_engine(case, args, work / f"{case}-sim")
        section = f"{case} {args.split[0]}P:{args.split[1]}D x{args.time_scale:g} {args.kv_transport}"
        for m in METRICS:
            a, b = des[m], real[m]
            off = None if not b else (a - b) / b
            gate = m.startswith("p90")
            report.add(Figure(section, f"{m}: des {a:.1f} vs sim engine {b:.1f}", None if off is None else off * 100,
                              "%", "|off| <= 10%" if gate else "", at_most(abs(off), 0.10) if gate and off is not None
                              else None))
        diff = (des["slo_attainment"] - real["slo_attainment"]) * 100
        report.add(Figure(section, f"attainment: des {des['slo_attainment']:.4f} vs sim engine "
                                   f"{real['slo_attainment']:.4f}", diff, "points", "|off| <= 1",
                          at_most(abs(diff), 1.0)))
        report.add(Figure(section, "harness under its ceiling (sim engine)", str(not real["harness"]["saturated"]),
                          note="; ".join(real["harness"].get("saturation_reasons", []))))
        report.details[case] = {"des": {k: des[k] for k in (*METRICS, "slo_attainment", "completed", "failed")},
                                "sim_engine": {k: real[k] for k in (*METRICS, "slo_attainment", "completed",
                                                                    "failed")}}
    table = report.table()
    table.title = "dopd simulate vs the sim engine (same workload, same split)"
    console.print(table)
    if args.out:
        report.dump(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
