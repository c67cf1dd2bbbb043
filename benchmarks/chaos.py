"""The chaos benchmark: a sim cluster under steady load while processes die, roles are forced to
switch and clients walk away mid-stream; then what was lost, what leaked and how memory moved.

    python benchmarks/chaos.py [--workers 16] [--duration 240] [--rate 2] [--seed 0] [--out DIR]

The cluster (`dopd up`'s launcher, services/launcher.py, supervising its children as `dopd up`
does): `--workers` sim workers (half prefill, half decode) on a GPU profile (llama3-8b-h100),
`--time-scale` times slower than the profile so that this machine's gateway keeps up, the
gateway in dopd mode and the dynamic planner, and a redis-server the cluster starts itself on a
port of its own (never one it did not start: the URL given points at a port where none answers).

The load: the `mix` workload (services/bench/workloads.py) at `--rate` wall req/s, outputs capped
at `--max-output` tokens so that a request lasts seconds, not minutes, each request with a
deadline of `--deadline` wall seconds; `--cancel` of them are cancelled by their client after a
random number of tokens. First `--warmup` seconds of load with no chaos (memory is measured at
its end, once the processes hold their steady state), then `--duration` seconds of load with
chaos on a seeded schedule, one event every `--every` seconds on average (exponential gaps):
  kill-worker   SIGKILL a random worker (its requests are replayed elsewhere; restarted by the
                supervisor with backoff, it rejoins the topology)
  kill-planner  SIGKILL the planner (serving goes on with the last topology; restarted, it
                resumes its history from Redis)
  kill-redis    SIGKILL the redis-server (the planner goes on from memory and writes the gap back
                when the restarted, empty Redis answers)
  switch        force a random worker into the other role (SetRole), never the last of its role
Then the load stops, every request ends, and the run checks the workers for KV blocks or
requests still held (a restarted worker starts empty: its leaks would have died with it, so it
is counted apart), and each process's resident memory against its value after warm-up.

Prints: requests completed, cancelled by their client, failed (by status and reason), the
deadline misses; the chaos events and the supervisor's restarts; KV blocks still held; RSS per
process at the start and end. Writes DIR/chaos.json.
Goal (issue 10): no failed request apart from those whose deadline was shorter than the
recovery, no leaked block, memory growth <= 5% over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from common.convert import ROLE_FROM_PB  # noqa: E402
from common.pb import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from common.types import Role  # noqa: E402
from services.bench.runner import prompt_ids  # noqa: E402
from services.bench.workloads import generate as workload  # noqa: E402
from services.client import generate_request, set_worker_role, worker_stats  # noqa: E402
from services.launcher import Cluster, ClusterSpec, free_port, rss_table  # noqa: E402
from services.supervisor import RestartPolicy  # noqa: E402

PROFILE = "llama3-8b-h100"
ACTIONS = ("kill-worker", "kill-planner", "kill-redis", "switch")


@dataclass
class Outcome:
    index: int
    status: str  # ok | cancelled | a gRPC status name
    detail: str = ""
    tokens: int = 0
    wanted: int = 0
    seconds: float = 0.0


@dataclass
class Event:
    t: float
    action: str
    target: str = ""
    result: str = ""


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    supervision: list[str] = field(default_factory=list)
    memory: list[tuple[float, dict]] = field(default_factory=list)  # (s since t0, name -> (pid, RSS KiB))
    queues: list[str] = field(default_factory=list)  # where requests were, at each memory sample


async def one_request(stub, i: int, prompt: list[int], max_tokens: int, deadline_s: float,
                      cancel_after: int | None) -> Outcome:
    """One streamed Generate; the client walks away after `cancel_after` tokens when set."""
    started = time.monotonic()
    out = Outcome(i, "ok", wanted=max_tokens)
    call = stub.Generate(generate_request(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                         timeout=deadline_s)
    try:
        async for msg in call:
            out.tokens += len(msg.token_ids)
            if cancel_after is not None and out.tokens >= cancel_after and not msg.finish_reason:
                call.cancel()
                out.status = "cancelled"
                break
    except grpc.aio.AioRpcError as exc:
        out.status, out.detail = exc.code().name, exc.details() or ""
    finally:
        call.cancel()
    if out.status == "ok" and out.tokens != max_tokens:
        out.status, out.detail = "SHORT", f"{out.tokens} of {max_tokens} tokens"
    out.seconds = time.monotonic() - started
    return out


async def load(cluster: Cluster, args, start: float, until: float, first_index: int, run: Run) -> int:
    """Send the mix workload from `start` to `until` (wall, monotonic); returns the next index."""
    requests = workload("mix", args.rate, until - start, seed=args.seed + first_index,
                        max_context=args.max_context)
    rng = random.Random(args.seed * 7919 + first_index)
    tasks = []
    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for k, r in enumerate(requests):
            i = first_index + k
            await asyncio.sleep(max(0.0, start + r.t - time.monotonic()))
            max_tokens = min(r.output_tokens, args.max_output)
            cancel_after = rng.randint(1, max_tokens) if rng.random() < args.cancel and max_tokens > 1 else None
            tasks.append(asyncio.create_task(one_request(stub, i, prompt_ids(args.seed, i, r.prompt_tokens),
                                                         max_tokens, args.deadline, cancel_after)))
        run.outcomes.extend(await asyncio.gather(*tasks))
    return first_index + len(requests)


async def supervise(cluster: Cluster, run: Run, t0: float, stop: asyncio.Event, sample_s: float) -> None:
    """What `dopd up` does: restart a child that died, with backoff. And every `sample_s`, each
    process's resident memory (the trend shows whether growth levels off)."""
    next_sample = time.monotonic()
    while not stop.is_set():
        for event in cluster.supervise():
            run.supervision.append(f"{time.monotonic() - t0:7.1f} s  {event.describe()}")
        if time.monotonic() >= next_sample:
            run.memory.append((round(time.monotonic() - t0, 1), cluster.memory()))
            run.queues.append(f"{time.monotonic() - t0:7.1f} s  " + await where_requests_are(cluster))
            next_sample += sample_s
        await asyncio.sleep(0.2)


async def where_requests_are(cluster: Cluster) -> str:
    """The gateway's in-flight, short-held and decode-queued requests, and each worker's running
    and waiting ones: where a request that seems stuck is."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    gw = cluster.proc("gateway")
    wanted = {"dopd_gateway_running_requests": "in flight", "dopd_gateway_short_prompts_held": "short held",
              "dopd_gateway_decode_queue": "decode queue"}
    parts = []
    try:
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{gw.metrics_address}/metrics",
                                                                      timeout=2).read().decode())
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    parts.append(f"{wanted[sample.name]} {sample.value:.0f}")
    except OSError as exc:
        parts.append(f"gateway metrics: {exc}")
    for p in cluster.procs:
        if p.role in ("prefill", "decode"):
            try:
                st = await worker_stats(p.address, timeout=1)
                if st.running_requests or st.waiting_requests:
                    parts.append(f"{p.name} {st.running_requests}r/{st.waiting_requests}w")
            except grpc.aio.AioRpcError as exc:
                parts.append(f"{p.name} {exc.code().name}")
    return ", ".join(parts)


def memory_trend(run: Run, names: list[str]) -> list[tuple[float, int]]:
    """(s, total RSS KiB of `names`) at each sample where all of them were the first process of their name."""
    first = {n: run.memory[0][1][n][0] for n in names} if run.memory else {}
    return [(t, sum(m[n][1] or 0 for n in names)) for t, m in run.memory
            if all(n in m and m[n][0] == first[n] for n in names)]


async def switch_one(cluster: Cluster, rng: random.Random) -> tuple[str, str]:
    """Force a random worker into the other role, never the last of its role."""
    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        status = await gateway_pb2_grpc.GatewayStub(channel).GetStatus(gateway_pb2.GetStatusRequest(), timeout=5)
    roles = {w.worker_id: ROLE_FROM_PB.get(w.role) for w in status.topology.workers}
    count = collections.Counter(roles.values())
    candidates = sorted(w for w, role in roles.items() if role in (Role.PREFILL, Role.DECODE) and count[role] >= 2)
    if not candidates:
        return "", "no worker can switch (each role has one)"
    worker = rng.choice(candidates)
    target = Role.DECODE if roles[worker] is Role.PREFILL else Role.PREFILL
    try:
        await set_worker_role(cluster.gateway_address, worker, target.value, timeout=120)
        return worker, f"-> {target.value}: done"
    except grpc.aio.AioRpcError as exc:
        return worker, f"-> {target.value} refused: {exc.code().name} {exc.details()}"
    except LookupError as exc:
        return worker, f"-> {target.value}: {exc}"


async def chaos(cluster: Cluster, args, t0: float, until: float, run: Run) -> None:
    rng = random.Random(args.seed)
    workers = [p.name for p in cluster.procs if p.role in ("prefill", "decode")]
    switches = []
    while True:
        at = time.monotonic() + rng.expovariate(1.0 / args.every)
        if at >= until:
            break
        await asyncio.sleep(at - time.monotonic())
        action = rng.choice(ACTIONS)
        event = Event(round(time.monotonic() - t0, 1), action)
        if action == "kill-worker":
            event.target = rng.choice(workers)
            cluster.kill(event.target)
        elif action == "kill-planner":
            event.target = "planner"
            cluster.kill("planner")
        elif action == "kill-redis":
            event.target = "redis"
            if cluster.redis is not None and cluster.redis.poll() is None:
                cluster.redis.kill()
                cluster.redis.wait()
        else:
            async def switch(ev=event):
                try:
                    ev.target, ev.result = await switch_one(cluster, rng)
                except grpc.aio.AioRpcError as exc:
                    ev.result = f"status unavailable: {exc.code().name}"
            switches.append(asyncio.create_task(switch()))
        run.events.append(event)
    await asyncio.gather(*switches)


async def held_by_workers(cluster: Cluster, timeout: float) -> dict[str, tuple[int, int, int]]:
    """(KV blocks used, running, waiting) per worker still holding anything after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        held = {}
        for p in cluster.procs:
            if p.role not in ("prefill", "decode"):
                continue
            try:
                s = await worker_stats(p.address)
            except grpc.aio.AioRpcError:
                held[p.name] = (-1, -1, -1)  # not answering
                continue
            if s.kv_blocks_used or s.running_requests or s.waiting_requests:
                held[p.name] = (s.kv_blocks_used, s.running_requests, s.waiting_requests)
        if not held or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.5)


def report(args, run: Run, mem_start, mem_end, held, restarted: set[str]) -> dict:
    by_status = collections.Counter(o.status for o in run.outcomes)
    failed = [o for o in run.outcomes if o.status not in ("ok", "cancelled")]
    reasons = collections.Counter(f"{o.status}: {o.detail[:120]}" for o in failed)
    deadline_misses = [o for o in failed if o.status == "DEADLINE_EXCEEDED"]
    print(f"\nrequests: {len(run.outcomes)} sent; {by_status['ok']} completed, {by_status['cancelled']} cancelled "
          f"by their client, {len(failed)} failed")
    for reason, n in reasons.most_common():
        print(f"  {n:5d}  {reason}")
    for o in failed:
        print(f"    request {o.index}: {o.tokens} of {o.wanted} tokens after {o.seconds:.1f} s")
    print(f"deadline misses: {len(deadline_misses)} (deadline {args.deadline:g} s wall each)")
    print(f"\nchaos events ({len(run.events)}):")
    for e in run.events:
        print(f"  {e.t:7.1f} s  {e.action:12s} {e.target:10s} {e.result}")
    print(f"supervisor ({len(run.supervision)}):")
    for line in run.supervision:
        print("  " + line)
    print("where requests were (gateway; workers with requests: running r / waiting w):")
    for line in run.queues:
        print("  " + line)
    print("\nKV blocks / requests still held after the run (blocks, running, waiting): "
          + (", ".join(f"{n}: {v}" for n, v in held.items()) if held else "none"))
    print("\nresident memory (MiB), after warm-up -> end:")
    lines, growth = rss_table(mem_start, mem_end)
    for line in lines:
        print("  " + line)
    total0 = sum(mem_start[n][1] for n in growth)
    total1 = sum(mem_end[n][1] for n in growth)
    worst = max(growth.items(), key=lambda kv: kv[1]) if growth else ("-", 0.0)
    trend = memory_trend(run, sorted(growth))
    if trend:
        print("  total RSS of those never restarted, over the run (s: MiB): "
              + ", ".join(f"{t:.0f}: {kib / 1024:.0f}" for t, kib in trend))
    print(f"  processes never restarted: {len(growth)}; their total {total0 / 1024:.0f} -> {total1 / 1024:.0f} MiB "
          f"({total1 / total0 - 1:+.1%}); the largest growth {worst[0]} {worst[1]:+.1%}" if growth else "")
    short = [o for o in failed if o.status == "DEADLINE_EXCEEDED"]
    goal_failed = len(failed) - len(short)
    print(f"\ngoal: failed requests other than deadline misses 0 -> {goal_failed}; leaked blocks 0 -> "
          f"{sum(max(v[0], 0) for v in held.values())}; memory growth <= 5% -> "
          f"{'met' if growth and worst[1] <= 0.05 else 'NOT met'} (largest {worst[1]:+.1%})")
    return {"settings": vars(args), "by_status": dict(by_status), "failed_reasons": dict(reasons),
            "deadline_misses": len(deadline_misses), "events": [asdict(e) for e in run.events],
            "supervision": run.supervision, "held_after": held, "restarted": sorted(restarted),
            "rss_kib_start": {n: v[1] for n, v in mem_start.items()},
            "rss_kib_end": {n: v[1] for n, v in mem_end.items()}, "rss_growth": growth,
            "rss_total_trend": trend, "failed": [asdict(o) for o in failed]}


async def main_async(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ClusterSpec(model=f"sim:{PROFILE}", prefill=args.workers // 2, decode=args.workers - args.workers // 2,
                       port=free_port(), http_port=0, log_dir=out / "logs",
                       # A port where no Redis answers: the cluster starts its own redis-server.
                       redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_prefix="dopd-chaos:",
                       kv_blocks=args.kv_blocks, time_scale=args.time_scale, planner="dynamic", mode="dopd",
                       slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot,
                       extra_env={"DOPD_PREFILL_TOKEN_BUDGET": "8192", "DOPD_MAX_BATCH_SIZE": "256"})
    cluster = Cluster(spec, RestartPolicy(initial_backoff_s=0.5, max_backoff_s=5.0))
    print(f"starting {args.workers} sim workers ({PROFILE}, time scale {args.time_scale:g}), gateway (dopd mode), "
          f"planner (dynamic), own redis-server; logs in {out / 'logs'}")
    cluster.start()
    run = Run()
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(cluster.wait_ready, 600)
        t0 = time.monotonic()
        supervisor = asyncio.create_task(supervise(cluster, run, t0, stop, args.memory_every))
        print(f"warm-up: {args.warmup:g} s of load, no chaos")
        index = await load(cluster, args, t0, t0 + args.warmup, 0, run)
        warm = len(run.outcomes)
        mem_start = cluster.memory()
        start = time.monotonic()
        print(f"chaos: {args.duration:g} s of load, an event every {args.every:g} s on average (seed {args.seed})")
        await asyncio.gather(load(cluster, args, start, start + args.duration, index, run),
                             chaos(cluster, args, t0, start + args.duration, run))
        held = await held_by_workers(cluster, timeout=30)
        mem_end = cluster.memory()
        stop.set()
        await supervisor
        restarted = {n for n in mem_start if mem_start[n][0] != mem_end.get(n, (None,))[0]}
        run.outcomes = run.outcomes[warm:] if args.chaos_only else run.outcomes
        doc = report(args, run, mem_start, mem_end, held, restarted)
    finally:
        stop.set()
        cluster.stop()
    (out / "chaos.json").write_text(json.dumps(doc, indent=1))
    print(f"-> {out / 'chaos.json'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=2.0, help="wall requests/s")
    p.add_argument("--warmup", type=float, default=30.0, help="wall s of load before the chaos")
    p.add_argument("--duration", type=float, default=240.0, help="wall s of load with chaos")
    p.add_argument("--every", type=float, default=15.0, help="mean wall s between chaos events")
    p.add_argument("--cancel", type=float, default=0.05, help="share of requests their client cancels")
    p.add_argument("--deadline", type=float, default=120.0, help="each request's deadline, wall s")
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--kv-blocks", type=int, default=16384)
    p.add_argument("--slo-ttft", type=float, default=1000.0)
    p.add_argument("--slo-tpot", type=float, default=50.0)
    p.add_argument("--chaos-only", action="store_true", help="count only the requests sent during the chaos")
    p.add_argument("--memory-every", type=float, default=15.0, help="wall s between memory samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/chaos")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
