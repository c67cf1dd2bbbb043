"""`dopd bench compare`: the same workload, with the same seed, served by each serving mode
(common/modes.py) in one run, and the figures side by side.

    dopd bench compare --modes aggregated,static,dopd [--engine des|sim --profile NAME | --model M]
                       --workers N (--workload NAME | --trace FILE...) [--rate R] [--time-scale F]
                       --slo-ttft MS --slo-tpot MS --out DIR [--static-splits all|P:D,...|des:K]

Engines: `des` runs the virtual-time simulator (`dopd simulate`: minutes for hours of traffic);
`sim` brings up the real services on the sim engine (`dopd up --engine sim`, time-scaled), runs
`dopd bench` against them and takes them down; `--model M` does the same with a real model.

`static` is run at every split of the N workers and the best (by goodput, then attainment) is
its figure: the strongest baseline, not a strawman. The baselines as users run them
(services/comparison/baselines.py): `aggregated` at vLLM's chunk budget, `aggregated-best` at the best
of 512, 2048 and 8192 tokens a step, and `static-apriori`, the split the simulator ranks best on
what is known in advance (a workload's first phase, a trace's first 10 minutes), then kept. dopd
is judged against the best fixed design in hindsight (static, aggregated, aggregated-best) and
against the peers (aggregated at vLLM's budget, static-apriori). On the real services every split of 16
workers is 15 runs of an hour each here, so there `--static-splits des:K` (the default) ranks
the splits in the simulator and runs the best K for real; compare.json says which were run where.

With `--sweep-from R` (simulator only) each mode's DistServe goodput is measured too: the highest
rate at which >= 90% of requests meet every SLO (services/bench/sweep.py's RateSearch from R; static
at each split run and aggregated-best at each budget, each its own rate goodput, the best kept),
and dopd is judged on it as well.

Writes DIR/compare.json (per mode: p50/p90/p99 TTFT and TPOT, stalls, attainment, goodput and per
GPU, completed, refused and failed counts; for static the split used and every split's goodput;
dopd against the best fixed design and against the peers, with the goals), DIR/compare.md (the
same as tables), and plots: the latency CDFs per mode, goodput per mode, and dopd's P/D split over
time. Each run's own results.json and plots are under DIR/<run>/ (services/comparison/compare_runs.py).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common.modes import serving_mode
from services.comparison.arguments import add_compare_arguments
from services.comparison.baselines import (
    AGGREGATED_BUDGETS,
    BASELINES,
    GOALS,
    PEERS,
    VARIANTS,
    apriori_until,
    base_mode,
)
from services.comparison.compare_report import markdown, plot
from services.comparison.compare_runs import Run, reused_run, run_des, run_dir, run_services

__all__ = ["BASELINES", "GOALS", "Run", "add_compare_arguments"]  # importable from here too


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
                  progress: Callable[[str], None], chunk_tokens: int | None = None) -> dict:
    """DistServe's goodput of one mode (at one split, or one chunk budget) in the simulator: the
    highest rate with >= args.sweep_target of requests meeting every SLO."""
    from services.bench.sweep import RateSearch

    search = RateSearch(min_rate=args.sweep_from, target=args.sweep_target, max_runs=args.sweep_runs,
                        rel_tol=0.05)
    base_rate, base_chunk = args.rate, args.chunk_tokens
    try:
        if chunk_tokens is not None:
            args.chunk_tokens = chunk_tokens
        while (rate := search.next_rate()) is not None:
            progress(f"{mode} sweep at {rate:g} req/s")
            args.rate = rate
            run = run_des(args, base_mode(mode), split, out / f"rate-{rate:g}")
            search.record(rate, run.results["slo_attainment"])
    finally:
        args.rate, args.chunk_tokens = base_rate, base_chunk
    return {"split": None if split is None else f"{split[0]}:{split[1]}", "chunk_tokens": chunk_tokens,
            "goodput_rate": search.best(), "points": search.points}


def add_sweeps(doc: dict, runs: dict[str, list[Run]], args, progress: Callable[[str], None]) -> None:
    """Each mode's DistServe goodput (static at each split, aggregated-best at each budget: each
    its own rate goodput, the best kept), and dopd against the better baseline's."""
    for mode, mode_runs in runs.items():
        sweeps = []
        for r in ranked(mode_runs)[:args.sweep_splits or None] if mode == "static" else mode_runs:
            name = run_dir(mode, r.split, r.chunk_tokens)
            split = r.split if serving_mode(base_mode(mode)).disaggregated else None
            sweeps.append(sweep_goodput(args, mode, split, args.out / "sweeps" / name, progress, r.chunk_tokens))
        top = max(sweeps, key=lambda s: s["goodput_rate"] or 0.0)
        doc["modes"][mode]["goodput_rate"] = top["goodput_rate"]
        doc["modes"][mode]["goodput_rate_per_gpu"] = top["goodput_rate"] / args.workers if top["goodput_rate"] else None
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
    """compare.json: each mode's figures (static: its best split's, plus every split tried;
    aggregated-best: its best budget's, plus every budget tried), goodput per GPU, and dopd
    against the best fixed design in hindsight and against each peer as its users run it."""
    modes = {}
    for mode, runs in runs_by_mode.items():
        chosen = best(runs)
        fig = chosen.figures()
        if config.get("workers"):
            fig["goodput_per_gpu"] = fig["goodput"] / config["workers"]
        if mode == "static":
            fig["splits_tried"] = [{"split": r.figures()["split"], "engine": r.engine, "goodput": r.results["goodput"],
                                    "slo_attainment": r.results["slo_attainment"]} for r in runs]
        if mode == "aggregated-best":
            fig["budgets_tried"] = [{"chunk_tokens": r.chunk_tokens, "goodput": r.results["goodput"],
                                     "slo_attainment": r.results["slo_attainment"]} for r in runs]
        modes[mode] = fig
    doc = {"config": config, "modes": modes}
    baselines = [m for m in BASELINES if m in modes]
    if "dopd" in modes and baselines:
        base = max(baselines, key=lambda m: (modes[m]["goodput"], modes[m]["slo_attainment"] or 0.0))
        doc["dopd_vs_best_baseline"] = {"baseline": base, **verdict(modes["dopd"], modes[base])}
    peers = [m for m in PEERS if m in modes]
    if "dopd" in modes and peers:
        doc["dopd_vs_peers"] = {peer: verdict(modes["dopd"], modes[peer]) for peer in peers}
    return doc


# -- engines ------------------------------------------------------------------------------------


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
    apriori: dict | None = None
    # static first: the other disaggregated modes start from its best split (unless --split), so
    # that dopd-no-planner is exactly the best static cluster plus the policy.
    for mode in sorted(args.modes, key=lambda m: m != "static"):
        if mode == "static":
            runs[mode] = []
            for split in splits:
                progress(f"static {split[0]}:{split[1]}")
                runs[mode].append(engine(args, mode, split, args.out / run_dir(mode, split)))
            continue
        if mode == "aggregated-best":
            runs[mode] = [aggregated_at(args, engine, budget, progress) for budget in AGGREGATED_BUDGETS]
            continue
        if mode == "static-apriori":
            apriori = apriori_split(args, progress)
            progress(f"static-apriori {apriori['split']}")
            runs[mode] = [engine(args, "static", apriori["chosen"], args.out / mode)]
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
    from services.comparison.reach_cli import add_reach

    doc = build_doc(runs, config)
    if apriori is not None:
        doc["modes"]["static-apriori"]["chosen_on"] = {k: v for k, v in apriori.items() if k != "chosen"}
    if args.sweep_from:
        add_sweeps(doc, runs, args, progress)
    add_reach(doc, args)  # whether any scheduler could meet the goals (services/bench/reach.py)
    if rank_runs:
        doc["static_des_ranking"] = [{"split": f"{r.split[0]}:{r.split[1]}", "goodput": r.results["goodput"],
                                      "slo_attainment": r.results["slo_attainment"]} for r in rank_runs]
    return doc, {mode: best(rs) for mode, rs in runs.items()}


def aggregated_at(args, engine, budget: int, progress: Callable[[str], None]) -> Run:
    """aggregated-best's run at one chunk budget (tokens a step, decodes included)."""
    progress(f"aggregated at {budget} tokens a step")
    saved = args.chunk_tokens
    args.chunk_tokens = budget
    try:
        run = engine(args, "aggregated", None, args.out / run_dir("aggregated-best", None, budget))
    finally:
        args.chunk_tokens = saved
    run.chunk_tokens = budget
    return run


def apriori_split(args, progress: Callable[[str], None]) -> dict:
    """The split DistServe's placement would deploy: every split simulated on the part of the run
    known in advance (baselines.apriori_until), the best by goodput, then attainment."""
    span = None
    if args.workload is None:  # a trace: its span as this run schedules it (rescaled, cut)
        from services.bench.sources import build_requests, source_of

        span = build_requests(source_of(args))[1]
    until = apriori_until(args.workload, args.duration, span)
    saved = getattr(args, "until", None)
    args.until = until
    try:
        fitted = []
        for split in all_splits(args.workers):
            progress(f"static-apriori fit {split[0]}:{split[1]} (des, first {until:g} s)")
            fitted.append(run_des(args, "static", split, args.out / "apriori-fit" / run_dir("static", split)))
    finally:
        args.until = saved
    chosen = best(fitted).split
    return {"chosen": chosen, "split": f"{chosen[0]}:{chosen[1]}", "until_s": until,
            "fit": [{"split": f"{r.split[0]}:{r.split[1]}", "goodput": r.results["goodput"],
                     "slo_attainment": r.results["slo_attainment"]} for r in fitted]}


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
        if m not in VARIANTS:
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
    if "static-apriori" in modes and args.profile is None:
        raise ValueError("static-apriori ranks the splits in the simulator: it needs --profile")
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
    total = (len(args.modes) - ("static" in args.modes) + len(rank) + static_runs
             + ("aggregated-best" in args.modes) * (len(AGGREGATED_BUDGETS) - 1)
             + ("static-apriori" in args.modes) * (args.workers - 1))
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
