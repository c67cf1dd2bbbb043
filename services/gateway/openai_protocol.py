"""The OpenAI API's shapes, pure: request bodies (pydantic) to the gateway's checked parameters,
and the core's token events to completion objects and stream chunks. No I/O; the HTTP adapter
(openai_api.py) does the rest.

What is served: /v1/completions and /v1/chat/completions with model, prompt or messages,
max_tokens (max_completion_tokens for chat), temperature, top_p, top_k, seed, stop, n=1,
ignore_eos, user, stream and stream_options.include_usage. Fields that would change the output in
ways we do not implement (logprobs, echo, suffix, best_of > 1, penalties, tools, response formats)
are refused with a message rather than silently ignored; fields with no effect on the output
(user, metadata...) are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.gateway.validation import GenerateParams, check_params

# Domain error -> (HTTP status, OpenAI error type); most specific first.
HTTP_OF_ERROR: list[tuple[type[ServiceError], int, str]] = [
    (InvalidArgument, 400, "invalid_request_error"),
    (ResourceExhausted, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable"),
    (DeadlineExceeded, 504, "timeout"),
    (ServiceError, 500, "internal_error"),
]


class ApiError(Exception):
    """An error with its HTTP status and OpenAI fields, raised where no domain error fits (an
    unknown model, a missing API key)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_domain(exc: ServiceError) -> ApiError:
    status, type_ = next((s, t) for cls, s, t in HTTP_OF_ERROR if isinstance(exc, cls))
    return ApiError(status, str(exc), type_)


def from_validation(exc: ValidationError) -> ApiError:
    """pydantic's first complaint, as OpenAI puts it: a message and the parameter it is about."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


# Strict: a JSON value of the wrong type is refused (400), never coerced ("1" or false for a
# number, "true" or 1 for a boolean); an integer serves for a number, and a number with no
# fraction (1.0) for an integer, as JSON Schema has it: the document served at /openapi.json
# (openapi_doc.py) promises what this parses.
STRICT = ConfigDict(extra="ignore", strict=True)


def _integral(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Common(BaseModel):
    model_config = STRICT

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: JsonInt | None = None  # an extension (vLLM, SGLang have it too); 0 or -1 turn it off
    seed: JsonInt | None = None
    stop: str | list[str] | None = None
    n: JsonInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def _refuse_unsupported(self) -> None:
        if self.n != 1:
            raise ApiError(400, f"n must be 1 (one choice a request), got {self.n}", param="n")
        if self.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (only 0)", param=name)

    def params(self, max_tokens: int | None, default_max_tokens: int) -> GenerateParams:
        """The checked parameters (common/errors.InvalidArgument with the gRPC API's messages)."""
        self._refuse_unsupported()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        top_k = self.top_k or 0
        return check_params(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=0 if top_k == -1 else top_k,
            seed=self.seed, stop=stop, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[JsonInt] | list[str] | list[list[JsonInt]]
    max_tokens: JsonInt | None = Field(default=None)
    echo: bool = False
    suffix: str | None = None
    best_of: JsonInt | None = None

    def params_for(self, default_max_tokens: int) -> GenerateParams:
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise ApiError(400, f"best_of must be 1, got {self.best_of}", param="best_of")
        return self.params(self.max_tokens, default_max_tokens)

    def single_prompt(self) -> str | list[int]:
        """The one prompt (text or token ids); a batch of prompts is refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, f"one prompt a request, got a batch of {len(p)}", param="prompt")
            p = p[0]
        return p


class ChatMessage(BaseModel):
    model_config = STRICT

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content as text; only text parts are supported."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(400, f"only text content parts are supported, got {part.get('type')!r}",
                               param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: JsonInt | None = None
    max_completion_tokens: JsonInt | None = None
    tools: list | None = None
    response_format: dict | None = None

    def params_for(self, default_max_tokens: int) -> GenerateParams:
        if self.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError(400, "only the text response format is supported", param="response_format")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.params(limit, default_max_tokens)

    def template_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


Kind = Literal["completion", "chat"]


class ResponseShaper:
    """Builds one response's objects: the final body, or its stream chunks, all with one id."""

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, stream: bool) -> str:
        if self.kind == "completion":
            return "text_completion"
        return "chat.completion.chunk" if stream else "chat.completion"

    def _envelope(self, stream: bool, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": self._object(stream), "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None or not stream:
            out["usage"] = usage
        return out

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def full(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        return self._envelope(False, [choice], usage)

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        else:
            delta: dict = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(True, [choice])

    def usage_chunk(self, usage: dict) -> dict:
        """stream_options.include_usage: the last chunk, no choices, the usage."""
        return self._envelope(True, [], usage)

