"""The configuration core's model (services/planner/configuration.py) against the simulator: for
each cell of a finished `bench_matrix.py` run, the capacity it predicts for every static split and
aggregation budget the matrix swept, beside the rate goodput the simulator measured for each; which
configuration the model would choose; and what that choice measured against the best one there.

    python benchmarks/bench_configuration.py docs/results/matrix-8w

The forecast is the whole run's length distributions (what a perfect predictor would say for a
stationary load); phase-shift is not stationary, so its cells test the model least.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_matrix import WORKLOADS  # noqa: E402
from common.load import SLO, LengthDist, LoadForecast  # noqa: E402
from common.profile import load_profile  # noqa: E402
from services.bench.sources import RequestSource, build_requests  # noqa: E402
from services.planner.configuration import rank_configurations  # noqa: E402
from services.planner.core import PoolShape  # noqa: E402

SHAPE = PoolShape(kv_blocks=4096, block_size=16, max_batch_size=256, prefill_token_budget=8192)  # bench_matrix's


def forecast_of(workload: str, duration: float) -> LoadForecast:
    argv = WORKLOADS[workload]
    if argv[0] == "--workload":
        source = RequestSource(workload=argv[1], duration=duration, max_context=8192)
        if "--seed" in argv:
            source = replace(source, seed=int(argv[argv.index("--seed") + 1]),
                             burstiness=float(argv[argv.index("--burstiness") + 1]))
    else:
        source = RequestSource(trace=tuple(Path(p) for p in argv[1:]), max_context=8192)
    requests, span = build_requests(source)
    return LoadForecast(len(requests) / span, LengthDist.from_samples([r.prompt_tokens for r in requests]),
                        LengthDist.from_samples([r.output_tokens for r in requests]), "whole run")


def measured(doc: dict) -> dict[str, float]:
    """Each swept configuration's rate goodput, by the names the model uses."""
    out = {}
    for sweep in doc["modes"].get("static", {}).get("sweeps", []):
        out[f"split {sweep['split']}"] = sweep["goodput_rate"] or 0.0
    for sweep in doc["modes"].get("aggregated-best", {}).get("sweeps", []):
        out[f"aggregated {sweep['chunk_tokens']}"] = sweep["goodput_rate"] or 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix", type=Path)
    args = parser.parse_args()
    matrix = json.loads((args.matrix / "matrix.json").read_text()) if (args.matrix / "matrix.json").exists() else None
    workers = matrix["workers"] if matrix else 8
    profile = load_profile(matrix["profile"] if matrix else "llama3-8b-h100")
    hits, regrets = 0, []
    for cell_dir in sorted(p for p in args.matrix.iterdir() if (p / "compare.json").exists()):
        doc = json.loads((cell_dir / "compare.json").read_text())
        workload, regime = cell_dir.name.rsplit("-", 1)
        c = doc["config"]
        slo = SLO(c["slo_ttft_ms"] / 1e3, c["slo_tpot_ms"] / 1e3,
                  c["slo_itl_ms"] / 1e3 if c.get("slo_itl_ms") is not None else None)
        forecast = forecast_of(workload, c["duration_s"] or 60.0)
        ranked = rank_configurations(forecast, profile, slo, workers, SHAPE)
        got = measured(doc)
        print(f"\n{workload}/{regime}: SLO {c['slo_ttft_ms']:g}/{c['slo_tpot_ms']:g} ms"
              + (f", stall {c['slo_itl_ms']:g} ms" if c.get("slo_itl_ms") else ""))
        print(f"  {'configuration':18} {'predicted req/s':>16} {'limited by':>10} {'measured req/s':>15}")
        for cap in ranked:
            if cap.name in got:
                print(f"  {cap.name:18} {cap.rate:16.1f} {cap.limited_by:>10} {got[cap.name]:15.1f}")
        swept = [cap for cap in ranked if cap.name in got]
        if not swept or not max(got.values()):
            continue
        choice, best = swept[0], max(got, key=got.get)
        regret = got[choice.name] / got[best]
        hits += choice.name == best
        regrets.append(regret)
        print(f"  the model chooses {choice.name} (measured {got[choice.name]:.1f}); the best measured: {best} "
              f"({got[best]:.1f}): {regret:.2f}x of it")
    if regrets:
        print(f"\n{hits} of {len(regrets)} cells: the model's choice is the best measured; its choice measured "
              f"{min(regrets):.2f}x to {max(regrets):.2f}x of the best (mean {sum(regrets) / len(regrets):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
