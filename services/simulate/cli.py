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
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from services.bench.metrics import SLO_ITL_HELP
from services.bench.sources import DEFAULT_MAX_CONTEXT, source_of

if TYPE_CHECKING:
    from services.simulate.api import SimulateSpec


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
    from services.bench.workloads import WORKLOADS
    from services.planner.predictors import predictor_names
    from services.simulate.api import SimulateSpec as spec  # its defaults are the command's
    from services.simulate.sim import MODES

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
    p.add_argument("--interval", type=float, default=spec.interval_s,
                   help="planner interval, virtual seconds")
    p.add_argument("--predictor", choices=predictor_names(), default=spec.predictor)
    p.add_argument("--link-gbps", type=float, help="KV link per worker, Gb/s (default: by profile, see "
                                                   "services/simulate/hardware.py)")
    for name, what in (("kv_blocks", "KV blocks per worker"), ("block_size", "tokens per KV block"),
                       ("max_batch_size", "decode batch at most"),
                       ("prefill_token_budget", "prompt tokens per prefill forward")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(spec, name),
                       help=f"{what} (default %(default)s, as the workers')")
    p.add_argument("--decode-queue-limit", type=int, default=spec.decode_queue_limit,
                   help="requests that may wait for decode room, as the gateway's (default %(default)s; 0: a "
                        "request with no room is refused at once)")
    p.add_argument("--chunk-tokens", type=int, default=spec.chunk_tokens,
                   help="tokens a step on a worker that prefills its own prompts (aggregated; DOPD's "
                        "ultra-short path): decodes plus prompt chunks (default %(default)s)")
    p.add_argument("--admission", action=argparse.BooleanOptionalAction, default=None,
                   help="admission control: refuse at once a request whose predicted TTFT is past the SLO "
                        "(default: on in dopd and dopd-no-planner, which run the scheduling policy)")
    p.add_argument("--cooldown", type=float, default=spec.cooldown_s,
                   help="seconds after a switch before the next forecast move")
    p.add_argument("--request-timeout", type=float, default=spec.request_timeout_s,
                   help="seconds per request (as `dopd bench`)")
    p.add_argument("--sample-interval", type=float, default=spec.sample_interval_s,
                   help="seconds between status samples")
    p.add_argument("--write-requests", action="store_true", help="also DIR/requests.jsonl (large for long runs)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run_simulate)
    return p


def simulate_spec(args) -> SimulateSpec:
    """The run `dopd simulate`'s arguments describe."""
    from services.simulate.api import SimulateSpec

    return SimulateSpec(
        profile=args.profile, workers=args.workers, mode=args.mode, source=source_of(args), slo_ttft_ms=args.slo_ttft,
        slo_tpot_ms=args.slo_tpot, slo_itl_ms=args.slo_itl, split=args.split, interval_s=args.interval,
        predictor=args.predictor, cooldown_s=args.cooldown, link_gbps=args.link_gbps, kv_blocks=args.kv_blocks,
        block_size=args.block_size, max_batch_size=args.max_batch_size,
        prefill_token_budget=args.prefill_token_budget, decode_queue_limit=args.decode_queue_limit,
        chunk_tokens=args.chunk_tokens, admission=args.admission, request_timeout_s=args.request_timeout,
        sample_interval_s=args.sample_interval)


def run_simulate(args) -> int:
    """0 when the run completed some request and left nothing behind; 1 when no request completed
    or the leak check failed; 2 on bad arguments."""
    from services.bench.sources import print_summary
    from services.simulate.api import save, simulate_run

    started = time.perf_counter()
    try:
        result = simulate_run(simulate_spec(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results, outcome, cfg = result.results, result.outcome, result.cfg
    save(result, args.out, args.write_requests)
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
