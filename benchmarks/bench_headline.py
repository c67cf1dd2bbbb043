"""The paper's headline against the peers as their users run them, over a finished matrix
(`bench_matrix.py`): for each peer (aggregation at vLLM's 2,048-token budget, and
`static-apriori`, the split DistServe's placement would deploy) the cell where dopd's rate goodput
is the highest multiple of the peer's; there, at dopd's rate goodput, each mode's p90 TTFT and p90
TPOT (run again in virtual time, same arguments as the cell), and dopd's attainment at 80% of it.

    python benchmarks/bench_headline.py docs/results/matrix-mixed-8w

The goal (issue 24): in at least one cell >= 1.5x each peer; there, at the same rate, p90 TTFT at
least 50% lower and p90 TPOT at least 20% lower than the peer's; and attainment >= 99% at 80% of
dopd's rate goodput.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.comparison.compare_runs import run_des  # noqa: E402
from services.comparison.reach_cli import recorded_args  # noqa: E402

PEERS = {"aggregated": "aggregation at vLLM's budget (2,048 tokens a step)",
         "static-apriori": "static-apriori (the split chosen on the first phase, then kept)"}


def run_at(doc: dict, mode: str, split: tuple[int, int] | None, rate: float, out: Path) -> dict:
    """`mode` at `rate` with the cell's own arguments: its results.json as a dict."""
    args = recorded_args(doc)
    args.rate = rate
    return run_des(args, mode, split, out / f"{mode}-{rate:g}").results


def split_of(doc: dict, mode: str) -> tuple[int, int] | None:
    split = doc["modes"][mode].get("split")
    return tuple(int(x) for x in split.split(":")) if split else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix", type=Path)
    args = parser.parse_args()
    cells = {p.name: json.loads((p / "compare.json").read_text())
             for p in sorted(args.matrix.iterdir()) if (p / "compare.json").exists()}
    out = Path(tempfile.mkdtemp(prefix="dopd-headline-"))
    for peer, what in PEERS.items():
        ratios = {name: doc["modes"]["dopd"]["goodput_rate"] / doc["modes"][peer]["goodput_rate"]
                  for name, doc in cells.items()
                  if doc["modes"].get(peer, {}).get("goodput_rate") and doc["modes"]["dopd"].get("goodput_rate")}
        if not ratios:
            continue
        name = max(ratios, key=ratios.get)
        doc = cells[name]
        rate = doc["modes"]["dopd"]["goodput_rate"]
        ours = run_at(doc, "dopd", split_of(doc, "dopd"), rate, out)
        theirs = run_at(doc, "static" if peer == "static-apriori" else peer, split_of(doc, peer), rate, out)
        lighter = run_at(doc, "dopd", split_of(doc, "dopd"), 0.8 * rate, out)
        ttft = ours["p90_ttft_ms"] / theirs["p90_ttft_ms"] - 1 if theirs["p90_ttft_ms"] else None
        tpot = ours["p90_tpot_ms"] / theirs["p90_tpot_ms"] - 1 if theirs["p90_tpot_ms"] else None
        print(f"\nagainst {what}: the best cell is {name}, dopd {ratios[name]:.2f}x "
              f"({rate:g} req/s against {doc['modes'][peer]['goodput_rate']:g}; goal >= 1.5x)")
        print(f"  at {rate:g} req/s: dopd attainment {ours['slo_attainment']:.4f}, p90 TTFT "
              f"{ours['p90_ttft_ms']:.1f} ms, p90 TPOT {ours['p90_tpot_ms']:.1f} ms; {peer} attainment "
              f"{theirs['slo_attainment']:.4f}, p90 TTFT {theirs['p90_ttft_ms']:.1f} ms, p90 TPOT "
              f"{theirs['p90_tpot_ms']:.1f} ms")
        print(f"  p90 TTFT {ttft:+.1%} (goal <= -50%), p90 TPOT {tpot:+.1%} (goal <= -20%)")
        print(f"  dopd at 80% of its rate goodput ({0.8 * rate:g} req/s): attainment "
              f"{lighter['slo_attainment']:.4f} (goal >= 0.99)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
