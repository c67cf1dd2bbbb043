"""`dopd bench compare`: the same workload, with the same seed, served by each serving mode
(common/modes.py) in one run, and the figures side by side.

    dopd bench compare --modes aggregated,static,dopd [--engine des|sim --profile NAME | --model M]
                       --workers N (--workload NAME | --trace FILE...) [--rate R] [--time-scale F]
                       --slo-ttft MS --slo-tpot MS --out DIR [--static-splits all|P:D,...|des:K]

Engines: `des` runs the virtual-time simulator (`dopd simulate`: minutes for hours of traffic);
`sim` brings up the real services on the sim engine (`dopd up --engine sim`, time-scaled), runs
`dopd bench` against them and takes them down; `--model M` does the same with a real model.

`static` is run at every split of the N workers and the best (by goodput, then attainment) is
its figure: the strongest baseline, not a strawman. On the real services every split of 16
workers is 15 runs of an hour each here, so there `--static-splits des:K` (the default) ranks
the splits in the simulator and runs the best K for real; compare.json says which were run where.

With `--sweep-from R` (simulator only) each mode's DistServe goodput is measured too: the highest
rate at which >= 90% of requests meet both SLOs (services/bench/sweep.py's RateSearch from R;
static at its best SWEPT_SPLITS splits of the base run), and dopd is judged on it as well.

Writes DIR/compare.json (per mode: p50/p90/p99 TTFT and TPOT, attainment, goodput, completed,
refused and failed counts; for static the split used and every split's goodput; dopd against the
better of static and aggregated, with the goals), DIR/compare.md (the same as tables), and
plots: the latency CDFs per mode, goodput per mode, and dopd's P/D split over time. Each run's own
results.json and plots are under DIR/<run>/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.modes import MODES, serving_mode
from services.bench.compare_report import markdown, plot
from services.bench.metrics import RequestResult
from services.bench.outcome import StatusSample
from services.simulate.sim import default_split

BASELINES = ("static", "aggregated")
SWEPT_SPLITS = 3  # static's best splits at the base rate that a goodput sweep runs
FIGURES = ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
           "median_request_p99_itl_ms", "p99_request_p99_itl_ms", "max_itl_ms", "itl_attainment",
           "slo_attainment", "goodput", "completed", "refused", "failed", "requests")
# DOPD's goals against the better baseline (the issue's, after the DOPD paper's figures).
GOALS = {"goodput_ratio": 1.5, "p90_ttft_change": -0.5, "p90_tpot_change": -0.2, "attainment": 0.99}


@dataclass
class Run:
    """One cluster served the workload once: a mode at a split."""

    mode: str
    split: tuple[int, int] | None  # at the start (dopd modes switch from it); None: aggregated
    results: dict
    requests: list[RequestResult] = field(default_factory=list)
    samples: list[StatusSample] = field(default_factory=list)  # status samples over the run, for the split plot
    engine: str = "des"

    def figures(self) -> dict:
        r = self.results
        refused = r["errors"].get("RESOURCE_EXHAUSTED", 0) if r.get("errors") else 0
        out = {k: r.get(k) for k in FIGURES if k not in ("refused", "failed")}
        out["refused"] = refused
        out["failed"] = r["failed"] - refused
        out["split"] = None if self.split is None else f"{self.split[0]}:{self.split[1]}"
        out["engine"] = self.engine
        sim = r.get("simulation") or {}
        out["switches"] = len(sim["switches"]) if "switches" in sim else r.get("switches")
        return out


def run_dir(mode: str, split: tuple[int, int] | None) -> str:
    """The directory a run of `mode` writes under --out (and under sweeps/): static's named by its
    split, as every split of it runs; the other modes by the mode."""
    return f"static-{split[0]}p{split[1]}d" if mode == "static" else mode


def all_splits(workers: int) -> list[tuple[int, int]]:
    return [(p, workers - p) for p in range(1, workers)]


def ranked(runs: Sequence[Run]) -> list[Run]:
    """Best first: the highest goodput, then attainment, then the lower p90 TTFT."""
    return sorted(runs, key=lambda r: (r.results["goodput"], r.results["slo_attainment"] or 0.0,
                                       -(r.results["p90_ttft_ms"] or float("inf"))), reverse=True)


def best(runs: Sequence[Run]) -> Run:
    return ranked(runs)[0]


def verdict(dopd: dict, baseline: dict) -> dict:
    """dopd's figures against the baseline's, and whether each goal is met."""
    def change(key: str) -> float | None:
        a, b = dopd.get(key), baseline.get(key)
        return None if a is None or not b else (a - b) / b

    ratio = dopd["goodput"] / baseline["goodput"] if baseline["goodput"] else None
    out = {"goodput_ratio": ratio, "p90_ttft_change": change("p90_ttft_ms"),
           "p90_tpot_change": change("p90_tpot_ms"), "attainment": dopd["slo_attainment"]}
    met = {"goodput_ratio": ratio is not None and ratio >= GOALS["goodput_ratio"],
           "p90_ttft_change": out["p90_ttft_change"] is not None and out["p90_ttft_change"] <= GOALS["p90_ttft_change"],
           "p90_tpot_change": out["p90_tpot_change"] is not None and out["p90_tpot_change"] <= GOALS["p90_tpot_change"],
           "attainment": (out["attainment"] or 0.0) >= GOALS["attainment"]}
    return {"figures": out, "goals": GOALS, "met": met}


def sweep_goodput(args, mode: str, split: tuple[int, int] | None, out: Path,
                  progress: Callable[[str], None]) -> dict:
    """DistServe's goodput of one mode (at one split) in the simulator: the highest rate with
    >= args.sweep_target of requests meeting both SLOs."""
    from services.bench.sweep import RateSearch

    search = RateSearch(min_rate=args.sweep_from, target=args.sweep_target, max_runs=args.sweep_runs,
                        rel_tol=0.05)
    base_rate = args.rate
    try:
        while (rate := search.next_rate()) is not None:
            progress(f"{mode} sweep at {rate:g} req/s")
            args.rate = rate
            run = run_des(args, mode, split, out / f"rate-{rate:g}")
            search.record(rate, run.results["slo_attainment"])
    finally:
        args.rate = base_rate
    return {"split": None if split is None else f"{split[0]}:{split[1]}", "goodput_rate": search.best(),
            "points": search.points}


def add_sweeps(doc: dict, runs: dict[str, list[Run]], args, progress: Callable[[str], None]) -> None:
    """Each mode's DistServe goodput, and dopd against the better baseline's."""
    for mode, mode_runs in runs.items():
        candidates = ranked(mode_runs)[:SWEPT_SPLITS if mode == "static" else 1]
        sweeps = []
        for r in candidates:
            name = run_dir(mode, r.split)
            split = r.split if serving_mode(mode).disaggregated else None
            sweeps.append(sweep_goodput(args, mode, split, args.out / "sweeps" / name, progress))
        top = max(sweeps, key=lambda s: s["goodput_rate"] or 0.0)
        doc["modes"][mode]["goodput_rate"] = top["goodput_rate"]
        doc["modes"][mode]["sweeps"] = sweeps
    baselines = [m for m in BASELINES if m in doc["modes"]]
    if "dopd" in doc["modes"] and baselines:
        base = max(baselines, key=lambda m: doc["modes"][m]["goodput_rate"] or 0.0)
        ours, theirs = doc["modes"]["dopd"]["goodput_rate"], doc["modes"][base]["goodput_rate"]
        ratio = ours / theirs if ours and theirs else None
        doc["dopd_vs_best_baseline_goodput_rate"] = {
            "baseline": base, "target_attainment": args.sweep_target, "dopd": ours, "baseline_rate": theirs,
            "ratio": ratio, "goal": GOALS["goodput_ratio"],
            "met": ratio is not None and ratio >= GOALS["goodput_ratio"]}


def build_doc(runs_by_mode: dict[str, list[Run]], config: dict) -> dict:
    """compare.json: each mode's figures (static: its best split's, plus every split tried)."""
    modes = {}
    for mode, runs in runs_by_mode.items():
        chosen = best(runs)
        fig = chosen.figures()
        if mode == "static":
            fig["splits_tried"] = [{"split": r.figures()["split"], "engine": r.engine, "goodput": r.results["goodput"],
                                    "slo_attainment": r.results["slo_attainment"]} for r in runs]
        modes[mode] = fig
    doc = {"config": config, "modes": modes}
    baselines = [m for m in BASELINES if m in modes]
    if "dopd" in modes and baselines:
        base = max(baselines, key=lambda m: (modes[m]["goodput"], modes[m]["slo_attainment"] or 0.0))
        doc["dopd_vs_best_baseline"] = {"baseline": base, **verdict(modes["dopd"], modes[base])}
    return doc


# -- engines ------------------------------------------------------------------------------------

def slo_itl_argv(args) -> list[str]:
    """The stall SLO, passed on to each run when the comparison has one."""
    return [] if getattr(args, "slo_itl", None) is None else ["--slo-itl", str(args.slo_itl)]


def simulate_argv(args, mode: str, split: tuple[int, int] | None, out: Path) -> list[str]:
    """`dopd simulate`'s arguments for one run of the comparison."""
    argv = ["simulate", "--profile", args.profile, "--workers", str(args.workers), "--mode", mode,
            *source_argv(args), "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot),
            *slo_itl_argv(args), "--out", str(out), "--no-plots"]
    if split is not None:
        argv += ["--split", f"{split[0]}:{split[1]}"]
    for name in ("kv_blocks", "max_batch_size", "prefill_token_budget", "chunk_tokens"):
        if getattr(args, name, None) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.predictor:
        argv += ["--predictor", args.predictor]
    return argv


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


def run_des(args, mode: str, split: tuple[int, int] | None, out: Path) -> Run:
    """One run in virtual time: `dopd simulate`'s own path (results.json as it writes it), kept in
    memory for the plots."""
    from services.cli import build_parser
    from services.simulate.cli import build_requests, config_from_args, results_doc
    from services.simulate.sim import simulate

    sargs = build_parser().parse_args(simulate_argv(args, mode, split, out))
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
    from services.cli import main as dopd
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
    from services.bench.cli import max_context_of

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


# -- the comparison -------------------------------------------------------------------------------

def static_plan(args) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """(splits to rank in the simulator first, splits to run on the chosen engine, how many
    static runs on the engine)."""
    spec = args.static_splits
    every = all_splits(args.workers)
    if spec == "all":
        return [], every, len(every)
    if spec.startswith("des:"):
        k = int(spec.split(":")[1])
        return every, [], min(k, len(every))  # the engine's splits: the simulator's best K, once ranked
    splits = []
    for part in spec.split(","):
        p, d = (int(x) for x in part.split(":"))
        if p < 1 or d < 1 or p + d != args.workers:
            raise ValueError(f"split {part} must give each role >= 1 worker and add up to {args.workers}")
        splits.append((p, d))
    return [], splits, len(splits)


def compare(args, progress: Callable[[str], None] = lambda _: None) -> tuple[dict, dict[str, Run]]:
    run_engine = run_des if args.engine == "des" else run_services

    def engine(args, mode: str, split: tuple[int, int] | None, out: Path) -> Run:
        reused = reused_run(args, mode, split, out) if getattr(args, "reuse", False) and args.engine != "des" else None
        return reused or run_engine(args, mode, split, out)

    runs: dict[str, list[Run]] = {}
    rank, splits, k = static_plan(args) if "static" in args.modes else ([], [], 0)
    rank_runs: list[Run] = []
    for split in rank:
        progress(f"static {split[0]}:{split[1]} (ranking, des)")
        rank_runs.append(run_des(args, "static", split, args.out / "des-rank" / run_dir("static", split)))
    if rank:
        splits = [r.split for r in ranked(rank_runs)[:k]]
    # static first: the other disaggregated modes start from its best split (unless --split), so
    # that dopd-no-planner is exactly the best static cluster plus the policy.
    for mode in sorted(args.modes, key=lambda m: m != "static"):
        if mode == "static":
            runs[mode] = []
            for split in splits:
                progress(f"static {split[0]}:{split[1]}")
                runs[mode].append(engine(args, mode, split, args.out / run_dir(mode, split)))
            continue
        progress(mode)
        start = args.split or (best(runs["static"]).split if runs.get("static") else None)
        runs[mode] = [engine(args, mode, start if serving_mode(mode).disaggregated else None, args.out / mode)]
    runs = {mode: runs[mode] for mode in args.modes}  # in the order asked for
    config = {"command": args.command_line, "engine": args.engine, "engine_label": engine_label(args),
              "profile": args.profile, "model": args.model, "workers": args.workers, "source": source_label(args),
              "rate": args.rate, "burstiness": args.burstiness, "duration_s": args.duration, "seed": args.seed,
              "slo_ttft_ms": args.slo_ttft, "slo_tpot_ms": args.slo_tpot, "slo_itl_ms": args.slo_itl,
              "time_scale": args.time_scale,
              "modes": list(args.modes), "static_splits": args.static_splits,
              "split_at_start": "--split" if args.split else "static's best" if runs.get("static") else "half"}
    from services.bench.reach_cli import add_reach

    doc = build_doc(runs, config)
    if args.sweep_from:
        add_sweeps(doc, runs, args, progress)
    add_reach(doc, args)  # whether any scheduler could meet the goals (services/bench/reach.py)
    if rank_runs:
        doc["static_des_ranking"] = [{"split": f"{r.split[0]}:{r.split[1]}", "goodput": r.results["goodput"],
                                      "slo_attainment": r.results["slo_attainment"]} for r in rank_runs]
    return doc, {mode: best(rs) for mode, rs in runs.items()}


def engine_label(args) -> str:
    if args.engine == "des":
        return f"virtual time (dopd simulate), profile {args.profile}"
    if args.model:
        return f"real services, model {args.model}" + (f", planner profile {args.profile}" if args.profile else "")
    return f"real services on the sim engine, profile {args.profile}, time scale {args.time_scale:g}"


def source_label(args) -> str:
    if args.workload:
        return f"{args.workload} at {args.rate or 1:g} req/s (burstiness {args.burstiness:g}, seed {args.seed})"
    names = " + ".join(Path(t).name for t in args.trace)
    return f"{names}" + (f" rescaled to {args.rate:g} req/s" if args.rate else "")


def check_args(args) -> None:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if isinstance(args.modes, str) else args.modes
    for m in modes:
        serving_mode(m)  # ValueError names the known ones
    args.modes = modes
    if args.workers is None or args.workers < 2:
        raise ValueError("--workers N (>= 2) is required")
    if args.model is None and args.profile is None:
        raise ValueError("give --profile NAME (--engine des or sim) or --model M (real services)")
    if args.model is not None:
        args.engine = "real"
    if args.engine == "des" and args.profile is None:
        raise ValueError("--engine des needs --profile")
    if args.sweep_from and args.engine != "des":
        raise ValueError("--sweep-from runs many rates: the simulator only (--engine des)")
    if args.static_splits is None:  # on the real services, rank in the simulator when it can
        args.static_splits = "des:2" if args.engine != "des" and args.profile and args.workers > 3 else "all"
    if args.static_splits.startswith("des:") and args.profile is None:
        raise ValueError("--static-splits des:K ranks the splits in the simulator: it needs --profile")


def run_compare(args) -> int:
    """0 when every mode ran; 2 on bad arguments; 1 when a run failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.command_line = "dopd " + " ".join(shlex.quote(a) for a in (getattr(args, "argv", None) or sys.argv[1:]))
    rank, _, static_runs = static_plan(args) if "static" in args.modes else ([], [], 0)
    total = len(args.modes) - ("static" in args.modes) + len(rank) + static_runs
    args.out.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=args.no_progress) as bar:
        task = bar.add_task("compare", total=total)
        started = [False]

        def step(what: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=f"running {what}")

        try:
            doc, chosen = compare(args, step)
        except (ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, RuntimeError) else 2
        bar.update(task, completed=total, description="done")
    (args.out / "compare.json").write_text(json.dumps(doc, indent=2))
    (args.out / "compare.md").write_text(markdown(doc))
    plot(chosen, args.out, args.slo_ttft, args.slo_tpot)
    print(markdown(doc))
    print(f"-> {args.out}/compare.json, compare.md, latency_cdfs.png, goodput.png"
          + (", dopd_split.png" if "dopd" in chosen and chosen["dopd"].samples else ""))
    return 0


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compare")
    g.add_argument("--modes", default="aggregated,static,dopd",
                   help=f"comma-separated, of: {', '.join(MODES)} (default %(default)s)")
    g.add_argument("--engine", choices=("des", "sim"), default="des",
                   help="des: the virtual-time simulator; sim: the real services on the sim engine")
    g.add_argument("--profile", help="latency profile (des, sim; with --model: the one the planner and the "
                                     "policy reason with, default smollm2-cpu2)")
    g.add_argument("--model", help="a real model: the real services with it (e.g. smollm2)")
    g.add_argument("--workers", type=int, help="workers in each cluster")
    g.add_argument("--split", type=lambda s: tuple(int(x) for x in s.split(":")),
                   help="P:D at the start for the disaggregated modes other than static (default: static's "
                        "best split when static runs, else half and half)")
    g.add_argument("--static-splits", help="static's splits: all (des default), P:D,P:D..., or des:K (sim "
                                           "default, des:2): the simulator's best K, run on the engine")
    g.add_argument("--kv-blocks", type=int, help="KV blocks per worker")
    g.add_argument("--max-batch-size", type=int)
    g.add_argument("--prefill-token-budget", type=int)
    g.add_argument("--chunk-tokens", type=int, help="tokens a step where a worker prefills its own prompts")
    g.add_argument("--torch-threads", type=int, default=0,
                   help="sim engine or model: torch threads per worker (default: cores / workers)")
    g.add_argument("--predictor", help="the planner's predictor")
    g.add_argument("--sweep-from", type=float, help="des: also each mode's DistServe goodput, by a rate search "
                                                    "from this rate")
    g.add_argument("--sweep-target", type=float, default=0.9, help="attainment the goodput rate must keep")
    g.add_argument("--sweep-runs", type=int, default=10, help="runs per rate search at most")
    g.add_argument("--reuse", action="store_true",
                   help="real services: take a mode's run already under --out (same workload, SLOs and scale) "
                        "instead of serving it again, e.g. to add modes to an earlier comparison")
