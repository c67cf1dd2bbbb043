"""`dopd bench compare`'s arguments, apart from the comparison itself: `dopd reach` parses a
recorded comparison's command with them (services/comparison/reach_cli.py), which the
comparison in turn calls for its bounds."""

from __future__ import annotations

import argparse

from common.modes import MODES
from services.comparison.baselines import VARIANTS


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compare")
    g.add_argument("--modes", default="aggregated,static,dopd",
                   help=f"comma-separated, of: {', '.join((*MODES, *VARIANTS))} (default %(default)s)")
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
    g.add_argument("--decode-queue-limit", type=int,
                   help="des: requests that may wait for decode room (0: refused at once; default: the gateway's)")
    g.add_argument("--torch-threads", type=int, default=0,
                   help="sim engine or model: torch threads per worker (default: cores / workers)")
    g.add_argument("--predictor", help="the planner's predictor")
    g.add_argument("--sweep-from", type=float, help="des: also each mode's DistServe goodput, by a rate search "
                                                    "from this rate")
    g.add_argument("--sweep-target", type=float, default=0.9, help="attainment the goodput rate must keep")
    g.add_argument("--sweep-runs", type=int, default=10, help="runs per rate search at most")
    g.add_argument("--sweep-splits", type=int, default=0,
                   help="static: sweep only its best K splits at the base rate (default 0: every split)")
    g.add_argument("--reuse", action="store_true",
                   help="real services: take a mode's run already under --out (same workload, SLOs and scale) "
                        "instead of serving it again, e.g. to add modes to an earlier comparison")
