"""DOPD's goals on the issue's workload at other loads and SLOs: can any scheduler reach them?
`dopd bench compare --engine des` (16 simulated H100s, llama3-8b-h100, phase-shift, burstiness
0.5, seed 0, 60 s; aggregated, static at every split, dopd) at each rate and pair of SLOs of the
grid, and services/bench/reach.py's bounds against the better baseline of each (compare.json's
"reach"). One row a point: the measured figures, what each goal asks against its bound, and
whether all four goals together are still open. Comparisons already under OUT are read back, their
bounds computed again.

    python benchmarks/bench_reach_grid.py [OUT]     (about 15 minutes on 2 cores; OUT: runs/reach-grid)
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.cli import main as dopd  # noqa: E402
from services.comparison.reach_cli import reach_doc  # noqa: E402

RATES = (26, 64, 128)
SLO_TTFT_MS = (300, 1000)
SLO_TPOT_MS = (15, 25, 40)
BASE = ["bench", "compare", "--modes", "aggregated,static,dopd", "--engine", "des", "--profile", "llama3-8b-h100",
        "--workers", "16", "--workload", "phase-shift", "--burstiness", "0.5", "--duration", "60",
        "--max-context", "8192", "--kv-blocks", "4096", "--max-batch-size", "256", "--prefill-token-budget", "8192",
        "--no-progress"]


def row(rate: float, ttft: int, tpot: int, doc: dict, bounds: dict) -> str:
    v, reach = doc["dopd_vs_best_baseline"], bounds["figures"]
    base = doc["modes"][v["baseline"]]
    split = f" {base['split']}" if base["split"] else ""

    def cell(name: str) -> str:
        f = reach[name]
        return f"{f['asks']:.1f} / {f['bound']:.1f}" + (" **x**" if f["reachable"] is False else "")

    # all four in one run: the three figures within their bounds, and dopd's attainment goal
    # (measured) is not judged here: only whether any scheduler could meet the other three
    open_ = all(reach[k]["reachable"] is not False for k in reach)
    return (f"| {rate:g} | {ttft} / {tpot} | {v['baseline']}{split} | {base['slo_attainment']:.4f} | "
            f"{doc['modes']['dopd']['slo_attainment']:.4f} | {v['figures']['goodput_ratio']:.2f}x | "
            f"{cell('goodput')} | {cell('p90_ttft_ms')} | {cell('p90_tpot_ms')} | {'open' if open_ else 'no'} |")


def main(out: Path) -> int:
    print("phase-shift, 16 workers, llama3-8b-h100, in the simulator. Bounds: goodput <= every request by the "
          "last send; p90 TTFT >= the cheapest prefill of the cheapest 99% of prompts; p90 TPOT >= the "
          "profile's cheapest forward. **x**: no scheduler can meet that goal.\n")
    print("| rate req/s | SLO TTFT / TPOT ms | better baseline | its attainment | dopd attainment | dopd goodput "
          "ratio | goodput asks / ceiling | p90 TTFT asks / floor ms | p90 TPOT asks / floor ms | goals open |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for rate, ttft, tpot in itertools.product(RATES, SLO_TTFT_MS, SLO_TPOT_MS):
        d = out / f"r{rate}-ttft{ttft}-tpot{tpot}"
        if not (d / "compare.json").exists():
            with contextlib.redirect_stdout(io.StringIO()):  # each comparison's own tables: in d/compare.md
                rc = dopd([*BASE, "--rate", str(rate), "--slo-ttft", str(ttft), "--slo-tpot", str(tpot),
                           "--out", str(d)])
            if rc != 0:
                print(f"| {rate} | {ttft} / {tpot} | compare failed ({rc}) |")
                continue
        # the bounds computed now (reach_doc), not those compare.json kept from when it ran
        print(row(rate, ttft, tpot, json.loads((d / "compare.json").read_text()), reach_doc(d)["run"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/reach-grid")))
