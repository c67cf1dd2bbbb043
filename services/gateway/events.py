"""What the gateway's request core sees of a decode stream and produces for its front ends, as
plain data (the gRPC and, later, HTTP adapters convert in one place each)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reserved:
    blocks: int


@dataclass(frozen=True)
class Tokens:
    token_ids: tuple[int, ...]
    start_index: int  # index in the completion of token_ids[0]


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | abort
    completion_tokens: int


@dataclass(frozen=True)
class Moved:
    """The request goes on on another decode worker: follow it there."""

    worker_id: str
    address: str
    next_index: int


DecodeEvent = Reserved | Tokens | Finished | Moved


@dataclass(frozen=True)
class TokenEvent:
    """One step of a response stream, for the front end."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None  # set on the last event only
    prompt_tokens: int = 0  # set on the last event only
    completion_tokens: int = 0
