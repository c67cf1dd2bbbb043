"""`dopd`: bring up a local cluster, generate, and look at a cluster's status."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from common.modes import MODES, serving_mode

DEFAULT_TARGET = "127.0.0.1:50051"


def _up(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from services.launcher import Cluster, ClusterSpec, exit_description

    console = Console(stderr=True, width=160)
    log_dir = Path(args.log_dir or f"runs/up-{time.strftime('%Y%m%d-%H%M%S')}")
    model = args.model
    if args.engine == "sim":
        from common.profile import load_profile

        model = f"sim:{args.profile}"
        load_profile(args.profile)  # fail here, not in every worker, on a bad name
    planner = args.planner or ("dynamic" if serving_mode(args.mode).switching else "static")
    cluster = Cluster(ClusterSpec(model=model, prefill=args.prefill, decode=args.decode, host=args.host,
                                  port=args.port, log_dir=log_dir, kv_blocks=args.kv_blocks,
                                  torch_threads=args.torch_threads, time_scale=args.time_scale,
                                  planner=planner,
                                  mode=args.mode, predictor=args.predictor, slo_ttft_ms=args.slo_ttft,
                                  slo_tpot_ms=args.slo_tpot, slo_itl_ms=args.slo_itl, interval_s=args.interval,
                                  http_port=args.http_port, gateways=args.gateways,
                                  redis_prefix=os.environ.get("DOPD_REDIS_PREFIX", ""),
                                  extra_env={"DOPD_API_KEY": args.api_key} if args.api_key else {}))
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster.start()
    try:
        # A process that dies before the cluster was ever ready is a configuration error: say so and
        # stop. From then on the cluster runs as compose's `restart: unless-stopped`.
        with console.status(f"starting {args.prefill} prefill + {args.decode} decode workers on {model} "
                            f"(logs in {log_dir})"):
            cluster.wait_ready(args.ready_timeout, cancelled=lambda: stop["now"])
        table = Table(title=f"DOPD cluster: {model}")
        for col in ("service", "role", "gRPC", "metrics", "pid", "log"):
            table.add_column(col)
        for p in cluster.procs:
            table.add_row(p.name, p.role, p.address, f"http://{p.metrics_address}/metrics", str(p.popen.pid),
                          str(p.log_path))
        console.print(table)
        if cluster.redis is not None:
            console.print(f"started redis-server at {cluster.redis_url} (pid {cluster.redis.pid})")
        print(f"gateway ready at {cluster.gateway_address}", flush=True)
        if cluster.http_url:
            print(f"OpenAI API at {cluster.http_url}", flush=True)
        console.print("Ctrl-C stops the cluster; a process that dies is restarted.")
        while not stop["now"]:
            for event in cluster.supervise():
                log = cluster.spec.log_dir / "redis.log" if event.restart.name == "redis" else \
                    cluster.proc(event.restart.name).log_path
                style = "green" if event.kind == "restarted" else "red"
                console.print(event.describe() + ("" if event.kind == "restarted" else f"; see {log}"),
                              style=style, markup=False, highlight=False, soft_wrap=True)
            time.sleep(0.2)
        return 0
    except InterruptedError:
        return 0
    except (RuntimeError, TimeoutError) as exc:  # one line stays one line (a model's refusal), however wide
        console.print(str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
        return 1
    finally:
        codes = cluster.stop()
        console.print("stopped: " + ", ".join(f"{name}={exit_description(code)}" for name, code in codes.items()),
                      markup=False, highlight=False)
        restarts = cluster.supervisor.restarts()
        if restarts:
            console.print("restarts: " + ", ".join(f"{name}={n}" for name, n in restarts.items()),
                          markup=False, highlight=False)


def _generate(args) -> int:
    import grpc

    from services.client import generate

    kw = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
          "top_k": args.top_k, "chat": args.chat, "stop": args.stop or []}
    if args.seed is not None:
        kw["seed"] = args.seed

    async def go():
        async with grpc.aio.insecure_channel(args.target) as channel:
            return await generate(channel, args.prompt, timeout=args.timeout, api_key=args.api_key,
                                  on_text=lambda t: print(t, end="", flush=True), **kw)
    try:
        out = asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print()
    print(f"[{out.completion_tokens} tokens, finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def _role(args) -> int:
    import grpc

    from common.rpc.auth import load_token_file
    from services.client import set_worker_role

    load_token_file(args.target)  # SetRole is internal: the cluster token `dopd up` left here
    try:
        reply = asyncio.run(set_worker_role(args.target, args.worker, args.role, timeout=args.timeout,
                                            chunk_budget=args.chunk_budget))
    except (grpc.aio.AioRpcError, LookupError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        print(f"error: {detail}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2) if args.json else
          f"{args.worker}: {reply['from_role']} -> {reply['to_role']} in {reply['total_seconds'] * 1e3:.1f} ms "
          f"(drain {reply['drain_seconds'] * 1e3:.1f} ms, migration {reply['migration_seconds'] * 1e3:.1f} ms, "
          f"{reply['migrated_requests']} request(s) moved, {reply['migrated_bytes'] / 1e6:.2f} MB"
          + (f" ({reply['migrated_bytes_shared'] / 1e6:.2f} MB through shared memory)"
             if reply["migrated_bytes_shared"] else "")
          + (f" ({reply['migrated_bytes_nixl'] / 1e6:.2f} MB read with NIXL)" if reply["migrated_bytes_nixl"] else "")
          + (f", {reply['drained_requests']} finished here: {reply['note']}" if reply["fell_back_to_drain"] else "")
          + ")")
    return 0


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _status(args) -> int:
    import grpc
    from rich.console import Console
    from rich.table import Table

    from common.rpc.auth import load_token_file
    from services.client import cluster_status

    load_token_file(args.target)  # the workers' and the planner's figures are internal RPCs
    try:
        status = asyncio.run(cluster_status(args.target))
    except grpc.aio.AioRpcError as exc:
        print(f"error: gateway {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    table = Table(title=f"model {status['model']}, mode {status['serving_mode']}, "
                        f"topology v{status['topology_version']}")
    for col in ("service", "role", "gRPC", "metrics", "health", "running", "KV blocks"):
        table.add_column(col)
    for s in status["services"]:
        kv = f"{s['kv_used']}/{s['kv_total']}" if s.get("kv_total") is not None else "-"
        running = "-" if s.get("running") is None else str(s["running"])
        table.add_row(s["name"], s["role"], s["address"], s["metrics"] or "-", s["health"], running, kv)
    console = Console(width=160)
    console.print(table)
    plan = status.get("plan")
    if plan:
        console.print(f"planner: {plan['mode']} ({plan['predictor']}); split now {plan['split_now']}, "
                      f"target {plan['target_prefill']}P:{plan['target_decode']}D"
                      + (f":{plan['target_mixed']}M at {plan['target_chunk_budget']} tokens a step"
                         if plan.get("target_mixed") else "") + "; observed "
                      f"{plan['observed_rate']:.2f} req/s, predicted {plan['predicted_rate']:.2f} req/s "
                      f"(prompt p50 {plan['predicted_prompt_p50']:.0f}, p90 {plan['predicted_prompt_p90']:.0f}; "
                      f"output p50 {plan['predicted_output_p50']:.0f}); {plan['intervals_recorded']} intervals "
                      f"recorded, Redis {'ok' if plan['redis_ok'] else 'away'}; last decision "
                      f"{plan['decision_seconds'] * 1e3:.1f} ms")
        choice = plan.get("configuration")
        if choice:
            def cap(c):
                return f"{c['name']} ({c['rate']:.1f} req/s, by {c['limited_by']})" if c else "-"
            console.print(f"configuration: {choice['target']}: predicted {cap(choice['predicted'])}, runner-up "
                          f"{cap(choice['runner_up'])}; {choice['why']}")
        switches = Table(title="last role switches")
        for col in ("at", "worker", "from", "to", "ms", "moved", "MB", "ok", "reason / error"):
            switches.add_column(col)
        for sw in plan["recent_switches"][-10:]:
            switches.add_row(time.strftime("%H:%M:%S", time.localtime(sw["at_unix"])), sw["worker_id"],
                             sw["from_role"], sw["to_role"], f"{sw['seconds'] * 1e3:.0f}",
                             str(sw["migrated_requests"]), f"{sw['migrated_bytes'] / 1e6:.2f}",
                             "yes" if sw["ok"] else "no", sw["error"] or sw["reason"])
        if plan["recent_switches"]:
            console.print(switches)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dopd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start planner, gateway and workers on this machine until Ctrl-C")
    up.add_argument("--model", default="smollm2", help="smollm2 | tiny-random | a local HF model directory")
    up.add_argument("--engine", choices=["hf", "sim"], default="hf",
                    help="hf: real model; sim: no weights, times from a latency profile")
    up.add_argument("--profile", default="llama3-8b-h100", help="sim: a shipped profile name or a profile file")
    up.add_argument("--time-scale", type=float, default=1.0, help="sim: run this many times slower than the profile")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--gateways", type=_at_least_one, default=1,
                    help="gateway processes on the one gRPC port and the one HTTP port (SO_REUSEPORT): "
                         "each decode worker refuses seats past what the gateways' SLO allows, so they admit as one")
    up.add_argument("--port", type=int, default=50051, help="gateway port; other services take the next free ports")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--http-port", type=int, default=8000,
                    help="the gateway's OpenAI-compatible API (the next free port if taken; 0: off)")
    up.add_argument("--api-key", default=os.environ.get("DOPD_API_KEY", ""),
                    help="API key the OpenAI API asks for as 'Authorization: Bearer KEY' (default: $DOPD_API_KEY; "
                         "none: open)")
    up.add_argument("--kv-blocks", type=int, default=2048, help="KV blocks per worker (16 tokens each)")
    up.add_argument("--torch-threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    up.add_argument("--mode", choices=list(MODES), default="dopd",
                    help="dopd: the planner switches roles and the gateway runs DOPD's scheduling policy with "
                         "admission control; static: a fixed split, first come first served; aggregated: every "
                         "worker prefills (in chunks) and decodes its own requests (--prefill + --decode in all); "
                         "dopd-no-policy / dopd-no-planner: the ablations")
    up.add_argument("--planner", choices=["dynamic", "static", "off"],
                    help="dynamic: forecast, split, switch roles in place; static: forecast only; off: registry "
                         "(default: dynamic where the mode switches roles, else static)")
    up.add_argument("--predictor", default="arima", help="constant | ewma | holt-winters | arima")
    up.add_argument("--slo-ttft", type=float, default=2000.0, help="TTFT SLO the planner splits for (ms)")
    up.add_argument("--slo-tpot", type=float, default=200.0, help="TPOT SLO the planner splits for (ms)")
    up.add_argument("--slo-itl", type=float, help="stall SLO for the planner (ms): each request's p99 inter-token gap")
    up.add_argument("--interval", type=float, default=1.0, help="planner interval (seconds of profile time)")
    up.add_argument("--log-dir", help="where each service's log goes (default runs/up-<time>)")
    up.add_argument("--ready-timeout", type=float, default=600.0)
    up.set_defaults(func=_up)

    gen = sub.add_parser("generate", help="stream a completion from the gateway")
    gen.add_argument("prompt")
    gen.add_argument("--target", default=DEFAULT_TARGET)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default here) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.add_argument("--api-key", default=os.environ.get("DOPD_API_KEY", ""),
                     help="the gateway's API key, when `dopd up --api-key` set one (default $DOPD_API_KEY)")
    gen.set_defaults(func=_generate)

    from services.bench.cli import add_bench_parser
    from services.comparison.compare import add_compare_arguments, run_compare
    from services.comparison.reach_cli import add_reach_parser
    from services.dashboard import add_parser as add_dashboard_parser
    from services.profiler import add_profile_parser
    from services.simulate.cli import add_simulate_parser

    add_bench_parser(sub, compare=(add_compare_arguments, run_compare))
    add_reach_parser(sub)
    add_profile_parser(sub)
    add_simulate_parser(sub)
    add_dashboard_parser(sub)

    role = sub.add_parser("role", help="switch one worker's role in place and wait until it is done")
    role.add_argument("worker", help="the worker as `dopd status` names it, e.g. decode-0")
    role.add_argument("role", choices=["prefill", "decode", "mixed"])
    role.add_argument("--chunk-budget", type=int, default=0,
                      help="mixed: tokens a step for its own prefill (default: the worker's setting)")
    role.add_argument("--target", default=DEFAULT_TARGET, help="the gateway")
    role.add_argument("--timeout", type=float, default=120.0)
    role.add_argument("--json", action="store_true")
    role.set_defaults(func=_role)

    st = sub.add_parser("status", help="every service with its role, health and load")
    st.add_argument("--target", default=DEFAULT_TARGET)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    certs = sub.add_parser("certs", help="make a development CA and the cluster's certificate for mutual TLS "
                                         "on the internal plane (common/rpc/tls.py)")
    certs.add_argument("dir", type=Path, help="where to write ca.pem, ca-key.pem, cert.pem, key.pem")
    certs.add_argument("--name", action="append", default=[],
                       help="another host name or IP address the certificate names (repeatable)")
    certs.add_argument("--days", type=int, default=365)
    certs.set_defaults(func=_certs)
    return parser


def _certs(args) -> int:
    from common.rpc.tls import ENV_CA, ENV_CERT, ENV_KEY, make_certs

    files = make_certs(args.dir, tuple(args.name), args.days)
    print(f"wrote {', '.join(str(p) for p in files.values())}\nfor every process of the cluster (dopd up passes its "
          f"environment on):\n  export {ENV_CERT}={files['cert'].resolve()} {ENV_KEY}={files['key'].resolve()} "
          f"{ENV_CA}={files['ca'].resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as given, for the records of a run
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
