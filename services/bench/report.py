"""What results.json holds, assembled from a run's outcome (pure): the metrics, the harness's own
ceiling, and the timeline."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from services.bench.arrivals import arrivals_per_second
from services.bench.metrics import RequestResult, summarize
from services.bench.outcome import RunOutcome
from services.bench.workloads import BenchRequest

# What one gateway on this machine sustains, measured by benchmarks/bench_overhead.py --write-ceiling.
CEILING_FILE = Path(__file__).resolve().parent / "harness_ceiling.json"
CEILING_MARGIN = 0.5  # a run counts as under the ceiling while its peak stays below half of it
CPU_SATURATED = 0.9  # client CPU time / wall time above this: the client, not the server, may be the limit
LATE_SATURATED = 0.1  # p99 send lateness above this fraction of the schedule's duration


def peak_wall_rates(results: Sequence[RequestResult], time_scale: float) -> tuple[int, int]:
    """Most tokens and most requests that reached the client in one wall-clock second. Results
    are in profile time; token k of a request arrived at t_sent + ttft + sum(itls[:k])."""
    tokens: Counter[int] = Counter()
    requests: Counter[int] = Counter()
    for r in results:
        if not r.ok or r.ttft is None:
            continue
        t = r.t_sent + r.ttft
        requests[int(r.t_sent * time_scale)] += 1
        tokens[int(t * time_scale)] += 1
        for gap in r.itls:
            t += gap
            tokens[int(t * time_scale)] += 1
    return max(tokens.values(), default=0), max(requests.values(), default=0)


@dataclass(frozen=True)
class KVCost:
    """What a prompt's hand-off costs the harness: its KV bytes a token, the transport that carries
    them (the ceiling differs: benchmarks/bench_overhead.py measures both), and how long the
    profile takes to prefill a prompt alone (seconds; the hand-off streams layer by layer over it)."""

    bytes_per_token: int
    transport: str  # grpc or nixl
    prefill_time: Callable[[int], float] | None = field(default=None, compare=False)


def kv_cost(model: str, workers_transports: Sequence[Sequence[str]], serving_mode: str = "") -> KVCost | None:
    """A sim cluster's KV cost (model "sim:PROFILE"): None for another model, a profile this
    machine cannot load, or a serving mode that hands no KV between workers (aggregated). NIXL's
    ceiling where every worker reads NIXL, else gRPC's (the lower)."""
    if not model.startswith("sim:"):
        return None
    if serving_mode and not _hands_off_kv(serving_mode):
        return None
    from common.modeling.sim_runner import profile_layout
    from common.profile import load_profile

    try:
        profile = load_profile(model.removeprefix("sim:"))
        layout = profile_layout(profile)
    except (OSError, ValueError, KeyError):
        return None
    nixl = bool(workers_transports) and all("nixl" in t for t in workers_transports)
    return KVCost(layout.bytes_for(1), "nixl" if nixl else "grpc", profile.prefill_time)


def _hands_off_kv(mode_name: str) -> bool:
    from common.modes import serving_mode

    try:
        return serving_mode(mode_name).disaggregated
    except ValueError:  # a gateway newer than this client: assume it does
        return True


def peak_kv_wall_rate(results: Sequence[RequestResult], time_scale: float, kv: KVCost) -> int:
    """Most KV bytes handed off in one wall-clock second. A prompt's bytes stream layer by layer
    while it is prefilled, and have all reached the decode worker at its first token: they are
    spread evenly over the wall window [first token - its prefill time alone, first token]. The
    prefill time alone is the shortest its prefill can take (in a batch it takes longer), so the
    spread is the narrowest one and the peak an upper bound; without a prefill time every byte
    counts in its first token's second."""
    by_second: Counter[int] = Counter()
    for r in results:
        if not (r.ok and r.ttft is not None):
            continue
        nbytes = r.prompt_tokens * kv.bytes_per_token
        end = (r.t_sent + r.ttft) * time_scale
        span = min(kv.prefill_time(r.prompt_tokens), r.ttft) * time_scale if kv.prefill_time else 0.0
        if span <= 0:
            by_second[int(end)] += nbytes
            continue
        start = end - span
        for second in range(int(start), int(end) + 1):
            overlap = min(end, second + 1) - max(start, second)
            if overlap > 0:
                by_second[second] += nbytes * overlap / span
    return int(max(by_second.values(), default=0))


def load_ceiling(path: Path = CEILING_FILE) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def harness_report(outcome: RunOutcome, schedule_duration: float, time_scale: float = 1.0,
                   ceiling: dict | None = None, kv: KVCost | None = None) -> dict:
    """What the client sustained: messages and tokens received per wall second, its CPU use, and
    how late the sends went out against the schedule (profile time). `saturated` says the numbers
    may describe the harness rather than the cluster."""
    wall = max(outcome.wall_s, 1e-9)
    cpu_util = outcome.cpu_s / wall
    late_ms = np.asarray(outcome.lateness, dtype=float) * 1000.0
    p99_late_ms = float(np.percentile(late_ms, 99)) if len(late_ms) else 0.0
    not_sent = len(outcome.results) - outcome.sent
    reasons = []
    if cpu_util > CPU_SATURATED:
        reasons.append(f"client CPU utilization {cpu_util:.2f} > {CPU_SATURATED}")
    if p99_late_ms / 1000.0 > LATE_SATURATED * schedule_duration:
        reasons.append(f"p99 send lateness {p99_late_ms:.0f} ms > {LATE_SATURATED:.0%} of the "
                       f"{schedule_duration:g} s schedule")
    if not_sent:
        reasons.append(f"{not_sent} requests not sent before the run's deadline")
    peak_tokens, peak_requests = peak_wall_rates(outcome.results, time_scale)
    under = None
    if ceiling:
        under = (peak_tokens < CEILING_MARGIN * ceiling["tokens_per_s"]
                 and peak_requests < CEILING_MARGIN * ceiling["requests_per_s"])
        if not under:
            reasons.append(f"peak {peak_tokens} tokens/s, {peak_requests} requests/s (wall) not under "
                           f"{CEILING_MARGIN:.0%} of the gateway's ceiling")
    peak_kv = peak_kv_wall_rate(outcome.results, time_scale, kv) if kv else None
    kv_ceiling = (ceiling or {}).get("kv_bytes_per_s", {}).get(kv.transport) if kv else None
    if peak_kv is not None and kv_ceiling and peak_kv >= CEILING_MARGIN * kv_ceiling:
        under = False
        reasons.append(f"peak {peak_kv / 1e6:.0f} MB/s of KV by {kv.transport} (wall) not under "
                       f"{CEILING_MARGIN:.0%} of its ceiling ({kv_ceiling / 1e6:.0f} MB/s)")
    return {
        "ceiling": ceiling,
        "peak_tokens_per_wall_s": peak_tokens,
        "peak_requests_per_wall_s": peak_requests,
        "peak_kv_bytes_per_wall_s": peak_kv,
        "kv_transport": kv.transport if kv else None,
        "under_ceiling": under,
        "wall_s": outcome.wall_s,
        "client_cpu_s": outcome.cpu_s,
        "client_cpu_utilization": cpu_util,
        "messages_received": outcome.messages,
        "tokens_received": outcome.tokens,
        "messages_per_s": outcome.messages / wall,
        "tokens_per_s": outcome.tokens / wall,
        "sent": outcome.sent,
        "not_sent": not_sent,
        "send_lateness_median_ms": float(np.median(late_ms)) if len(late_ms) else 0.0,
        "send_lateness_p99_ms": p99_late_ms,
        "send_lateness_max_ms": float(late_ms.max()) if len(late_ms) else 0.0,
        "output_length_mismatch": outcome.length_mismatch,
        "saturated": bool(reasons),
        "saturation_reasons": reasons,
    }


def build_results(requests: list[BenchRequest], outcome: RunOutcome, config: dict, schedule_duration: float,
                  slo_ttft_ms: float | None, slo_tpot_ms: float | None, ceiling: dict | None = None,
                  kv: KVCost | None = None, slo_itl_ms: float | None = None) -> dict:
    """results.json: the metrics at the top level (vLLM's names), then config, harness, timeline."""
    out = summarize(outcome.results, outcome.duration, slo_ttft_ms, slo_tpot_ms, slo_itl_ms)
    out["config"] = config
    out["harness"] = harness_report(outcome, schedule_duration, config.get("time_scale", 1.0), ceiling, kv)
    out["timeline"] = {
        "arrivals_per_s": arrivals_per_second([r.t for r in requests], max(schedule_duration, outcome.duration)),
        "samples": [asdict(s) for s in outcome.samples],
    }
    return out
