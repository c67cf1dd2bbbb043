"""`dopd simulate` as a library call: a `SimulateSpec` in, a `SimulateResult` out (results.json's
dict, as `dopd bench` writes it, with the run's per-request results, status samples and config).

    result = simulate_run(SimulateSpec(profile="llama3-8b-h100", workers=4, mode="dopd",
                                       source=RequestSource(workload="mix"), slo_ttft_ms=300, slo_tpot_ms=40))
    save(result, out)  # DIR/results.json (and DIR/requests.jsonl)

Nothing is written or printed by the run itself: `dopd simulate` (cli.py) writes, plots and prints;
`dopd bench compare` keeps the run in memory for its plots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from common.config import GatewaySettings, PlannerSettings
from services.bench.metrics import RequestResult
from services.bench.outcome import StatusSample
from services.bench.sources import RequestSource, build_requests, max_context_of
from services.bench.workloads import BenchRequest
from services.planner.predictors import predictor_names
from services.simulate.sim import DEFAULT_CHUNK_TOKENS, SimConfig, SimOutcome, setting


@dataclass(frozen=True)
class SimulateSpec:
    """One run of `dopd simulate`. The defaults are the command's (and its parser's)."""

    profile: str  # a shipped name (common/profiles) or a file
    workers: int
    mode: str  # common/modes.py
    source: RequestSource
    slo_ttft_ms: float
    slo_tpot_ms: float
    slo_itl_ms: float | None = None
    split: tuple[int, int] | None = None  # P:D at the start; None: half and half, decode gets the odd one
    interval_s: float = setting(PlannerSettings, "interval_s")  # the planner's, virtual seconds
    predictor: str = setting(PlannerSettings, "predictor")
    cooldown_s: float = setting(PlannerSettings, "cooldown_s")
    link_gbps: float | None = None  # KV link per worker; None: by profile (hardware.py)
    kv_blocks: int = SimConfig.kv_blocks
    block_size: int = SimConfig.block_size
    max_batch_size: int = SimConfig.max_batch_size
    prefill_token_budget: int = SimConfig.prefill_token_budget
    decode_queue_limit: int = setting(GatewaySettings, "decode_queue_limit")
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    admission: bool | None = None  # None: the mode's default
    request_timeout_s: float = 60.0  # as `dopd bench`
    sample_interval_s: float = 0.5

    def __post_init__(self) -> None:
        # The command's parser checks it; a spec built in code is checked here (the simulator would
        # only meet a bad name in the modes that forecast).
        if self.predictor not in predictor_names():
            raise ValueError(f"predictor must be one of {predictor_names()}, got {self.predictor!r}")


@dataclass
class SimulateResult:
    """What one run gave: `results` as results.json holds it; `outcome` the simulator's own."""

    results: dict
    outcome: SimOutcome
    cfg: SimConfig

    @property
    def requests(self) -> list[RequestResult]:
        return self.outcome.results

    @property
    def samples(self) -> list[StatusSample]:
        return self.outcome.samples


def sim_config(spec: SimulateSpec) -> SimConfig:
    """The simulator's config: the profile loaded, times in seconds, the policy with the cooldown."""
    from common.profile import load_profile
    from services.simulate.hardware import default_link_gbps
    from services.simulate.sim import default_policy

    profile = load_profile(spec.profile)
    return SimConfig(
        profile=profile, workers=spec.workers, mode=spec.mode, split=spec.split,
        link_gbps=spec.link_gbps if spec.link_gbps is not None else default_link_gbps(profile),
        kv_blocks=spec.kv_blocks, block_size=spec.block_size, max_batch_size=spec.max_batch_size,
        prefill_token_budget=spec.prefill_token_budget, request_timeout_s=spec.request_timeout_s,
        interval_s=spec.interval_s, sample_interval_s=spec.sample_interval_s, slo_ttft_s=spec.slo_ttft_ms / 1e3,
        slo_tpot_s=spec.slo_tpot_ms / 1e3, slo_itl_s=spec.slo_itl_ms / 1e3 if spec.slo_itl_ms is not None else None,
        predictor=spec.predictor,
        policy=replace(default_policy(), cooldown_s=spec.cooldown_s), chunk_tokens=spec.chunk_tokens,
        admission=spec.admission, decode_queue_limit=spec.decode_queue_limit)


def results_doc(spec: SimulateSpec, requests: list[BenchRequest], outcome: SimOutcome, cfg: SimConfig,
                schedule_duration: float) -> dict:
    """results.json: `dopd bench`'s (services/bench/report.build_results), with `harness` saying
    there was none and `simulation` holding what only a simulation knows."""
    from services.bench.outcome import RunOutcome
    from services.bench.report import build_results

    tokens = sum(r.output_tokens for r in outcome.results if r.ok)
    run = RunOutcome(results=outcome.results, samples=outcome.samples, duration=outcome.duration,
                     wall_s=outcome.duration, cpu_s=0.0, lateness=[0.0] * len(requests), sent=len(requests),
                     messages=tokens, tokens=tokens,
                     length_mismatch=sum(r.ok and r.output_tokens != q.output_tokens
                                         for r, q in zip(outcome.results, requests, strict=True)))
    p, d = cfg.initial_split
    s = spec.source
    config = {"simulator": "virtual time", "profile": cfg.profile.name, "workers": cfg.workers, "mode": cfg.mode,
              "split": [p, d], "workload": s.workload, "trace": [str(t) for t in s.trace or []] or None,
              "rate": s.rate, "burstiness": s.burstiness, "duration_s": schedule_duration, "seed": s.seed,
              "slo_ttft_ms": spec.slo_ttft_ms, "slo_tpot_ms": spec.slo_tpot_ms, "slo_itl_ms": spec.slo_itl_ms,
              "time_scale": 1.0, "max_context": max_context_of(s), "request_timeout_s": cfg.request_timeout_s,
              "requests": len(requests), "until_s": s.until, "interval_s": cfg.interval_s,
              "predictor": cfg.predictor,
              "link_gbps": cfg.link_gbps, "kv_blocks": cfg.kv_blocks, "block_size": cfg.block_size,
              "max_batch_size": cfg.max_batch_size, "prefill_token_budget": cfg.prefill_token_budget,
              "cooldown_s": cfg.policy.cooldown_s, "chunk_tokens": cfg.chunk_tokens,
              "admission": cfg.admission, "decode_queue_limit": cfg.decode_queue_limit}
    results = build_results(requests, run, config, schedule_duration, spec.slo_ttft_ms, spec.slo_tpot_ms, None,
                            slo_itl_ms=spec.slo_itl_ms)
    results["harness"] = {"simulated": True, "saturated": False, "saturation_reasons": [],
                          "note": "virtual time: no client, no gateway ceiling"}
    results["simulation"] = {
        "events": outcome.events, "decode_steps": outcome.decode_steps, "prefill_batches": outcome.prefill_batches,
        "switches": outcome.switches, "migrated_requests": sum(s["migrated"] for s in outcome.switches),
        "migrated_bytes": sum(s["migrated_bytes"] for s in outcome.switches),
        "drained_requests": sum(s["drained"] for s in outcome.switches), "refused": outcome.refused,
        "decisions": [list(x) for x in outcome.decisions], "configurations": outcome.configurations,
        "leaks": outcome.leaks,
        # Host figures: the only ones that differ between two runs of the same spec.
        "host": {"wall_s": outcome.wall_s, "cpu_s": outcome.cpu_s, "decision_seconds": outcome.decision_seconds,
                 "sim_to_wall": outcome.duration / outcome.wall_s if outcome.wall_s > 0 else None}}
    return results


def simulate_run(spec: SimulateSpec) -> SimulateResult:
    """One run in virtual time. ValueError or FileNotFoundError on a bad spec (the profile, the
    split, the source); a failed leak check is in result.outcome.leaks, for the caller to judge."""
    from services.simulate.sim import simulate

    cfg = sim_config(spec)
    requests, schedule_duration = build_requests(spec.source)
    outcome = simulate(requests, cfg)
    return SimulateResult(results_doc(spec, requests, outcome, cfg, schedule_duration), outcome, cfg)


def save(result: SimulateResult, out: Path, write_requests: bool = False) -> None:
    """DIR/results.json, and with `write_requests` DIR/requests.jsonl (one line per request)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.results, indent=2))
    if write_requests:
        with open(out / "requests.jsonl", "w") as f:
            for r in result.requests:
                f.write(json.dumps(asdict(r)) + "\n")
