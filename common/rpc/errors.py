"""Domain errors and the one place that maps them to gRPC status codes.

Service code raises these (or lets a downstream AioRpcError through); `grpc_errors` turns them
into a status with a message that says what is wrong. Anything else is a bug: it is logged and
answered with INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


REFUSED_KEY = "dopd-refused"


class Refused(Unavailable):
    """A worker turned a call away before doing any work (draining, loading, another role): the
    caller may safely try another worker. Marked in the trailing metadata, not the message."""


def is_refusal(exc: grpc.aio.AioRpcError) -> bool:
    return any(key == REFUSED_KEY for key, _ in (exc.trailing_metadata() or ()))


# A peer's status that means the same to our caller; any other (INVALID_ARGUMENT from a worker,
# say) is our fault, not the caller's, and becomes INTERNAL.
_PASSED_ON = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple]:
    if isinstance(exc, Refused):
        return exc.code, str(exc), ((REFUSED_KEY, "1"),)
    if isinstance(exc, ServiceError):
        return exc.code, str(exc), ()
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
