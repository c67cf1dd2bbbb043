"""A real model's decode steps in situ against its latency profile: bring up 1 prefill + 1 decode
worker (static), run a workload through the gateway, scrape the decode worker's step-time and
batch-size histograms, and print them beside the profile's step for the mean batch.

    python benchmarks/bench_decode_in_situ.py --model smollm2 --profile smollm2-cpu1 --torch-threads 1 \\
        --workload mix --rate 0.2 --seed 1 --duration 150 --max-context 768 --out runs/decode-in-situ

The mean batch over steps understates what a token waits: a token is made in every step of its
request, and the big steps are the slow ones, so TPOT sits above the mean step.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.profile import load_profile  # noqa: E402
from services.gateway.scheduling import mean_context  # noqa: E402
from services.launcher import Cluster, ClusterSpec, free_port  # noqa: E402

SERIES = re.compile(r"^(dopd_decode_step_seconds|dopd_decode_batch_size)_(sum|count) (\S+)$", re.M)


def scrape(metrics_address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    cpu = re.search(r"^process_cpu_seconds_total (\S+)$", text, re.M)
    out = {f"{name}_{kind}": float(v) for name, kind, v in SERIES.findall(text)}
    out["cpu_s"] = float(cpu.group(1)) if cpu else float("nan")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--profile", default="smollm2-cpu1")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--workload", default="mix")
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=150)
    p.add_argument("--max-context", type=int, default=768)
    p.add_argument("--slo-ttft", type=float, default=3000)
    p.add_argument("--slo-tpot", type=float, default=250)
    p.add_argument("--out", type=Path, default=Path("runs/decode-in-situ"))
    args = p.parse_args()

    spec = ClusterSpec(model=args.model, prefill=1, decode=1, port=free_port(), http_port=0,
                       log_dir=Path(tempfile.mkdtemp(prefix="dopd-decode-in-situ-")), mode="static",
                       planner="static", torch_threads=args.torch_threads, slo_ttft_ms=args.slo_ttft,
                       slo_tpot_ms=args.slo_tpot, extra_env={"DOPD_PLANNER_PROFILE": args.profile})
    cluster = Cluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(600)
        rc = subprocess.call([sys.executable, "-m", "services.cli", "bench", "--target", cluster.gateway_address,
                              "--workload", args.workload, "--rate", str(args.rate), "--seed", str(args.seed),
                              "--duration", str(args.duration), "--max-context", str(args.max_context),
                              "--request-timeout", "120", "--slo-ttft", str(args.slo_ttft), "--slo-tpot",
                              str(args.slo_tpot), "--out", str(args.out), "--no-progress"], cwd=ROOT)
        if rc != 0:
            print(f"dopd bench failed ({rc}); logs in {spec.log_dir}", file=sys.stderr)
            return 1
        decode = scrape(cluster.proc("decode-0").metrics_address)
        prefill_cpu = scrape(cluster.proc("prefill-0").metrics_address)["cpu_s"]
    finally:
        cluster.stop()

    results = json.loads((args.out / "results.json").read_text())
    with open(args.out / "requests.jsonl") as f:
        requests = [json.loads(line) for line in f]
    done = [r for r in requests if r.get("ok") and r.get("output_tokens")]
    # What the decode seats count a request as (its prompt and half its output), over the served ones.
    context = sum(mean_context(r["prompt_tokens"], r["output_tokens"]) for r in done) / len(done) if done else 0.0
    steps = decode["dopd_decode_step_seconds_count"]
    mean_step = decode["dopd_decode_step_seconds_sum"] / steps if steps else float("nan")
    mean_batch = decode["dopd_decode_batch_size_sum"] / steps if steps else float("nan")
    profile = load_profile(args.profile).batch_monotone()
    predicted = profile.decode_step_time(max(1, round(mean_batch)), context) if steps else float("nan")
    print(f"decode steps {steps:.0f}: mean {mean_step * 1e3:.1f} ms at a mean batch of {mean_batch:.2f}; "
          f"profile {args.profile} (monotone) at batch {round(mean_batch)} and mean context {context:.0f}: "
          f"{predicted * 1e3:.1f} ms")
    print(f"TPOT ms: median {results['median_tpot_ms']:.1f}, p90 {results['p90_tpot_ms']:.1f}; "
          f"CPU seconds: decode worker {decode['cpu_s']:.1f}, prefill worker {prefill_cpu:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
