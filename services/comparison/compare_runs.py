"""The runs of `dopd bench compare` (services/comparison/compare.py): one cluster serving the workload
once, as a `Run`, on an engine: the virtual-time simulator (`run_des`, `dopd simulate`'s own call,
services/simulate/api.py) or the real services (`run_services`: the mode's cluster brought up,
`dopd bench`'s call against it, services/bench/api.py, taken down; `reused_run` reads one back for
--reuse). Each takes a typed spec built from the comparison's arguments (`des_spec`, `bench_spec`)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.modes import serving_mode
from services.bench.api import BenchSpec
from services.bench.metrics import RequestResult
from services.bench.outcome import StatusSample
from services.bench.sources import max_context_of, source_of
from services.simulate.api import SimulateSpec
from services.simulate.sim import default_split

FIGURES = ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
           "median_request_p99_itl_ms", "p99_request_p99_itl_ms", "max_itl_ms", "itl_attainment",
           "slo_attainment", "goodput", "completed", "refused", "failed", "requests")


@dataclass
class Run:
    """One cluster served the workload once: a mode at a split."""

    mode: str
    split: tuple[int, int] | None  # at the start (dopd modes switch from it); None: aggregated
    results: dict
    requests: list[RequestResult] = field(default_factory=list)
    samples: list[StatusSample] = field(default_factory=list)  # status samples over the run, for the split plot
    engine: str = "des"
    chunk_tokens: int | None = None  # aggregated-best: the budget of this run

    def figures(self) -> dict:
        r = self.results
        refused = r["errors"].get("RESOURCE_EXHAUSTED", 0) if r.get("errors") else 0
        out = {k: r.get(k) for k in FIGURES if k not in ("refused", "failed")}
        out["refused"] = refused
        out["failed"] = r["failed"] - refused
        out["split"] = None if self.split is None else f"{self.split[0]}:{self.split[1]}"
        out["engine"] = self.engine
        if self.chunk_tokens is not None:
            out["chunk_tokens"] = self.chunk_tokens
        sim = r.get("simulation") or {}
        out["switches"] = len(sim["switches"]) if "switches" in sim else r.get("switches")
        return out


def run_dir(mode: str, split: tuple[int, int] | None, chunk_tokens: int | None = None) -> str:
    """The directory a run of `mode` writes under --out (and under sweeps/): static's named by its
    split, as every split of it runs; aggregated-best's by its budget; the other modes by the mode."""
    if mode == "static":
        return f"static-{split[0]}p{split[1]}d"
    return f"{mode}-{chunk_tokens}" if mode == "aggregated-best" else mode


def des_spec(args, mode: str, split: tuple[int, int] | None) -> SimulateSpec:
    """`dopd simulate`'s run for one run of the comparison: the settings the comparison was given,
    the simulator's defaults for the rest."""
    given = {name: getattr(args, name) for name in ("kv_blocks", "max_batch_size", "prefill_token_budget",
                                                    "chunk_tokens", "decode_queue_limit")
             if getattr(args, name, None) is not None}
    if args.predictor:
        given["predictor"] = args.predictor
    return SimulateSpec(profile=args.profile, workers=int(args.workers), mode=mode, source=source_of(args),
                        slo_ttft_ms=float(args.slo_ttft), slo_tpot_ms=float(args.slo_tpot),
                        slo_itl_ms=slo_itl(args), split=tuple(split) if split is not None else None,
                        request_timeout_s=float(args.request_timeout), **given)


def slo_itl(args) -> float | None:
    """The stall SLO, passed on to each run when the comparison has one."""
    value = getattr(args, "slo_itl", None)
    return None if value is None else float(value)


def run_des(args, mode: str, split: tuple[int, int] | None, out: Path) -> Run:
    """One run in virtual time: `dopd simulate`'s own (services/simulate/api.py), results.json
    written as it writes it, kept in memory for the plots."""
    from services.simulate.api import save, simulate_run

    result = simulate_run(des_spec(args, mode, split))
    if result.outcome.leaks:
        raise RuntimeError(f"{mode}: the simulator's leak check failed: {'; '.join(result.outcome.leaks)}")
    save(result, out)
    split = result.cfg.initial_split if serving_mode(mode).disaggregated else None
    return Run(mode, split, result.results, result.requests, result.samples, "des")


def bench_spec(args, target: str, out: Path) -> BenchSpec:
    """`dopd bench`'s run against a cluster the comparison brought up (no progress bar; the API
    key, if any, from the environment, as the cluster has it)."""
    return BenchSpec(source=source_of(args), slo_ttft_ms=float(args.slo_ttft), slo_tpot_ms=float(args.slo_tpot),
                     out=out, slo_itl_ms=slo_itl(args), target=target, api_key=os.environ.get("DOPD_API_KEY", ""),
                     time_scale=float(args.time_scale), request_timeout_s=float(args.request_timeout),
                     progress=False)


def run_services(args, mode: str, split: tuple[int, int] | None, out: Path) -> Run:
    """One run on the real services: bring up the mode's cluster, `dopd bench` it, take it down."""
    from services.bench.api import bench_once
    from services.launcher import Cluster, ClusterSpec, free_port

    m = serving_mode(mode)
    p, d = split if split is not None else default_split(args.workers)  # aggregated: all decode anyway
    model = f"sim:{args.profile}" if args.engine == "sim" else args.model
    extra = {"DOPD_KV_TIMEOUT_S": str(30 * args.time_scale)}
    if args.engine != "sim" and args.profile:  # a real model: the profile the planner and policy reason with
        extra["DOPD_PLANNER_PROFILE"] = args.profile
    if args.max_batch_size is not None:
        extra["DOPD_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.prefill_token_budget is not None:
        extra["DOPD_PREFILL_TOKEN_BUDGET"] = str(args.prefill_token_budget)
    if args.chunk_tokens is not None:
        extra["DOPD_STEP_TOKEN_BUDGET"] = str(args.chunk_tokens)
    spec = ClusterSpec(model=model, prefill=p, decode=d, port=free_port(),
                       log_dir=Path(tempfile.mkdtemp(prefix=f"dopd-compare-{mode}-")),
                       kv_blocks=args.kv_blocks or ClusterSpec.kv_blocks, time_scale=args.time_scale,
                       planner="dynamic" if m.switching else "static", mode=mode,
                       predictor=args.predictor or "arima",
                       slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot, slo_itl_ms=args.slo_itl, extra_env=extra,
                       torch_threads=args.torch_threads)
    cluster = Cluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(600)
        rc, results = bench_once(bench_spec(args, cluster.gateway_address, out))
        switches = role_switches(cluster.proc("planner").metrics_address) if rc == 0 else None
    finally:
        cluster.stop()
    if rc != 0:
        raise RuntimeError(f"{mode}: dopd bench failed ({rc}); logs in {spec.log_dir}")
    results["switches"] = switches
    (out / "results.json").write_text(json.dumps(results, indent=2))  # with the switches, for --reuse
    return load_services_run(args, mode, (p, d) if m.disaggregated else None, out, results)


def load_services_run(args, mode: str, split: tuple[int, int] | None, out: Path, results: dict) -> Run:
    with open(out / "requests.jsonl") as f:
        requests = [RequestResult(**json.loads(line)) for line in f]
    return Run(mode, split, results, requests, status_samples(results), args.engine if args.model is None else "real")


def reused_run(args, mode: str, split: tuple[int, int] | None, out: Path) -> Run | None:
    """`--reuse`: the run already under `out` (results.json and requests.jsonl of `dopd bench`),
    when there is one; it must have served this comparison's workload at its SLOs and scale, or
    reusing it would mix runs of different workloads in one table (ValueError)."""
    if not (out / "results.json").exists() or not (out / "requests.jsonl").exists():
        return None
    results = json.loads((out / "results.json").read_text())
    config = results.get("config", {})
    want = {"model": f"sim:{args.profile}" if args.engine == "sim" else args.model, "workload": args.workload,
            "rate": args.rate, "burstiness": args.burstiness, "duration_s": args.duration, "seed": args.seed,
            "max_context": max_context_of(source_of(args)), "slo_ttft_ms": args.slo_ttft, "slo_tpot_ms": args.slo_tpot,
            "slo_itl_ms": args.slo_itl, "time_scale": args.time_scale}
    for key, value in want.items():
        if value is not None and config.get(key) != value:
            raise ValueError(f"--reuse: {out} served {key}={config.get(key)!r}, this comparison asks for {value!r}")
    if args.trace and [Path(t).name for t in config.get("trace") or []] != [Path(t).name for t in args.trace]:
        raise ValueError(f"--reuse: {out} served the traces {config.get('trace')}, not {args.trace}")
    return load_services_run(args, mode, split if serving_mode(mode).disaggregated else None, out, results)


def status_samples(results: dict) -> list[StatusSample]:
    """The gateway status samples `dopd bench` took during a run (results.json's timeline)."""
    return [StatusSample(**s) for s in results.get("timeline", {}).get("samples", [])]


def role_switches(metrics_address: str) -> int | None:
    """The role switches the planner made (its dopd_planner_role_switches_total, every label);
    None when its metrics cannot be read."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        body = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    return int(sum(sample.value for family in text_string_to_metric_families(body)
                   if family.name == "dopd_planner_role_switches" for sample in family.samples
                   if sample.name == "dopd_planner_role_switches_total"))
