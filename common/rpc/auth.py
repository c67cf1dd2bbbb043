"""The internal plane's credential: a cluster token that every internal RPC carries in its
metadata, and that every server checks (in constant time) before any handler runs. And the public
gRPC API's: the gateway's API key (`ApiKeyInterceptor`, `api_key_metadata`), the same key as the
OpenAI API's, sent as `authorization: Bearer KEY`.

Internal: every method of dopd.v1.Worker and dopd.v1.Planner (Prefill, Decode, PushKV, SetRole,
the topology, load reports, heartbeats...). Public: dopd.v1.Gateway (its clients use API keys
instead, on the HTTP API), grpc.health.v1 (probes) and reflection.

Where the token comes from:
- a service: `DOPD_CLUSTER_TOKEN` (`dopd up` makes one per cluster and passes it on; compose and
  Kubernetes take it from a secret). With none set, the service runs with its internal plane
  open and says so in its log;
- a caller in another process on the same machine (`dopd status`, `dopd role`): the file that
  `dopd up` wrote for its gateway address, readable by its user only (`load_token_file`).

Callers send it by wrapping their channel (`TokenChannel`): every stub made on it adds the token
to each call's metadata, whatever the call's kind. A call without it, or with a wrong one, gets
UNAUTHENTICATED before any handler runs, so it changes nothing.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_KEY = "dopd-cluster-token"
ENV = "DOPD_CLUSTER_TOKEN"
PUBLIC_SERVICES = frozenset({
    "dopd.v1.Gateway", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


def cluster_token() -> str:
    """This process's cluster token ("" when none)."""
    return os.environ.get(ENV, "")


# -- the server side ----------------------------------------------------------------------------

class _CredentialInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED, before any handler runs, a call that `_allowed` refuses."""

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        raise NotImplementedError

    def _refusal(self, method: str) -> str | None:
        return None  # _refusing's message for internal calls

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._allowed(handler_call_details):
            return handler
        return _refusing(handler, handler_call_details.method, self._refusal(handler_call_details.method))


def _sent(details: grpc.HandlerCallDetails, key: str) -> str | bytes | None:
    return next((v for k, v in (details.invocation_metadata or ()) if k == key), None)


class ClusterTokenInterceptor(_CredentialInterceptor):
    """Refuses internal calls that do not carry the cluster token."""

    def __init__(self, token: str, public: frozenset[str] = PUBLIC_SERVICES) -> None:
        if not token:
            raise ValueError("an empty cluster token would let anyone in")
        self._token = token.encode()
        self._public = public

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        service = details.method.split("/")[1] if details.method.count("/") >= 2 else ""
        if service in self._public:
            return True
        sent = _sent(details, TOKEN_KEY)
        if sent is None:
            return False
        sent = sent.encode() if isinstance(sent, str) else sent
        return hmac.compare_digest(sent, self._token)


def _refusing(handler: grpc.RpcMethodHandler, method: str, message: str | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED and does nothing."""
    message = message or (f"{method} is an internal RPC: it needs this cluster's token in the '{TOKEN_KEY}' "
                          f"metadata (set {ENV}, or run the dopd command on the machine where `dopd up` runs)")

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serde = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **serde)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **serde)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **serde)
    return grpc.unary_unary_rpc_method_handler(refuse, **serde)


# What the API key guards: serving. GetStatus stays open, as health and reflection do: operators'
# tools (`dopd status`, `dopd role`, `dopd up`'s readiness check) read it, and it serves nothing.
API_KEY_METHODS = frozenset({"/dopd.v1.Gateway/Generate"})


class ApiKeyInterceptor(_CredentialInterceptor):
    """Refuses calls to the public API's serving methods (API_KEY_METHODS) that do not carry the
    API key as `authorization: Bearer KEY` metadata (UNAUTHENTICATED before any handler runs, so
    the call changes nothing); health, reflection and GetStatus stay open. The key is compared in
    constant time."""

    def __init__(self, key: str, protected: frozenset[str] = API_KEY_METHODS) -> None:
        if not key:
            raise ValueError("an empty API key would let anyone in")
        self._key = key.encode()
        self._protected = protected

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method not in self._protected:
            return True
        sent = _sent(details, "authorization")
        if sent is None:
            return False
        sent = sent.decode(errors="replace") if isinstance(sent, bytes) else sent
        scheme, _, key = sent.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self._key)

    def _refusal(self, method: str) -> str:
        return (f"{method} needs the API key: send 'authorization: Bearer KEY' metadata (dopd generate/bench "
                "--api-key, or DOPD_API_KEY)")


def api_key_metadata(key: str) -> tuple[tuple[str, str], ...]:
    """The metadata a call to the public gRPC API carries for `key` (none when there is no key)."""
    return (("authorization", f"Bearer {key}"),) if key else ()


def server_interceptors(token: str, what: str) -> list[grpc.aio.ServerInterceptor]:
    """The token check, when there is a token."""
    if not token:
        log.warning("%s: no %s set: its internal RPCs are open to anyone who can reach its port", what, ENV)
        return []
    return [ClusterTokenInterceptor(token)]


# -- the caller side ----------------------------------------------------------------------------

class _WithToken:
    """A multicallable that adds the token to the call's metadata."""

    def __init__(self, inner, token: str) -> None:
        self._inner, self._token = inner, token

    def __call__(self, *args, metadata=None, **kwargs):
        return self._inner(*args, metadata=(*(metadata or ()), (TOKEN_KEY, self._token)), **kwargs)


class TokenChannel:
    """A grpc.aio channel whose calls carry the cluster token; stubs take it as a channel."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._channel, self._token = channel, token

    def unary_unary(self, *args, **kwargs):
        return _WithToken(self._channel.unary_unary(*args, **kwargs), self._token)

    def unary_stream(self, *args, **kwargs):
        return _WithToken(self._channel.unary_stream(*args, **kwargs), self._token)

    def stream_unary(self, *args, **kwargs):
        return _WithToken(self._channel.stream_unary(*args, **kwargs), self._token)

    def stream_stream(self, *args, **kwargs):
        return _WithToken(self._channel.stream_stream(*args, **kwargs), self._token)

    def __getattr__(self, name):  # close, channel_ready, get_state...
        return getattr(self._channel, name)

    async def __aenter__(self) -> TokenChannel:
        await self._channel.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.__aexit__(*exc)


# -- the token file that `dopd up` leaves for the dopd commands -----------------------------------

def token_dir() -> Path:
    return Path(os.environ.get("DOPD_STATE_DIR") or Path.home() / ".local" / "state" / "dopd") / "clusters"


def token_file(gateway_address: str) -> Path:
    return token_dir() / (gateway_address.replace(":", "_").replace("/", "_") + ".token")


def write_token_file(gateway_address: str, token: str) -> Path:
    """The token, readable by this user alone (the directory too)."""
    directory = token_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    path = token_file(gateway_address)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(path, 0o600)
    return path


def load_token_file(gateway_address: str) -> bool:
    """Use the token that `dopd up` wrote for this gateway, unless this process has one already.
    True when a token is in use afterwards."""
    if cluster_token():
        return True
    try:
        token = token_file(gateway_address).read_text().strip()
    except OSError:
        return False
    if token:
        os.environ[ENV] = token
    return bool(token)

