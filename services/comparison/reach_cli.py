"""`dopd reach DIR`: for a comparison `dopd bench compare` wrote to DIR, whether DOPD's goals
against the better baseline can be reached by any scheduler at all (services/bench/reach.py), in
its run and, where DIR has goodput sweeps, at each rate swept. Writes DIR/reach.json and
DIR/reach.md and prints the latter. `dopd bench compare` adds the same to compare.json and
compare.md as it writes them.

The workload is built again from the comparison's recorded command (the same seed, rate and
context limit give the same requests), so the bounds are over every request of the schedule,
the ones a run failed included.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from services.bench.reach import Limits, reach
from services.comparison.baselines import BASELINES, GOALS
from services.comparison.compare_runs import run_dir


def schedule(args, rate: float | None) -> tuple[list[int], float] | None:
    """(each request's prompt tokens, the last send time) of the comparison's workload at `rate`;
    None for text prompts, whose length only a tokenizer knows."""
    from dataclasses import replace

    from services.bench.sources import build_requests, source_of

    reqs, _ = build_requests(replace(source_of(args), rate=rate))
    if not reqs or any(r.prompt_tokens is None for r in reqs):
        return None
    return [r.prompt_tokens for r in reqs], max(r.t for r in reqs)


def run_reach(args, baseline_name: str, baseline: dict, rate: float | None) -> dict | None:
    """reach() for the comparison `args` describes, against `baseline`'s figures; None for a real
    model (its profile is measured, not what costs its forwards: SmolLM2 on the CPU runs up to
    0.3 s under its profile's prefill, docs/results/bench_reach_bounds.txt), without a profile, or for text
    prompts."""
    from common.profile import load_profile

    if args.model is not None or not args.profile:
        return None
    sched = schedule(args, rate)
    if sched is None:
        return None
    prompts, last_send = sched
    profile = load_profile(args.profile)
    out = reach(prompts, last_send, profile, run_limits(args, profile, max(prompts)), baseline, GOALS,
                tpot=args.engine == "des")
    return {"baseline": baseline_name, "rate": rate, "last_send_s": last_send, **out}


def run_limits(args, profile, longest: int) -> Limits:
    """What a forward of the comparison's clusters can hold: its settings where given, else the
    workers' defaults (as services/simulate/sim.SimConfig takes them), with room to spare: the
    largest prefill batch, step chunk or lone prompt, plus a full batch of decodes."""
    from dataclasses import fields

    from services.simulate.sim import SimConfig

    default = {f.name: f.default for f in fields(SimConfig)}
    batch = args.max_batch_size or default["max_batch_size"]
    budget = max(args.prefill_token_budget or default["prefill_token_budget"],
                 args.chunk_tokens or default["chunk_tokens"], longest)
    return Limits(max_batch=batch, max_forward_tokens=budget + batch, max_context=profile.model.max_context)


def add_reach(doc: dict, args) -> None:
    """doc["reach"]: whether dopd's goals against the better baseline can be met by any scheduler
    (services/bench/reach.py), in the run and at each swept rate; nothing without a profile."""
    verdict = doc.get("dopd_vs_best_baseline")
    if verdict is None:
        return
    try:
        bounds = run_reach(args, verdict["baseline"], doc["modes"][verdict["baseline"]], args.rate)
        if bounds is not None:
            doc["reach"] = {"run": bounds, "sweeps": sweep_rows(args.out, args, doc["modes"])}
    except ValueError as exc:  # bounds that cannot be taken (a limit under 1): the comparison stands without them
        doc["reach_unavailable"] = str(exc)


def recorded_args(doc: dict) -> argparse.Namespace:
    """The arguments of the `dopd bench compare` command that wrote `doc` (compare.json)."""
    from services.bench.cli import add_bench_parser
    from services.comparison.arguments import add_compare_arguments

    argv = shlex.split(doc["config"]["command"])
    if argv[:3] != ["dopd", "bench", "compare"]:
        raise ValueError(f"not a `dopd bench compare` command: {doc['config']['command']!r}")
    parser = argparse.ArgumentParser(prog="dopd")
    add_bench_parser(parser.add_subparsers(), compare=(add_compare_arguments, None))
    return parser.parse_args(argv[1:])


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def sweep_rows(out: Path, args, modes: dict) -> list[dict]:
    """At each rate every baseline mode's sweep ran: the better baseline there (by goodput; static
    at its best swept split), dopd's attainment there, and reach() against that baseline."""
    rates: dict[float, dict[str, dict]] = {}
    for mode in (*BASELINES, "dopd"):
        for sweep in modes.get(mode, {}).get("sweeps", []):
            split = tuple(int(x) for x in sweep["split"].split(":")) if sweep["split"] else None
            name = run_dir(mode, split)  # where add_sweeps wrote it
            for rate, _ in sweep["points"]:
                results = _read(out / "sweeps" / name / f"rate-{rate:g}" / "results.json")
                if results is not None:
                    best = rates.setdefault(rate, {}).get(mode)
                    if best is None or results["goodput"] > best["goodput"]:
                        rates[rate][mode] = results
    rows = []
    for rate in sorted(rates):
        found = rates[rate]
        if not all(m in found for m in BASELINES if m in modes):
            continue  # the baselines were not all run at this rate: no better one to judge by
        base = max((m for m in BASELINES if m in found), key=lambda m: found[m]["goodput"])
        row = run_reach(args, base, found[base], rate)
        if row is not None:
            row["baseline_attainment"] = found[base]["slo_attainment"]
            row["dopd_attainment"] = found["dopd"]["slo_attainment"] if "dopd" in found else None
            rows.append(row)
    return rows


def reach_doc(out: Path) -> dict:
    doc = json.loads((out / "compare.json").read_text())
    args = recorded_args(doc)
    verdict = doc.get("dopd_vs_best_baseline")
    if verdict is None:
        raise ValueError(f"{out}/compare.json has no dopd against a baseline to judge")
    base = verdict["baseline"]
    return {"command": f"dopd reach {out}", "compare_command": doc["config"]["command"],
            "run": run_reach(args, base, doc["modes"][base], args.rate),
            "sweeps": sweep_rows(out, args, doc["modes"])}


def run(args) -> int:
    from services.comparison.compare_report import reach_markdown

    try:
        doc = reach_doc(args.dir)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if doc["run"] is None:
        print("error: no bounds: the comparison ran a real model (its profile does not bound it), names no profile, "
              "or its prompts are text", file=sys.stderr)
        return 2
    text = reach_markdown(doc["run"], doc["sweeps"], title=f"# dopd reach {args.dir}\n\nCommand: `{doc['command']}`")
    (args.dir / "reach.json").write_text(json.dumps(doc, indent=2))
    (args.dir / "reach.md").write_text(text)
    print(text)
    return 0


def add_reach_parser(subparsers) -> None:
    p = subparsers.add_parser("reach", help="whether DOPD's goals in a `dopd bench compare` result can be reached "
                                            "by any scheduler (bounds from the latency profile)")
    p.add_argument("dir", type=Path, help="the comparison's --out directory (compare.json)")
    p.set_defaults(func=run)
