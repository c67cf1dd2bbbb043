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
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass

import grpc
import httpx
import numpy as np

from common.convert import FINISH_FROM_PB
from common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from common.rpc.auth import api_key_metadata
from common.rpc.channels import CHANNEL_OPTIONS
from services.bench.metrics import RequestResult
from services.bench.outcome import RunOutcome, StatusSample
from services.bench.workloads import BenchRequest
from services.client import generate_request

TOKEN_ID_RANGE = (100, 10000)  # clear of the special tokens at the low end, inside any vocabulary we serve


# What an OpenAI API status means, as the gRPC code the results name it by.
STATUS_OF_HTTP = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                  500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class RequestFailed(Exception):
    """A request ended in an error; the message is the code results.json counts it under, and
    `detail` what the server said (gRPC only)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.detail = detail


@dataclass(frozen=True)
class Piece:
    """One message of a response stream, as either front end says it."""

    tokens: int  # tokens it carries
    finish: str | None = None  # stop | length | abort, on the last
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class RunSettings:
    target: str | None  # the gateway's gRPC address (requests on grpc; status samples on both)
    backend: str = "grpc"  # grpc | openai
    base_url: str = ""  # openai: the API's base URL, e.g. http://127.0.0.1:8000/v1
    api_key: str = ""
    model: str = ""  # openai: the model name requests carry
    request_timeout: float = 60.0  # profile seconds
    time_scale: float = 1.0
    seed: int = 0
    status_interval: float = 0.5  # wall seconds between GetStatus samples
    grace: float = 10.0  # wall seconds past the last request's timeout before the run is cut
    progress: bool = True
    # grpc: requests go round-robin over this many connections (each channel with its own
    # subchannel pool: gRPC shares one connection per target within a process otherwise), so
    # that several gateways on one port (SO_REUSEPORT) all get some. 1: one channel.
    connections: int = 1


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
        elif w.role in (common_pb2.ROLE_DECODE, common_pb2.ROLE_MIXED):  # a mixed worker decodes too
            s.decode_workers += 1
            s.mixed_workers += w.role == common_pb2.ROLE_MIXED
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
        prompts = [prompt_ids(settings.seed, i, r.prompt_tokens) if r.prompt_tokens is not None else r.prompt
                   for i, r in enumerate(requests)]
        if settings.backend == "openai":
            self.bodies = [{"prompt": p, "max_tokens": r.output_tokens, "temperature": 0.0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}
                           for p, r in zip(prompts, requests, strict=True)]
        else:
            self.pbs = [generate_request(p, max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True,
                                         request_id=self.ids[i]) for i, (p, r) in enumerate(zip(prompts, requests,
                                                                                                strict=True))]
        self.messages = self.tokens = self.length_mismatch = 0
        self.t0 = self.last_event = 0.0

    def _profile(self, wall: float) -> float:
        return (wall - self.t0) / self.s.time_scale

    async def _grpc_pieces(self, stub, i: int) -> AsyncIterator[Piece]:
        call = stub.Generate(self.pbs[i], timeout=self.s.request_timeout * self.s.time_scale,
                             metadata=api_key_metadata(self.s.api_key))
        try:
            async for msg in call:
                finish = FINISH_FROM_PB[msg.finish_reason] if msg.finish_reason else None
                yield Piece(len(msg.token_ids), finish, msg.usage.prompt_tokens if finish else 0,
                            msg.usage.completion_tokens if finish else 0)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(exc.code().name, exc.details() or "") from exc
        finally:
            call.cancel()  # no-op once the stream has ended

    async def _openai_pieces(self, http, i: int) -> AsyncIterator[Piece]:
        """The OpenAI API's stream: each chunk before the last is one token event of the gateway
        (its token count is not in the chunk: counted as one, the total comes from the usage)."""
        body = {**self.bodies[i], "model": self.s.model}
        try:
            async with http.stream("POST", "/completions", json=body,
                                   timeout=self.s.request_timeout * self.s.time_scale) as response:
                if response.status_code != 200:
                    raise RequestFailed(STATUS_OF_HTTP.get(response.status_code, f"HTTP_{response.status_code}"))
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    doc = json.loads(line[6:])
                    if "error" in doc:
                        raise RequestFailed(doc["error"].get("type") or "STREAM_ERROR")
                    if doc.get("usage"):
                        yield Piece(0, None, doc["usage"]["prompt_tokens"], doc["usage"]["completion_tokens"])
                    for choice in doc.get("choices") or ():
                        yield Piece(0 if choice["finish_reason"] else 1, choice["finish_reason"])
        except httpx.TimeoutException as exc:
            raise RequestFailed("DEADLINE_EXCEEDED") from exc
        except httpx.HTTPError as exc:
            raise RequestFailed("UNAVAILABLE") from exc

    async def _one(self, pieces: AsyncIterator[Piece], i: int, sent: float) -> RequestResult:
        req, scale = self.requests[i], self.s.time_scale
        r = RequestResult(request_id=self.ids[i], t_sent=self._profile(sent), ttft=None,
                          prompt_tokens=req.prompt_tokens or 0, output_tokens=0)
        first = last = None
        finish = None
        completion_tokens = 0
        try:
            async for piece in pieces:
                now = time.perf_counter()
                self.messages += 1
                k = piece.tokens
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
                finish = piece.finish or finish
                r.prompt_tokens = piece.prompt_tokens or r.prompt_tokens
                completion_tokens = piece.completion_tokens or completion_tokens
            end = time.perf_counter()
            if completion_tokens > r.output_tokens:  # the OpenAI stream's usage: the true count
                self.tokens += completion_tokens - r.output_tokens
                r.output_tokens = completion_tokens
            if first is None:
                r.ok, r.error = False, "NO_TOKENS"
            elif finish is None or finish == "abort":
                r.ok, r.error = False, "ABORTED" if finish else "NO_FINISH"
            else:
                r.ttft, r.e2e = (first - sent) / scale, (end - sent) / scale
                self.length_mismatch += r.output_tokens != req.output_tokens
        except RequestFailed as exc:
            r.ok, r.error, r.error_detail = False, str(exc), exc.detail or None
        except asyncio.CancelledError:  # the run's deadline (we cancel only then)
            r.ok, r.error = False, "HARNESS_DEADLINE"
        except Exception as exc:  # noqa: BLE001 - a request's failure is data, not the end of the run
            r.ok, r.error = False, type(exc).__name__
        finally:
            await pieces.aclose()
            self.last_event = max(self.last_event, time.perf_counter())
        if not r.ok:
            r.itls, r.ttft, r.e2e = [], None, None
            r.error_after = (time.perf_counter() - sent) / scale
        return r

    def _send(self, client, i: int) -> Coroutine[None, None, RequestResult]:
        pieces = (self._openai_pieces(client, i) if self.s.backend == "openai"
                  else self._grpc_pieces(client[i % len(client)], i))  # the grpc stubs, round robin
        return self._one(pieces, i, time.perf_counter())

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
        async with contextlib.AsyncExitStack() as stack:
            stub = None
            if self.s.target:  # the gateway's gRPC API: Generate (grpc backend) and status samples
                own_pool = [("grpc.use_local_subchannel_pool", 1)] if self.s.connections > 1 else []
                stubs = [gateway_pb2_grpc.GatewayStub(await stack.enter_async_context(
                    grpc.aio.insecure_channel(self.s.target, options=CHANNEL_OPTIONS + own_pool)))
                    for _ in range(max(1, self.s.connections))]
                stub = stubs[0]
            client = stubs if stub is not None else None
            if self.s.backend == "openai":
                headers = {"Authorization": f"Bearer {self.s.api_key}"} if self.s.api_key else {}
                # No pool limit: an open-loop run keeps every request's stream open at once.
                client = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=self.s.base_url, headers=headers,
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)))
            with Progress(*columns, console=Console(stderr=True), disable=not self.s.progress) as progress:
                bar = progress.add_task("requests", total=len(self.requests))
                cpu0, self.t0 = time.process_time(), time.perf_counter()
                self.last_event = self.t0
                deadline = self.t0 + (last_t + self.s.request_timeout) * scale + self.s.grace
                sampler = asyncio.create_task(self._sample(stub, samples, stop)) if stub else None
                for i, req in enumerate(self.requests):
                    due = self.t0 + req.t * scale
                    if (delay := due - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    now = time.perf_counter()
                    if now >= deadline:
                        break
                    lateness.append(max(0.0, now - due) / scale)
                    self.last_event = max(self.last_event, now)
                    task = asyncio.create_task(self._send(client, i))
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
                if sampler is not None:
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
