"""Checks of a Generate request. Pure: each failure raises InvalidArgument naming the problem."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from common.errors import InvalidArgument
from common.prompts import validate_prompt_ids  # noqa: F401 - part of the gateway's checks

MAX_STOP_STRINGS = 16
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


def _as_float32(x: float) -> float:
    """x as the 32-bit float the workers receive (inf past its range, 0 below it)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class GenerateParams:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool


def validate_params(request, default_max_tokens: int) -> GenerateParams:
    """`request` is a dopd.v1.GenerateRequest."""
    return check_params(
        max_tokens=request.max_tokens if request.HasField("max_tokens") else default_max_tokens,
        temperature=request.temperature if request.HasField("temperature") else 1.0,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k if request.HasField("top_k") else 0,
        seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop),
        ignore_eos=request.ignore_eos)


def check_params(*, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                 stop: tuple[str, ...], ignore_eos: bool) -> GenerateParams:
    """The checks every front end shares (gRPC and the OpenAI API), with the same messages."""
    if max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be at least 1, got {max_tokens}")
    # The workers get them as 32-bit floats: what would overflow or round to 0 there is refused here.
    if not math.isfinite(_as_float32(temperature)) or temperature < 0:
        raise InvalidArgument(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0.0 < _as_float32(top_p) and top_p <= 1.0):  # also false for NaN
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= top_k <= INT32_MAX:
        raise InvalidArgument(f"top_k must be >= 0 (0 turns it off) and at most {INT32_MAX}, got {top_k}")
    if seed is not None and not 0 <= seed <= UINT64_MAX:
        raise InvalidArgument(f"seed must be in [0, 2**64), got {seed}")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if any(not s for s in stop):
        raise InvalidArgument("stop strings must not be empty")
    return GenerateParams(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)


def validate_context(prompt_len: int, max_tokens: int, max_context: int) -> None:
    if prompt_len + max_tokens > max_context:
        raise InvalidArgument(f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                              f"{prompt_len + max_tokens} tokens, beyond the model's context of {max_context}")
