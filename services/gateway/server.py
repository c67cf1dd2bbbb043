"""The gateway: the public entry. Validates, tokenizes, picks a prefill and a decode worker,
and streams tokens back.

Request path: open Decode on the decode worker (it reserves KV blocks, or refuses and the next
worker is tried) -> Prefill on the prefill worker with the decode worker's address (the KV goes
peer to peer; the first token comes back here) -> relay the decode stream. Leaving the handler
by any path cancels the decode stream, which frees the request's blocks on the decode worker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter as Tally

import grpc

from common.config import GatewaySettings
from common.convert import FINISH_FROM_PB, FINISH_TO_PB, sampling_to_pb
from common.kv.block_pool import kv_tokens_for
from common.modeling.loader import load_config, load_tokenizer
from common.pb import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from common.rpc.channels import ChannelPool
from common.rpc.errors import ResourceExhausted, Unavailable, grpc_errors, is_refusal
from common.rpc.server import Service, run_server
from common.sampling import SamplingParams
from services.gateway import metrics
from services.gateway.detokenizer import Detokenizer
from services.gateway.routing import WorkerView, decode_preference, pick_prefill
from services.gateway.validation import validate_context, validate_params, validate_prompt_ids

log = logging.getLogger(__name__)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.channels = ChannelPool()
        self.tokenizer = None
        self.config = None
        self.eos_ids: frozenset[int] = frozenset()
        self.topology = planner_pb2.Topology()
        self._outstanding_prefill_tokens: Tally[str] = Tally()
        self._outstanding_decode: Tally[str] = Tally()
        self._running = 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, handle) -> None:
        loop = asyncio.get_running_loop()
        self.tokenizer = await loop.run_in_executor(None, load_tokenizer, self.settings.model)
        self.config = await loop.run_in_executor(None, load_config, self.settings.model)
        eos = self.config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids |= {self.tokenizer.eos_token_id}
        self._topology_task = asyncio.create_task(self._watch_topology())
        await handle.set_serving(True)

    async def drain(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.drain_grace_s
        while self._running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)

    async def _watch_topology(self) -> None:
        stub = planner_pb2_grpc.PlannerStub(self.channels.get(self.settings.planner_address))
        while True:
            try:
                self.topology = await stub.GetTopology(planner_pb2.GetTopologyRequest(),
                                                       timeout=self.settings.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.debug("planner unreachable: %s", exc.code().name)
            await asyncio.sleep(self.settings.topology_refresh_s)

    def _workers(self, role: int) -> list[WorkerView]:
        return [WorkerView(w.worker_id, w.address, w.kv_blocks_total - w.kv_blocks_used, w.block_size)
                for w in self.topology.workers if w.role == role and w.serving]

    # -- Generate -----------------------------------------------------------------------------
    def _prompt_ids(self, request) -> list[int]:
        if request.WhichOneof("input") == "prompt_token_ids":
            ids = list(request.prompt_token_ids.ids)
        elif not request.prompt:
            ids = []
        elif request.chat:
            ids = list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=False))
        else:
            ids = self.tokenizer(request.prompt).input_ids
        validate_prompt_ids(ids, self.config.vocab_size)
        return ids

    @grpc_errors
    async def Generate(self, request, context):
        arrived = time.perf_counter()
        if self.tokenizer is None:
            raise Unavailable("gateway is still starting")
        params = validate_params(request, self.settings.default_max_tokens)
        prompt = self._prompt_ids(request)
        validate_context(len(prompt), params.max_tokens, self.config.max_position_embeddings)
        metrics.PROMPT_TOKENS.inc(len(prompt))
        request_id = request.request_id or uuid.uuid4().hex
        # Towards the workers every request has an id of the gateway's own: two clients that
        # chose the same request_id must not meet on a worker.
        worker_request_id = uuid.uuid4().hex
        sampling = SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            seed=params.seed if params.seed is not None else random.getrandbits(63),
            max_tokens=params.max_tokens, stop_token_ids=frozenset() if params.ignore_eos else self.eos_ids)
        timeout = context.time_remaining() or self.settings.request_timeout_s
        deadline = time.monotonic() + timeout
        remaining = lambda: max(0.001, deadline - time.monotonic())  # noqa: E731

        status = "error"
        self._running += 1
        metrics.RUNNING.set(self._running)
        decode_call = decode_worker = None
        try:
            decode_call, decode_worker = await self._reserve_decode(worker_request_id, len(prompt), sampling,
                                                                    remaining)
            first = await self._prefill(worker_request_id, prompt, sampling, decode_worker, remaining)
            detok = Detokenizer(self.tokenizer, params.stop)
            metrics.TTFT.observe(time.perf_counter() - arrived)
            first_at = time.perf_counter()
            n_tokens = 1
            text = detok.add([first.first_token_id])
            yield gateway_pb2.GenerateResponse(request_id=request_id, token_ids=[first.first_token_id], text=text)
            finish = None
            if not detok.stopped:
                # read(), not `async for`: the reservation was already read with read().
                while (event := await decode_call.read()) is not grpc.aio.EOF:
                    kind = event.WhichOneof("event")
                    if kind == "tokens":
                        n_tokens += len(event.tokens.token_ids)
                        text = detok.add(list(event.tokens.token_ids))
                        yield gateway_pb2.GenerateResponse(request_id=request_id,
                                                           token_ids=event.tokens.token_ids, text=text)
                        if detok.stopped:
                            break
                    elif kind == "finished":
                        finish = FINISH_FROM_PB[event.finished.reason]
                        break
            if detok.stopped:
                finish = "stop"
            elif finish is None:
                raise Unavailable(f"decode worker {decode_worker.worker_id} ended the stream without finishing")
            done = time.perf_counter()
            metrics.E2E.observe(done - arrived)
            metrics.GENERATION_TOKENS.inc(n_tokens)
            if n_tokens > 1:
                metrics.TPOT.observe((done - first_at) / (n_tokens - 1))
            status = "ok"
            yield gateway_pb2.GenerateResponse(
                request_id=request_id, text=detok.flush(), finish_reason=FINISH_TO_PB[finish],
                usage=gateway_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=n_tokens))
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            if decode_call is not None:
                decode_call.cancel()  # no-op when finished; frees the blocks otherwise
            if decode_worker is not None:
                self._outstanding_decode[decode_worker.worker_id] -= 1
            self._running -= 1
            metrics.RUNNING.set(self._running)
            metrics.REQUESTS.labels(status).inc()

    async def _prefill(self, request_id, prompt, sampling, decode_worker, remaining):
        """Prefill on the least loaded prefill worker; one that refuses at once (draining, not
        a prefill worker any more) has pushed no KV, so the next one is tried."""
        tried: set[str] = set()
        while True:
            candidates = [w for w in self._workers(common_pb2.ROLE_PREFILL) if w.worker_id not in tried]
            worker = pick_prefill(candidates, self._outstanding_prefill_tokens)
            if worker is None:
                raise Unavailable("no prefill worker is serving")
            tried.add(worker.worker_id)
            self._outstanding_prefill_tokens[worker.worker_id] += len(prompt)
            try:
                stub = worker_pb2_grpc.WorkerStub(self.channels.get(worker.address))
                return await stub.Prefill(worker_pb2.PrefillRequest(
                    request_id=request_id, prompt_token_ids=prompt, sampling=sampling_to_pb(sampling),
                    decode_address=decode_worker.address), timeout=remaining())
            except grpc.aio.AioRpcError as exc:
                if not is_refusal(exc):
                    raise
                log.info("prefill worker %s refused %s: %s; trying another", worker.worker_id, request_id,
                         exc.details())
            finally:
                self._outstanding_prefill_tokens[worker.worker_id] -= len(prompt)

    async def _reserve_decode(self, request_id, prompt_len, sampling, remaining):
        """Open Decode on the first decode worker that reserves the request's KV blocks."""
        workers = decode_preference(self._workers(common_pb2.ROLE_DECODE), self._outstanding_decode,
                                    kv_tokens_for(prompt_len, sampling.max_tokens))
        if not workers:
            raise Unavailable("no decode worker is serving")
        refusals = []
        for worker in workers:
            stub = worker_pb2_grpc.WorkerStub(self.channels.get(worker.address))
            call = stub.Decode(worker_pb2.DecodeRequest(request_id=request_id, prompt_len=prompt_len,
                                                        sampling=sampling_to_pb(sampling)), timeout=remaining())
            try:
                event = await call.read()
            except asyncio.CancelledError:
                call.cancel()
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                    refusals.append(f"{worker.worker_id}: {exc.details()}")
                    continue
                raise
            if event is grpc.aio.EOF or event.WhichOneof("event") != "reserved":
                call.cancel()
                raise Unavailable(f"decode worker {worker.worker_id} did not confirm the reservation")
            self._outstanding_decode[worker.worker_id] += 1
            return call, worker
        raise ResourceExhausted("no decode worker can hold this request: " + "; ".join(refusals))

    @grpc_errors
    async def GetStatus(self, request, context):
        return gateway_pb2.GetStatusResponse(
            gateway_address=f"{self.settings.public_host}:{self.settings.gateway_port}",
            gateway_metrics_address=f"{self.settings.public_host}:{self.settings.gateway_metrics_port}",
            planner_address=self.settings.planner_address, model=self.settings.model,
            topology=self.topology, running_requests=self._running)


async def main() -> None:
    settings = GatewaySettings()
    servicer = GatewayServicer(settings)
    try:
        await run_server(host=settings.host, port=settings.gateway_port,
                         metrics_port=settings.gateway_metrics_port,
                         services=[Service("dopd.v1.Gateway", servicer,
                                           gateway_pb2_grpc.add_GatewayServicer_to_server)],
                         start=servicer.start, drain=servicer.drain, grace=settings.drain_grace_s)
    finally:
        await servicer.channels.close()
