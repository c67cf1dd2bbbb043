"""The one place where domain errors (common/errors.py) meet gRPC status codes, both ways.

`grpc_errors` decorates a servicer method: a domain error becomes its status with its message;
a downstream call's AioRpcError is passed on where it means the same to our caller; anything else
is a bug: it is logged and answered with INTERNAL, and the server keeps serving.
`domain_error` turns a peer's AioRpcError back into a domain error, for code (the gateway's
request core) that must not know about grpc.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc

from common.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PeerError,
    Refused,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

log = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of gives its code.
STATUS_OF_ERROR: list[tuple[type[ServiceError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Aborted, grpc.StatusCode.ABORTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ServiceError, grpc.StatusCode.INTERNAL),
]

REFUSED_KEY = "dopd-refused"


def status_code(exc: ServiceError) -> grpc.StatusCode:
    return next(code for cls, code in STATUS_OF_ERROR if isinstance(exc, cls))


def is_refusal(exc: grpc.aio.AioRpcError) -> bool:
    return any(key == REFUSED_KEY for key, _ in (exc.trailing_metadata() or ()))


# A peer's status that means the same to our caller; any other (INVALID_ARGUMENT from a worker,
# say) is our fault, not the caller's, and becomes INTERNAL.
_PASSED_ON = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
_DOMAIN_OF_PEER_STATUS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def domain_error(exc: grpc.aio.AioRpcError, what: str = "") -> ServiceError:
    """A peer's failure as a domain error: a refusal stays a Refused (safe to try elsewhere), a
    status that means the same to our caller keeps its kind, anything else is a PeerError."""
    details = exc.details() or exc.code().name
    message = f"{what}: {details}" if what else details
    if is_refusal(exc):
        return Refused(message)
    if exc.code() == grpc.StatusCode.CANCELLED:
        return Unavailable(f"a peer cancelled: {message}")
    cls = _DOMAIN_OF_PEER_STATUS.get(exc.code())
    if cls is not None:
        return cls(message)
    return PeerError(f"a peer answered {exc.code().name}: {message}")


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple]:
    if isinstance(exc, PeerError):
        return grpc.StatusCode.INTERNAL, str(exc), ()
    if isinstance(exc, Refused):
        return status_code(exc), str(exc), ((REFUSED_KEY, "1"),)
    if isinstance(exc, ServiceError):
        return status_code(exc), str(exc), ()
    if isinstance(exc, grpc.aio.AioRpcError):  # a downstream call failed
        details = exc.details() or exc.code().name
        if exc.code() in _PASSED_ON:
            return exc.code(), details, ()
        if exc.code() == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.UNAVAILABLE, f"a peer cancelled: {details}", ()
        return grpc.StatusCode.INTERNAL, f"a peer answered {exc.code().name}: {details}", ()
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out", ()
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", ()


def grpc_errors(method):
    """Decorate a grpc.aio servicer method (unary or server-streaming) with the status mapping."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - this is the mapping point
                await context.abort(*_status_of(exc))
        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            await context.abort(*_status_of(exc))
    return unary_wrapper


# -- requests that do not parse ---------------------------------------------------------------------

class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class UndecodableIsInvalid(grpc.aio.ServerInterceptor):
    """A request whose bytes do not parse as its message (a string that is not UTF-8, a corrupt
    wire format) gets INVALID_ARGUMENT, as any other bad request, instead of the UNKNOWN that
    grpc's own deserialisation answers before any servicer (or `grpc_errors`) sees it. Unary
    requests only: a stream's messages are checked by the code that reads them."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def safe_parse(raw: bytes):
            try:
                return parse(raw)
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and kin
                return _Undecodable(f"{method}: the request does not parse: {exc}")

        async def refuse(request: _Undecodable, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)

        serde = {"request_deserializer": safe_parse, "response_serializer": handler.response_serializer}
        if not handler.response_streaming:
            behavior = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    return await refuse(request, context)
                return await behavior(request, context)
            return grpc.unary_unary_rpc_method_handler(unary, **serde)
        behavior = handler.unary_stream
        if inspect.iscoroutinefunction(behavior):  # it writes its responses itself (health's Watch)
            async def written(request, context):
                if isinstance(request, _Undecodable):
                    return await refuse(request, context)
                return await behavior(request, context)
            return grpc.unary_stream_rpc_method_handler(written, **serde)

        # grpc.aio tells an async generator handler from a sync one by its function: the check has
        # to be one too, relaying each response (one generator hop a message).
        async def streamed(request, context):
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            async for response in behavior(request, context):
                yield response
        return grpc.unary_stream_rpc_method_handler(streamed, **serde)
