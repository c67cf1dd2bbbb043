"""Do the served requests of the committed comparisons honour services/bench/reach.py's bounds?
For every run under docs/results/compare-*/ with its requests.jsonl (the real services), the
least slack of any completed request over its TTFT floor (the cheapest prefill of its prompt on
the comparison's profile, within the forwards its clusters could make) and over the TPOT floor
(the cheapest forward), and how many requests beat the TTFT floor. On the sim engine the profile
costs every forward, so none may beat the TTFT floor (the exit status counts them). The TPOT
floor is not claimed there (TPOT is timed at the client, where tokens that queued arrive
together); its slack is shown for what it is. On a real model the profile is only measured, and
this shows how far requests stray under it.

    python benchmarks/bench_reach_bounds.py [docs/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.profile import load_profile  # noqa: E402
from services.bench.metrics import RequestResult  # noqa: E402
from services.bench.reach import cheapest_forward_s, cheapest_prefill_s  # noqa: E402
from services.comparison.reach_cli import recorded_args, run_limits  # noqa: E402


def slack(requests: list[RequestResult], profile, limits) -> tuple[float, int, float | None]:
    """(least TTFT - floor, s; requests under the TTFT floor; least TPOT - floor, s or None)."""
    cost = cheapest_prefill_s(profile, max(r.prompt_tokens for r in requests), limits)
    floor = cheapest_forward_s(profile, limits)
    ttft = [r.ttft - cost[r.prompt_tokens] for r in requests]
    tpot = [r.tpot - floor for r in requests if r.tpot is not None]
    return min(ttft), sum(s < 0 for s in ttft), min(tpot) if tpot else None


def main(root: Path) -> int:
    print("| run | engine | completed | least TTFT slack ms | under the TTFT floor | least TPOT slack ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    broken = 0
    for compare in sorted(root.glob("compare-*/compare.json")):
        doc = json.loads(compare.read_text())
        config = doc["config"]
        if not config.get("profile"):
            continue
        profile = load_profile(config["profile"])
        args = recorded_args(doc)
        for path in sorted(compare.parent.glob("*/requests.jsonl")):
            with open(path) as f:
                done = [r for r in (RequestResult(**json.loads(line)) for line in f) if r.ok and r.ttft is not None]
            if not done:
                continue
            ttft, under, tpot = slack(done, profile, run_limits(args, profile, max(r.prompt_tokens for r in done)))
            engine = "real model" if config.get("model") else config["engine"]
            broken += under if engine != "real model" else 0
            tpot_ms = "-" if tpot is None else f"{tpot * 1e3:.2f}"
            run = path.parent.relative_to(root)
            print(f"| {run} | {engine} | {len(done)} | {ttft * 1e3:.2f} | {under} | {tpot_ms} |")
    print(f"\nrequests under their TTFT floor on the profile-costed engines: {broken}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/results")))
