"""The runs of `dopd bench compare` (services/comparison/compare.py): one cluster serving the workload
once, as a `Run`, on an engine: the virtual-time simulator (`run_des`, `dopd simulate`'s own path)
or the real services (`run_services`: the mode's cluster brought up, `dopd bench` against it, taken
down; `reused_run` reads one back for --reuse)."""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.modes import serving_mode
from services.bench.metrics import RequestResult
from services.bench.outcome import StatusSample
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


def source_argv(args) -> list[str]:
    argv = ["--workload", args.workload] if args.workload else ["--trace", *map(str, args.trace)]
    if args.rate is not None:
        argv += ["--rate", str(args.rate)]
    if args.duration is not None:
        argv += ["--duration", str(args.duration)]
    if args.max_context is not None:
        argv += ["--max-context", str(args.max_context)]
    return argv + ["--burstiness", str(args.burstiness), "--seed", str(args.seed),
                   "--request-timeout", str(args.request_timeout)]


def slo_itl_argv(args) -> list[str]:
    """The stall SLO, passed on to each run when the comparison has one."""
    return [] if getattr(args, "slo_itl", None) is None else ["--slo-itl", str(args.slo_itl)]


def simulate_argv(args, mode: str, split: tuple[int, int] | None, out: Path) -> list[str]:
    """`dopd simulate`'s arguments for one run of the comparison."""
    argv = ["simulate", "--profile", args.profile, "--workers", str(args.workers), "--mode", mode,
            *source_argv(args), "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot),
            *slo_itl_argv(args), "--out", str(out), "--no-plots"]
    if getattr(args, "until", None) is not None:
        argv += ["--until", str(args.until)]
    if split is not None:
        argv += ["--split", f"{split[0]}:{split[1]}"]
    for name in ("kv_blocks", "max_batch_size", "prefill_token_budget", "chunk_tokens", "decode_queue_limit"):
        if getattr(args, name, None) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.predictor:
        argv += ["--predictor", args.predictor]
    return argv


def run_des(args, mode: str, split: tuple[int, int] | None, out: Path) -> Run:
    """One run in virtual time: `dopd simulate`'s own path (results.json as it writes it), kept in
    memory for the plots."""
    from services.simulate.cli import add_simulate_parser, build_requests, config_from_args, results_doc
    from services.simulate.sim import simulate

    parser = argparse.ArgumentParser(prog="dopd")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    sargs = parser.parse_args(simulate_argv(args, mode, split, out))
    cfg = config_from_args(sargs)
    requests, duration = build_requests(sargs)
    outcome = simulate(requests, cfg)
    if outcome.leaks:
        raise RuntimeError(f"{mode}: the simulator's leak check failed: {'; '.join(outcome.leaks)}")
    results = results_doc(requests, outcome, cfg, sargs, duration)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    split = cfg.initial_split if serving_mode(mode).disaggregated else None
    return Run(mode, split, results, outcome.results, outcome.samples, "des")


def run_services(args, mode: str, split: tuple[int, int] | None, out: Path) -> Run:
    """One run on the real services: bring up the mode's cluster, `dopd bench` it, take it down."""
    from services.bench.cli import add_bench_parser
    from services.launcher import Cluster, ClusterSpec, free_port

    def dopd(argv: list[str]) -> int:  # `dopd bench`, the harness's own parser and run
        parser = argparse.ArgumentParser(prog="dopd")
        add_bench_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.func(args)

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
        rc = dopd(["bench", "--target", cluster.gateway_address, *source_argv(args), "--slo-ttft", str(args.slo_ttft),
                   "--slo-tpot", str(args.slo_tpot), *slo_itl_argv(args), "--time-scale", str(args.time_scale),
                   "--out", str(out),
                   "--no-progress"])
        switches = role_switches(cluster.proc("planner").metrics_address) if rc == 0 else None
    finally:
        cluster.stop()
    if rc != 0:
        raise RuntimeError(f"{mode}: dopd bench failed ({rc}); logs in {spec.log_dir}")
    results = json.loads((out / "results.json").read_text())
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
    from services.bench.sources import max_context_of

    results = json.loads((out / "results.json").read_text())
    config = results.get("config", {})
    want = {"model": f"sim:{args.profile}" if args.engine == "sim" else args.model, "workload": args.workload,
            "rate": args.rate, "burstiness": args.burstiness, "duration_s": args.duration, "seed": args.seed,
            "max_context": max_context_of(args), "slo_ttft_ms": args.slo_ttft, "slo_tpot_ms": args.slo_tpot,
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
