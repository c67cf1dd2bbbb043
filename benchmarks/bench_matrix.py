"""The matrix DOPD is judged on: each workload under each SLO regime, every mode's DistServe rate
goodput (the highest rate with >= 90% of requests within every SLO, bisected to 5%) per GPU, in
the simulator (`dopd bench compare --engine des --sweep-from`), and dopd's ratio to the best fixed
design in hindsight (static at its best split, aggregated at its best budget) and to the peers as
their users run them (aggregated at vLLM's budget, static-apriori).

    python benchmarks/bench_matrix.py [--out docs/results/matrix] [--workers 16] [--duration 120]
                                      [--workloads phase-shift,mix,azure,mooncake] [--regimes loose,tight,stall]
                                      [--sweep-runs 10] [--sweep-splits 3]

Engine settings as in the committed H100 comparisons: 4,096 KV blocks, batches of up to 256,
8,192 prompt tokens a prefill forward. Workloads: phase-shift and mix (seed 7, burstiness 0.3),
generated; the Azure conv + code 10-minute cuts together, and the Mooncake 10-minute slice, from
../shared/traces (each rescaled to the rate the search asks for). SLO regimes, from the profile
(printed with the reason):
- loose: TTFT 1000 ms, TPOT 50 ms;
- tight: TTFT 1000 ms, TPOT at a decode step of 64 requests at 2,048 tokens of context, rounded up:
  a full batch of long contexts just meets it, so a design must keep its decode batches lean;
- stall: loose plus a p99 inter-token gap (each request's) of twice that step: a decode step that
  carries a 2,048-token prompt chunk breaks it, one with a 512-token chunk does not.

Writes OUT/matrix.json, OUT/matrix.md, OUT/dopd_ratio.png (the heat map of dopd's ratio to the best
fixed design) and each cell's comparison under OUT/<workload>-<regime>/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.profile import load_profile  # noqa: E402
from services.cli import main as dopd  # noqa: E402

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
WORKLOADS = {
    "phase-shift": ["--workload", "phase-shift"],
    "mix": ["--workload", "mix", "--seed", "7", "--burstiness", "0.3"],
    "azure": ["--trace", str(TRACES / "azure_conv_10min.jsonl"), str(TRACES / "azure_code_10min.jsonl")],
    "mooncake": ["--trace", str(TRACES / "mooncake_conv_10min.jsonl")],
}
MODES = "aggregated,aggregated-best,static,static-apriori,dopd"
# An H100 engine's settings, as in the committed 16-worker comparisons (docs/results/compare-des-*).
ENGINE = ["--kv-blocks", "4096", "--max-batch-size", "256", "--prefill-token-budget", "8192"]
FIXED = ("static", "aggregated", "aggregated-best")
PEERS = ("aggregated", "static-apriori")


def regimes(profile_name: str) -> dict[str, dict]:
    """The SLO regimes, the tight and stall values from the profile, each with its reason."""
    p = load_profile(profile_name)
    step = p.decode_step_time(64, 2048) * 1e3
    tight = float(math.ceil(step))
    return {
        "loose": {"ttft": 1000.0, "tpot": 50.0, "itl": None, "why": "TTFT 1 s, TPOT 50 ms"},
        "tight": {"ttft": 1000.0, "tpot": tight, "itl": None,
                  "why": f"TPOT {tight:g} ms: a decode step of 64 requests at 2,048 tokens takes {step:.1f} ms"},
        "stall": {"ttft": 1000.0, "tpot": 50.0, "itl": 2 * tight,
                  "why": (f"p99 gap {2 * tight:g} ms: a step with a 2,048-token chunk takes "
                          f"{p.mixed_step_time(64, 2048, 2048) * 1e3:.0f} ms, with a 512-token chunk "
                          f"{p.mixed_step_time(64, 2048, 512) * 1e3:.0f} ms (64 decodes at 2,048)")},
    }


def cell_argv(workload: str, regime: dict, args, out: Path, sweep_from: float) -> list[str]:
    argv = ["bench", "compare", "--modes", MODES, "--engine", "des", "--profile", args.profile,
            "--workers", str(args.workers), *WORKLOADS[workload], "--max-context", "8192", *ENGINE,
            *(["--decode-queue-limit", str(args.decode_queue_limit)] if args.decode_queue_limit is not None else []),
            "--slo-ttft", f"{regime['ttft']:g}", "--slo-tpot", f"{regime['tpot']:g}",
            "--sweep-from", f"{sweep_from:g}", "--sweep-runs", str(args.sweep_runs),
            "--sweep-splits", str(args.sweep_splits), "--out", str(out), "--no-progress"]
    if regime["itl"] is not None:
        argv += ["--slo-itl", f"{regime['itl']:g}"]
    if WORKLOADS[workload][0] == "--workload":
        argv += ["--duration", f"{args.duration:g}", "--rate", f"{sweep_from:g}"]
    else:
        argv += ["--rate", f"{sweep_from:g}"]
    return argv


def summarize_cell(doc: dict) -> dict:
    modes = doc["modes"]
    rate = {m: modes[m].get("goodput_rate_per_gpu") for m in modes}
    fixed = max((rate[m] or 0.0) for m in FIXED if m in rate)
    best_fixed = max((m for m in FIXED if m in rate), key=lambda m: rate[m] or 0.0)
    dopd = rate.get("dopd") or 0.0
    return {"goodput_rate_per_gpu": rate, "best_fixed": best_fixed,
            "dopd_vs_best_fixed": dopd / fixed if fixed else None,
            "dopd_vs_peers": {p: (dopd / rate[p] if rate.get(p) else None) for p in PEERS if p in rate},
            "static_split": modes["static"].get("split"), "static_apriori_split": modes["static-apriori"].get("split"),
            "aggregated_best_budget": modes["aggregated-best"].get("chunk_tokens")}


def fixed_sweep_dir(doc: dict, mode: str) -> str:
    """The sweep directory of `mode`'s best run (by its rate goodput): static's split, aggregated-best's budget."""
    sweeps = doc["modes"][mode].get("sweeps") or []
    top = max(sweeps, key=lambda s: s["goodput_rate"] or 0.0) if sweeps else {}
    if mode == "static" and top.get("split"):
        p, d = top["split"].split(":")
        return f"static-{p}p{d}d"
    if mode == "aggregated-best" and top.get("chunk_tokens"):
        return f"aggregated-best-{top['chunk_tokens']}"
    return mode


def churn(cell_dir: Path, doc: dict, best_fixed: str) -> dict | None:
    """At the highest rate both swept where the best fixed design met >= 99% of requests, dopd's
    p99 TTFT against that design's (the issue's no-churn check: within 10%) and its role switches."""
    fixed_dir = cell_dir / "sweeps" / fixed_sweep_dir(doc, best_fixed)
    dopd_dir = cell_dir / "sweeps" / "dopd"
    best = None
    for path in fixed_dir.glob("rate-*/results.json"):
        fixed = json.loads(path.read_text())
        ours = dopd_dir / path.parent.name / "results.json"
        if (fixed["slo_attainment"] or 0.0) < 0.99 or not ours.exists():
            continue
        rate = float(path.parent.name.removeprefix("rate-"))
        if best is None or rate > best[0]:
            best = (rate, fixed, json.loads(ours.read_text()))
    if best is None:
        return None
    rate, fixed, ours = best
    ratio = ours["p99_ttft_ms"] / fixed["p99_ttft_ms"] if fixed["p99_ttft_ms"] else None
    sim = ours.get("simulation", {})
    # Why each switch was made: the configuration core's choice (its record says the predicted rates),
    # the split's forecast move, or an emergency (a queue or KV the forecast did not foresee).
    reasons = Counter(s["reason"].split(":")[0] for s in sim.get("switches", []))
    return {"rate": rate, "design": fixed_sweep_dir(doc, best_fixed), "design_p99_ttft_ms": fixed["p99_ttft_ms"],
            "dopd_p99_ttft_ms": ours["p99_ttft_ms"], "ratio": ratio, "within_10pct": ratio is not None and ratio <= 1.1,
            "dopd_switches": len(sim.get("switches", [])), "switch_reasons": dict(reasons),
            "configurations": [f"{c['target']} at {c['t']:.0f} s ({c['why']})" for c in sim.get("configurations", [])]}


def markdown(matrix: dict) -> str:
    lines = ["# The DOPD matrix: DistServe rate goodput per GPU in the simulator", "",
             f"Command: `{matrix['command']}`; {matrix['workers']} workers, profile {matrix['profile']}, "
             + (f"{matrix['minutes']:.1f} min here." if matrix.get("minutes") is not None
                else "stopped before the end."), "",
             "SLO regimes: " + "; ".join(f"**{k}**: {v['why']}" for k, v in matrix["regimes"].items()), "",
             "| workload | regime | aggregated (vLLM 2048) | aggregated-best | static (hindsight) | static-apriori "
             "| dopd | dopd / best fixed | dopd / aggregated | dopd / static-apriori |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ratios = []
    for cell in matrix["cells"].values():
        r = cell["goodput_rate_per_gpu"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        ratio = cell["dopd_vs_best_fixed"]
        if ratio:
            ratios.append(ratio)
        peers = cell["dopd_vs_peers"]
        lines.append(f"| {cell['workload']} | {cell['regime']} | {fmt(r.get('aggregated'))} | "
                     f"{fmt(r.get('aggregated-best'))} ({cell['aggregated_best_budget']}) | "
                     f"{fmt(r.get('static'))} ({cell['static_split']}) | {fmt(r.get('static-apriori'))} "
                     f"({cell['static_apriori_split']}) | {fmt(r.get('dopd'))} | {fmt(ratio)}x | "
                     f"{fmt(peers.get('aggregated'))}x | {fmt(peers.get('static-apriori'))}x |")
    if ratios:
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        lines += ["", f"dopd against the best fixed design: geometric mean {geo:.3f}x over {len(ratios)} cells, "
                      f"lowest {min(ratios):.3f}x (the goal: >= 1.0x in every cell, >= 1.15x geometric mean)."]
    churned = {k: c["churn"] for k, c in matrix["cells"].items() if c.get("churn")}
    if churned:
        lines += ["", "No churn: at the highest swept rate where the best fixed design met >= 99% of requests, "
                      "dopd's p99 TTFT against that design's (the goal: within 10%), and the role switches dopd made "
                      "there, by reason (configuration: the configuration core's choice, each with a predicted gain "
                      "in its record; forecast: the split's move; emergency: a queue or KV pressure the forecast "
                      "missed).", "", "| cell | rate req/s | design | its p99 TTFT ms | dopd p99 TTFT ms | ratio | "
                      "dopd switches | by reason |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {k} | {c['rate']:g} | {c['design']} | {c['design_p99_ttft_ms']:.1f} | "
                  f"{c['dopd_p99_ttft_ms']:.1f} | {c['ratio']:.2f}x | {c['dopd_switches']} | "
                  + (", ".join(f"{n} {r}" for r, n in sorted(c.get("switch_reasons", {}).items())) or "-") + " |"
                  for k, c in churned.items()]
    return "\n".join(lines) + "\n"


def heat_map(matrix: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(c["workload"] for c in matrix["cells"].values()))
    regs = list(dict.fromkeys(c["regime"] for c in matrix["cells"].values()))
    grid = [[(matrix["cells"].get(f"{w}/{r}") or {}).get("dopd_vs_best_fixed") or float("nan") for r in regs]
            for w in workloads]
    fig, ax = plt.subplots(figsize=(1.8 * len(regs) + 2, 0.8 * len(workloads) + 1.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.5)
    ax.set_xticks(range(len(regs)), regs)
    ax.set_yticks(range(len(workloads)), workloads)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v != v else f"{v:.2f}x", ha="center", va="center")
    ax.set_title("dopd rate goodput / best fixed design")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def assembled(out: Path) -> dict:
    """A matrix whose run was stopped before it wrote matrix.json: its finished cells (those with
    a compare.json), said to be partial."""
    cells, first = {}, None
    for cell_dir in sorted(p for p in out.iterdir() if (p / "compare.json").exists()):
        doc = json.loads((cell_dir / "compare.json").read_text())
        first = first or doc
        workload, name = cell_dir.name.rsplit("-", 1)
        cell = summarize_cell(doc)
        cells[f"{workload}/{name}"] = {"workload": workload, "regime": name, **cell}
    if first is None:
        raise SystemExit(f"{out}: no finished cell")
    profile = first["config"]["profile"]
    names = sorted({c["regime"] for c in cells.values()}, key=["loose", "tight", "stall"].index)
    return {"command": f"python benchmarks/bench_matrix.py --out {out} ... (stopped: its {len(cells)} finished cells)",
            "profile": profile, "workers": first["config"]["workers"],
            "regimes": {k: v for k, v in regimes(profile).items() if k in names}, "cells": cells, "minutes": None}


def report_only(out: Path) -> int:
    matrix = json.loads((out / "matrix.json").read_text()) if (out / "matrix.json").exists() else assembled(out)
    for cell in matrix["cells"].values():
        cell_dir = out / f"{cell['workload']}-{cell['regime']}"
        if (cell_dir / "sweeps").exists():  # the runs are still there: the churn check again
            cell["churn"] = churn(cell_dir, json.loads((cell_dir / "compare.json").read_text()), cell["best_fixed"])
    (out / "matrix.json").write_text(json.dumps(matrix, indent=2))
    (out / "matrix.md").write_text(markdown(matrix))
    heat_map(matrix, out / "dopd_ratio.png")
    print(markdown(matrix))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/matrix"))
    parser.add_argument("--profile", default="llama3-8b-h100")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of a generated workload")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--regimes", default="loose,tight,stall")
    parser.add_argument("--sweep-from", type=float, default=None, help="default: 1 req/s per worker")
    parser.add_argument("--sweep-runs", type=int, default=10)
    parser.add_argument("--decode-queue-limit", type=int,
                        help="requests that may wait for decode room in the simulator (0: refused at once, as "
                             "before 2026-12-08; default: the gateway's)")
    parser.add_argument("--sweep-splits", type=int, default=3,
                        help="static: each of its best K splits at the first rate gets its own rate goodput (0: all)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite matrix.md and the heat map from OUT/matrix.json and the cells, running nothing")
    args = parser.parse_args()
    if args.report_only:
        return report_only(args.out)
    started = time.perf_counter()
    all_regimes = regimes(args.profile)
    chosen = {k: all_regimes[k] for k in args.regimes.split(",")}
    sweep_from = args.sweep_from or 1.0 * args.workers
    matrix = {"command": "python benchmarks/bench_matrix.py " + " ".join(sys.argv[1:]), "profile": args.profile,
              "workers": args.workers, "regimes": chosen, "cells": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for workload in args.workloads.split(","):
        for name, regime in chosen.items():
            out = args.out / f"{workload}-{name}"
            t0 = time.perf_counter()
            rc = dopd(cell_argv(workload, regime, args, out, sweep_from))
            if rc != 0:
                print(f"{workload}/{name}: dopd bench compare failed ({rc})", file=sys.stderr)
                return 1
            doc = json.loads((out / "compare.json").read_text())
            cell = summarize_cell(doc)
            cell["churn"] = churn(out, doc, cell["best_fixed"])
            matrix["cells"][f"{workload}/{name}"] = {"workload": workload, "regime": name, **cell}
            print(f"{workload}/{name}: dopd / best fixed {cell['dopd_vs_best_fixed']}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    matrix["minutes"] = (time.perf_counter() - started) / 60
    (args.out / "matrix.json").write_text(json.dumps(matrix, indent=2))
    (args.out / "matrix.md").write_text(markdown(matrix))
    heat_map(matrix, args.out / "dopd_ratio.png")
    print(markdown(matrix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
