"""The open-loop load generator: sends each `BenchRequest` at its arrival time whatever the
cluster's state, records what the client sees of each response stream, and samples the
cluster's status meanwhile. The thin async adapter around the pure cores.

Time scale: sends happen at `t * time_scale` wall seconds and every measured time is divided by
`time_scale`, so results are in profile time (the workload's own clock). `request_timeout` is in
profile seconds too. The run is bounded: each request has its timeout, and the whole run a
deadline (the last arrival plus one request timeout plus `grace` wall seconds), after which what
is still in flight is cancelled and recorded as failed (HARNESS_DEADLINE).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np

from common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from common.rpc.server import CHANNEL_OPTIONS
from services.bench.metrics import RequestResult
from services.bench.outcome import RunOutcome, StatusSample
from services.bench.workloads import BenchRequest
from services.client import generate_request

TOKEN_ID_RANGE = (100, 10000)  # clear of the special tokens at the low end, inside any vocabulary we serve


@dataclass(frozen=True)
class RunSettings:
    target: str
    request_timeout: float = 60.0  # profile seconds
    time_scale: float = 1.0
    seed: int = 0
    status_interval: float = 0.5  # wall seconds between GetStatus samples
    grace: float = 10.0  # wall seconds past the last request's timeout before the run is cut
    progress: bool = True


def prompt_ids(seed: int, index: int, n: int) -> list[int]:
    """The seeded random prompt of request `index`: n ids in [100, 10000)."""
    return np.random.default_rng([seed, 2, index]).integers(*TOKEN_ID_RANGE, size=n).tolist()


def sample_from_status(t: float, status: gateway_pb2.GetStatusResponse) -> StatusSample:
    s = StatusSample(t=t, gateway_running=status.running_requests)
    for w in status.topology.workers:
        if not w.serving:
            continue
        if w.role == common_pb2.ROLE_PREFILL:
            s.prefill_workers += 1
            s.prefill_waiting += w.waiting_requests
            s.prefill_running += w.running_requests
        elif w.role == common_pb2.ROLE_DECODE:
            s.decode_workers += 1
            s.decode_waiting += w.waiting_requests
            s.decode_running += w.running_requests
            s.kv_blocks_used += w.kv_blocks_used
            s.kv_blocks_total += w.kv_blocks_total
    return s


class _Run:
    def __init__(self, requests: list[BenchRequest], settings: RunSettings) -> None:
        self.requests = requests
        self.s = settings
        tag = uuid.uuid4().hex[:8]
        self.ids = [f"bench-{tag}-{i}" for i in range(len(requests))]
        # Built before the clock starts, so that sending costs the schedule as little as possible.
        self.pbs = [generate_request(prompt_ids(settings.seed, i, r.prompt_tokens) if r.prompt_tokens is not None
                                     else r.prompt, max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True,
                                     request_id=self.ids[i])
                    for i, r in enumerate(requests)]
        self.messages = self.tokens = self.length_mismatch = 0
        self.t0 = self.last_event = 0.0

    def _profile(self, wall: float) -> float:
        return (wall - self.t0) / self.s.time_scale

    async def _one(self, stub, i: int) -> RequestResult:
        req, scale = self.requests[i], self.s.time_scale
        sent = time.perf_counter()
        r = RequestResult(request_id=self.ids[i], t_sent=self._profile(sent), ttft=None,
                          prompt_tokens=req.prompt_tokens or 0, output_tokens=0)
        first = last = None
        finish = None
        call = stub.Generate(self.pbs[i], timeout=self.s.request_timeout * scale)
        try:
            async for msg in call:
                now = time.perf_counter()
                self.messages += 1
                k = len(msg.token_ids)
                if k:
                    # A message may carry several tokens that the server produced one by one; only
                    # their arrival together is seen here, so the gap since the previous message is
                    # spread evenly over them (the first message's extra tokens count as gaps of 0).
                    if first is None:
                        first = now
                        r.itls.extend([0.0] * (k - 1))
                    else:
                        r.itls.extend([(now - last) / k / scale] * k)
                    last = now
                    r.output_tokens += k
                    self.tokens += k
                if msg.finish_reason:
                    finish = msg.finish_reason
                    r.prompt_tokens = msg.usage.prompt_tokens or r.prompt_tokens
            end = time.perf_counter()
            if first is None:
                r.ok, r.error = False, "NO_TOKENS"
            elif finish is None or finish == common_pb2.FINISH_REASON_ABORT:
                r.ok, r.error = False, "ABORTED" if finish else "NO_FINISH"
            else:
                r.ttft, r.e2e = (first - sent) / scale, (end - sent) / scale
                self.length_mismatch += r.output_tokens != req.output_tokens
        except grpc.aio.AioRpcError as exc:
            r.ok, r.error = False, exc.code().name
        except asyncio.CancelledError:  # the run's deadline (we cancel only then)
            r.ok, r.error = False, "HARNESS_DEADLINE"
        except Exception as exc:  # noqa: BLE001 - a request's failure is data, not the end of the run
            r.ok, r.error = False, type(exc).__name__
        finally:
            call.cancel()  # no-op once the stream has ended
            self.last_event = max(self.last_event, time.perf_counter())
        if not r.ok:
            r.itls, r.ttft, r.e2e = [], None, None
        return r

    def _failed(self, i: int, error: str) -> RequestResult:
        req = self.requests[i]
        return RequestResult(request_id=self.ids[i], t_sent=req.t, ttft=None, prompt_tokens=req.prompt_tokens or 0,
                             ok=False, error=error)

    async def _sample(self, stub, samples: list[StatusSample], stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.perf_counter()
            try:
                status = await stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=2.0)
                samples.append(sample_from_status(self._profile(now), status))
            except grpc.aio.AioRpcError as exc:
                samples.append(StatusSample(t=self._profile(now), error=exc.code().name))
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.s.status_interval)
            except TimeoutError:
                pass

    async def run(self) -> RunOutcome:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        scale = self.s.time_scale
        last_t = max((r.t for r in self.requests), default=0.0)
        samples: list[StatusSample] = []
        tasks: list[asyncio.Task] = []
        lateness: list[float] = []
        stop = asyncio.Event()
        columns = (TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        async with grpc.aio.insecure_channel(self.s.target, options=CHANNEL_OPTIONS) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with Progress(*columns, console=Console(stderr=True), disable=not self.s.progress) as progress:
                bar = progress.add_task("requests", total=len(self.requests))
                cpu0, self.t0 = time.process_time(), time.perf_counter()
                self.last_event = self.t0
                deadline = self.t0 + (last_t + self.s.request_timeout) * scale + self.s.grace
                sampler = asyncio.create_task(self._sample(stub, samples, stop))
                for i, req in enumerate(self.requests):
                    due = self.t0 + req.t * scale
                    if (delay := due - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    now = time.perf_counter()
                    if now >= deadline:
                        break
                    lateness.append(max(0.0, now - due) / scale)
                    self.last_event = max(self.last_event, now)
                    task = asyncio.create_task(self._one(stub, i))
                    task.add_done_callback(lambda _: progress.advance(bar))
                    tasks.append(task)
                if tasks:
                    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
                    for task in pending:
                        task.cancel()
                results = [r if isinstance(r, RequestResult) else self._failed(i, "HARNESS_DEADLINE")
                           for i, r in enumerate(await asyncio.gather(*tasks, return_exceptions=True))]
                end, cpu = time.perf_counter(), time.process_time() - cpu0
                stop.set()
                await sampler
        sent = len(results)
        # Cut by the deadline before going out: failed, not dropped.
        results += [self._failed(i, "NOT_SENT") for i in range(sent, len(self.requests))]
        return RunOutcome(results=results, samples=samples, duration=max(self._profile(self.last_event), 1e-6),
                          wall_s=end - self.t0, cpu_s=cpu, lateness=lateness, sent=sent, messages=self.messages,
                          tokens=self.tokens, length_mismatch=self.length_mismatch)


async def run_load(requests: list[BenchRequest], settings: RunSettings) -> RunOutcome:
    """Send `requests` (ordered by t) open loop to the gateway at settings.target; see the module
    docstring for the time scale and the bounds."""
    if not settings.time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {settings.time_scale}")
    if not settings.request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0, got {settings.request_timeout}")
    return await _Run(sorted(requests, key=lambda r: r.t), settings).run()
