"""`dopd simulate`: a whole cluster in virtual time (services/simulate), writing DIR/results.json
and the plots as `dopd bench` does.

    dopd simulate --profile NAME --workers N --mode MODE [--split P:D]
                  (--workload NAME | --trace FILE...) [--rate R] [--duration S] [--seed N]
                  [--burstiness B] [--max-context N] --slo-ttft MS --slo-tpot MS --out DIR
                  [--interval S] [--predictor NAME] [--link-gbps G] [--kv-blocks N] ...

Traces: JSONL (services/bench/trace.py) or Azure CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`);
several are merged onto one clock. Modes (common/modes.py): `aggregated` (every worker prefills,
in chunks, and decodes), `static` (the split kept, first come first served), `dopd` (the planner
every interval, switching roles in place with KV migration modelled, plus the scheduling policy
with admission control), and the ablations `dopd-no-policy` and `dopd-no-planner`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from services.bench.metrics import SLO_ITL_HELP
from services.bench.sources import DEFAULT_MAX_CONTEXT


def _split(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P:D, e.g. 4:12, got {text!r}") from None
    if p < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"each role needs at least one worker, got {text!r}")
    return p, d


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Add `simulate` to a `dopd` subparsers object; it runs `run_simulate`."""
    from common.config import GatewaySettings, PlannerSettings
    from services.bench.workloads import WORKLOADS
    from services.planner.predictors import predictor_names
    from services.simulate.sim import DEFAULT_CHUNK_TOKENS, MODES, SimConfig, setting

    p = subparsers.add_parser("simulate", help="simulate a whole cluster in virtual time (no services started)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="latency profile: a shipped name (common/profiles) or a file")
    p.add_argument("--workers", type=int, required=True, help="workers in all (>= 2)")
    p.add_argument("--mode", choices=MODES, required=True, help="serving mode (see above)")
    p.add_argument("--split", type=_split, help="P:D at the start (default half and half, decode gets the odd one)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", choices=sorted(WORKLOADS), help="a built-in seeded workload")
    source.add_argument("--trace", type=Path, nargs="+", help="JSONL or Azure CSV trace(s), merged onto one clock")
    p.add_argument("--rate", type=float, help="requests/s (workloads: default 1; traces: rescale to this mean rate)")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape: 1 = Poisson, < 1 burstier")
    p.add_argument("--duration", type=float, help="seconds of arrivals (workloads: default 60; traces: cut here)")
    p.add_argument("--until", type=float, metavar="S",
                   help="serve only the requests sent before S, the schedule kept as for the whole --duration "
                        "(a workload's first phase: what a placement chosen in advance sees)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-context", type=int, default=None,
                   help=f"prompt + output tokens at most, the prompt cut first (workloads: default "
                        f"{DEFAULT_MAX_CONTEXT}; traces: as they are unless given)")
    p.add_argument("--slo-ttft", type=float, required=True, metavar="MS", help="TTFT SLO in ms")
    p.add_argument("--slo-tpot", type=float, required=True, metavar="MS", help="TPOT SLO in ms")
    p.add_argument("--slo-itl", type=float, metavar="MS", help=SLO_ITL_HELP)
    p.add_argument("--out", type=Path, required=True, help="directory for results.json and the plots")
    p.add_argument("--interval", type=float, default=setting(PlannerSettings, "interval_s"),
                   help="planner interval, virtual seconds")
    p.add_argument("--predictor", choices=predictor_names(), default=setting(PlannerSettings, "predictor"))
    p.add_argument("--link-gbps", type=float, help="KV link per worker, Gb/s (default: by profile, see "
                                                   "services/simulate/hardware.py)")
    for name, what in (("kv_blocks", "KV blocks per worker"), ("block_size", "tokens per KV block"),
                       ("max_batch_size", "decode batch at most"),
                       ("prefill_token_budget", "prompt tokens per prefill forward")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(SimConfig, name),
                       help=f"{what} (default %(default)s, as the workers')")
    p.add_argument("--decode-queue-limit", type=int, default=setting(GatewaySettings, "decode_queue_limit"),
                   help="requests that may wait for decode room, as the gateway's (default %(default)s; 0: a "
                        "request with no room is refused at once)")
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                   help="tokens a step on a worker that prefills its own prompts (aggregated; DOPD's "
                        "ultra-short path): decodes plus prompt chunks (default %(default)s)")
    p.add_argument("--admission", action=argparse.BooleanOptionalAction, default=None,
                   help="admission control: refuse at once a request whose predicted TTFT is past the SLO "
                        "(default: on in dopd and dopd-no-planner, which run the scheduling policy)")
    p.add_argument("--cooldown", type=float, default=setting(PlannerSettings, "cooldown_s"),
                   help="seconds after a switch before the next forecast move")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (as `dopd bench`)")
    p.add_argument("--sample-interval", type=float, default=0.5, help="seconds between status samples")
    p.add_argument("--write-requests", action="store_true", help="also DIR/requests.jsonl (large for long runs)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run_simulate)
    return p


def build_requests(args):
    """The run's requests and its schedule's duration, exactly as `dopd bench` builds them."""
    from services.bench.sources import build_requests as bench_requests

    return bench_requests(args, args.rate)


def config_from_args(args):
    from dataclasses import replace

    from common.profile import load_profile
    from services.simulate.hardware import default_link_gbps
    from services.simulate.sim import SimConfig, default_policy

    profile = load_profile(args.profile)
    return SimConfig(
        profile=profile, workers=args.workers, mode=args.mode, split=args.split,
        link_gbps=args.link_gbps if args.link_gbps is not None else default_link_gbps(profile),
        kv_blocks=args.kv_blocks, block_size=args.block_size, max_batch_size=args.max_batch_size,
        prefill_token_budget=args.prefill_token_budget, request_timeout_s=args.request_timeout,
        interval_s=args.interval, sample_interval_s=args.sample_interval, slo_ttft_s=args.slo_ttft / 1e3,
        slo_tpot_s=args.slo_tpot / 1e3, slo_itl_s=args.slo_itl / 1e3 if args.slo_itl is not None else None,
        predictor=args.predictor,
        policy=replace(default_policy(), cooldown_s=args.cooldown), chunk_tokens=args.chunk_tokens,
        admission=args.admission, decode_queue_limit=args.decode_queue_limit)


def results_doc(requests, outcome, cfg, args, schedule_duration: float) -> dict:
    """results.json: `dopd bench`'s (services/bench/report.build_results), with `harness` saying
    there was none and `simulation` holding what only a simulation knows."""
    from services.bench.outcome import RunOutcome
    from services.bench.report import build_results
    from services.bench.sources import max_context_of

    tokens = sum(r.output_tokens for r in outcome.results if r.ok)
    run = RunOutcome(results=outcome.results, samples=outcome.samples, duration=outcome.duration,
                     wall_s=outcome.duration, cpu_s=0.0, lateness=[0.0] * len(requests), sent=len(requests),
                     messages=tokens, tokens=tokens,
                     length_mismatch=sum(r.ok and r.output_tokens != q.output_tokens
                                         for r, q in zip(outcome.results, requests, strict=True)))
    p, d = cfg.initial_split
    config = {"simulator": "virtual time", "profile": cfg.profile.name, "workers": cfg.workers, "mode": cfg.mode,
              "split": [p, d], "workload": args.workload, "trace": [str(t) for t in args.trace or []] or None,
              "rate": args.rate, "burstiness": args.burstiness, "duration_s": schedule_duration, "seed": args.seed,
              "slo_ttft_ms": args.slo_ttft, "slo_tpot_ms": args.slo_tpot, "slo_itl_ms": args.slo_itl, "time_scale": 1.0,
              "max_context": max_context_of(args), "request_timeout_s": cfg.request_timeout_s,
              "requests": len(requests), "until_s": args.until, "interval_s": cfg.interval_s,
              "predictor": cfg.predictor,
              "link_gbps": cfg.link_gbps, "kv_blocks": cfg.kv_blocks, "block_size": cfg.block_size,
              "max_batch_size": cfg.max_batch_size, "prefill_token_budget": cfg.prefill_token_budget,
              "cooldown_s": cfg.policy.cooldown_s, "chunk_tokens": cfg.chunk_tokens,
              "admission": cfg.admission, "decode_queue_limit": cfg.decode_queue_limit}
    results = build_results(requests, run, config, schedule_duration, args.slo_ttft, args.slo_tpot, None,
                            slo_itl_ms=args.slo_itl)
    results["harness"] = {"simulated": True, "saturated": False, "saturation_reasons": [],
                          "note": "virtual time: no client, no gateway ceiling"}
    results["simulation"] = {
        "events": outcome.events, "decode_steps": outcome.decode_steps, "prefill_batches": outcome.prefill_batches,
        "switches": outcome.switches, "migrated_requests": sum(s["migrated"] for s in outcome.switches),
        "migrated_bytes": sum(s["migrated_bytes"] for s in outcome.switches),
        "drained_requests": sum(s["drained"] for s in outcome.switches), "refused": outcome.refused,
        "decisions": [list(x) for x in outcome.decisions], "configurations": outcome.configurations,
        "leaks": outcome.leaks,
        # Host figures: the only ones that differ between two runs of the same arguments.
        "host": {"wall_s": outcome.wall_s, "cpu_s": outcome.cpu_s, "decision_seconds": outcome.decision_seconds,
                 "sim_to_wall": outcome.duration / outcome.wall_s if outcome.wall_s > 0 else None}}
    return results


def run_simulate(args) -> int:
    """0 when the run completed some request and left nothing behind; 1 when no request completed
    or the leak check failed; 2 on bad arguments."""
    from dataclasses import asdict

    from services.bench.sources import print_summary
    from services.simulate.sim import simulate

    started = time.perf_counter()
    try:
        cfg = config_from_args(args)
        requests, schedule_duration = build_requests(args)
        outcome = simulate(requests, cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = results_doc(requests, outcome, cfg, args, schedule_duration)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if args.write_requests:
        with open(args.out / "requests.jsonl", "w") as f:
            for r in outcome.results:
                f.write(json.dumps(asdict(r)) + "\n")
    if not args.no_plots:
        from services.bench.plots import plot_latency_cdfs, plot_timeline

        plot_latency_cdfs(outcome.results, args.out, args.slo_ttft, args.slo_tpot)
        plot_timeline(outcome.samples, results["timeline"]["arrivals_per_s"], args.out)
    print_summary(results, args.out)
    sim = results["simulation"]
    print(f"  {cfg.mode}: {len(outcome.switches)} switches, {sim['migrated_requests']} requests migrated "
          f"({sim['migrated_bytes'] / 1e9:.2f} GB), {sim['drained_requests']} finished in place")
    print(f"  simulated {outcome.duration:.1f} s in {outcome.wall_s:.2f} s wall "
          f"({outcome.duration / max(outcome.wall_s, 1e-9):.1f}x real time; {outcome.events} events, "
          f"{outcome.decode_steps} decode steps); {time.perf_counter() - started:.1f} s with I/O and plots")
    if outcome.leaks:
        print("error: leak check failed: " + "; ".join(outcome.leaks), file=sys.stderr)
        return 1
    return 0 if results["completed"] or not results["requests"] else 1
