"""The gateway's OpenAI-compatible HTTP API: a second thin front end over the request core, served
by uvicorn on the gRPC server's event loop (services/gateway/server.py starts and stops it).

Every request goes through the same checks and the same core as gRPC Generate, so the messages,
the scheduling and the metrics are the same. Errors are OpenAI error objects: 400 bad input, 401
a missing or wrong API key, 404 an unknown model, 429 overload or admission refusal, 503 no worker
(or draining), 504 past the deadline. A stream's first event is awaited before the response
starts, so that a refusal is a status code and not a 200 with an error inside; an error after
that ends the stream with an error chunk and [DONE]. A client that goes away mid-stream cancels
the stream's task, and closing the core's generator frees the request's KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from common.errors import ServiceError
from services.gateway import metrics
from services.gateway.events import TokenEvent
from services.gateway.lifecycle import GenerationRequest
from services.gateway.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShaper,
    error_body,
    from_domain,
    from_validation,
)
from services.gateway.openapi_doc import openapi_document
from services.gateway.validation import GenerateParams

log = logging.getLogger(__name__)


class Front(Protocol):
    """What the API needs of the gateway (services/gateway/front.Gateway)."""

    serving: bool

    def text_prompt_ids(self, text: str) -> list[int]: ...

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]: ...

    def new_request(self, prompt: list[int], params: GenerateParams, request_id: str, timeout: float,
                    arrived: float) -> GenerationRequest: ...

    def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]: ...


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status)


def _sse(doc: dict | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc, separators=(',', ':'))}\n\n"


def create_app(front: Front, *, model: str, api_key: str, default_max_tokens: int, timeout_s: float) -> FastAPI:
    app = FastAPI(title="DOPD serving", docs_url=None, redoc_url=None, openapi_url=None)

    def _authorise(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    async def _body(request: Request, schema):
        try:
            raw = await request.json()
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
            raise ApiError(400, f"the body is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from exc
        if not isinstance(raw, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            body = schema.model_validate(raw)
        except ValidationError as exc:
            raise from_validation(exc) from exc
        if body.model != model:
            raise ApiError(404, f"model {body.model!r} is not served here; this gateway serves {model!r}",
                           param="model", code="model_not_found")
        return body

    async def _serve(request: Request, kind: str):
        arrived = time.perf_counter()
        try:
            _authorise(request)
            if not front.serving:
                raise ApiError(503, "the gateway is not serving (starting or draining)", "service_unavailable")
            if kind == "completion":
                body = await _body(request, CompletionRequest)
                params = body.params_for(default_max_tokens)
                prompt = body.single_prompt()
                ids = front.text_prompt_ids(prompt) if isinstance(prompt, str) else list(prompt)
            else:
                body = await _body(request, ChatCompletionRequest)
                params = body.params_for(default_max_tokens)
                ids = front.chat_prompt_ids(body.template_messages())
            req = front.new_request(ids, params, "", timeout_s, arrived)
            shaper = ResponseShaper(kind, model)
            events = front.generate(req)
            try:
                first = await anext(events)  # a refusal is a status code, not a stream
            except BaseException:
                await events.aclose()
                raise
        except ServiceError as exc:
            return _error_response(from_domain(exc))
        except ApiError as exc:
            return _error_response(exc)
        if body.stream:
            return StreamingResponse(_stream(shaper, first, events, body.include_usage), media_type="text/event-stream",
                                     background=BackgroundTask(events.aclose))
        return await _complete(shaper, first, events)

    def _counted(endpoint: str, response):
        # Counted here, not in a middleware: Starlette's BaseHTTPMiddleware wraps streamed bodies
        # and gets in the way of noticing a client that went away.
        metrics.HTTP_REQUESTS.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        return _counted("/v1/completions", await _serve(request, "completion"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return _counted("/v1/chat/completions", await _serve(request, "chat"))

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            _authorise(request)
        except ApiError as exc:
            return _counted("/v1/models", _error_response(exc))
        return _counted("/v1/models", JSONResponse(
            {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "dopd"}]}))

    document = openapi_document("DOPD serving: OpenAI-compatible API", "1", model)

    @app.get("/openapi.json")
    async def openapi():
        return JSONResponse(document)

    @app.get("/health")
    async def health():
        ok = front.serving
        return JSONResponse({"status": "ok" if ok else "not serving"}, status_code=200 if ok else 503)

    return app


async def _complete(shaper: ResponseShaper, first: TokenEvent, events: AsyncIterator[TokenEvent]) -> JSONResponse:
    parts, last = [first.text], first
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                parts.append(event.text)
                last = event
    except ServiceError as exc:
        return _error_response(from_domain(exc))
    usage = ResponseShaper.usage(last.prompt_tokens, last.completion_tokens)
    return JSONResponse(shaper.full("".join(parts), last.finish_reason or "stop", usage))


async def _stream(shaper: ResponseShaper, first: TokenEvent, events: AsyncIterator[TokenEvent],
                  include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: one per token event, the finish reason on the last, the usage if asked, [DONE].
    The core's generator is closed on every way out (end, error, the client gone)."""
    try:
        async with contextlib.aclosing(events):
            event, is_first = first, True
            while True:
                yield _sse(shaper.chunk(event.text, event.finish_reason, first=is_first))
                is_first = False
                if event.finish_reason is not None:
                    if include_usage:
                        yield _sse(shaper.usage_chunk(ResponseShaper.usage(event.prompt_tokens,
                                                                           event.completion_tokens)))
                    break
                event = await anext(events)
    except ServiceError as exc:
        err = from_domain(exc)
        yield _sse(error_body(err.message, err.type, err.param, err.code))
    except StopAsyncIteration:
        log.warning("request stream ended without a finish reason")
    yield _sse("[DONE]")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a process whose signals belong to the gRPC server (common/rpc/server.py)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """Serves `app` on host:port on the running event loop until stop()."""

    def __init__(self, app: FastAPI, host: str, port: int, grace_s: float) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=grace_s)
        self.server = _EmbeddedServer(config)
        self.host, self.port = host, port
        self.task: asyncio.Task | None = None

    def _listening_socket(self) -> socket.socket:
        """The port, bound with SO_REUSEPORT as gRPC binds its own: the gateways of one cluster
        (`dopd up --gateways N`) share it, and the kernel spreads the connections among them."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        return sock

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self._listening_socket()]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # a failed bind raises here (uvicorn exits the process: SystemExit)
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        await self.task
