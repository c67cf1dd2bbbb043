"""The reconfiguration policy's defaults, judged in virtual time (`dopd simulate`'s API): the same
runs with the defaults and with one setting changed at a time, so each default's effect is seen.

Runs (16 simulated H100s, llama3-8b-h100, 16384 KV blocks, batch <= 256, prefill budget 8192):
- phase-shift, rate 22, burstiness 0.5, 60 s, TTFT 300 / TPOT 40 ms, from the first phase's best
  static split 4P:12D (benchmarks/bench_planner.py first_phase_split);
- the Azure conv + code traces together rescaled to 200 req/s, first 60 s, TTFT 1000 / TPOT 50 ms,
  from their best static split 12P:4D (docs/results/des_azure_hour);
- the Azure conv trace at its own rate, first 600 s, TTFT 1000 / TPOT 50 ms, from 8P:8D (quiet:
  the switches there are churn).

    python benchmarks/bench_policy.py
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.profile import load_profile  # noqa: E402
from services.bench.metrics import summarize  # noqa: E402
from services.bench.trace import read_traces, scale_to_rate  # noqa: E402
from services.bench.workloads import generate  # noqa: E402
from services.simulate.sim import SimConfig, default_policy, simulate  # noqa: E402

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
VARIANTS = {
    "defaults": {},
    "cooldown 5 s, one move an interval": {"cooldown_s": 5.0, "max_switches_per_interval": 1},
    "spare capacity moves at a gap of 1": {"spare_min_diff": 1},
}


def cases():
    conv, code = TRACES / "AzureLLMInferenceTrace_conv.csv", TRACES / "AzureLLMInferenceTrace_code.csv"
    both = scale_to_rate(read_traces([conv, code]), 200.0)
    yield ("phase-shift r22 60 s", generate("phase-shift", rate=22, duration=60, seed=0, burstiness=0.5,
                                            max_context=8192), (4, 12), 300, 40)
    yield "azure conv+code r200 60 s", [r for r in both if r.t < 60], (12, 4), 1000, 50
    yield "azure conv own rate 600 s", [r for r in read_traces([conv]) if r.t < 600], (8, 8), 1000, 50


def main() -> int:
    profile = load_profile("llama3-8b-h100")
    print(f"{'case':28} {'policy':38} {'static':>8} {'dopd':>8} {'switches':>8}")
    for name, reqs, split, ttft, tpot in cases():
        base = SimConfig(profile=profile, workers=16, split=split, kv_blocks=16384, max_batch_size=256,
                         prefill_token_budget=8192, slo_ttft_s=ttft / 1e3, slo_tpot_s=tpot / 1e3, link_gbps=400)
        out = simulate(reqs, base)
        static = summarize(out.results, out.duration, ttft, tpot)["slo_attainment"]
        for label, change in VARIANTS.items():
            out = simulate(reqs, replace(base, mode="dopd-no-policy", policy=replace(default_policy(), **change)))
            dopd = summarize(out.results, out.duration, ttft, tpot)["slo_attainment"]
            print(f"{name:28} {label:38} {static:8.2%} {dopd:8.2%} {len(out.switches):8d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
