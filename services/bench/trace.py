"""JSONL request traces: one request a line,

    {"t": 0.25, "prompt_tokens": 512, "output_tokens": 128}
    {"t": 0.40, "prompt": "Write a haiku about the sea.", "output_tokens": 64}

`t` is seconds from the start (>= 0), `output_tokens` >= 1, and exactly one of `prompt_tokens`
(>= 1; the runner sends that many seeded random token ids) or `prompt` (text, tokenized by the
gateway). Blank lines are skipped; anything else that does not fit raises ValueError naming the
line. Requests come back ordered by `t`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from services.bench.workloads import BenchRequest

_KEYS = {"t", "prompt_tokens", "prompt", "output_tokens"}


def _int(value, key: str, where: str) -> int:
    # bool is an int in Python; a trace that says true means something else.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def parse_line(line: str, where: str) -> BenchRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(_KEYS)}")
    t = obj.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: t must be a finite number of seconds >= 0, got {t!r}")
    if "output_tokens" not in obj:
        raise ValueError(f"{where}: output_tokens is missing")
    output = _int(obj["output_tokens"], "output_tokens", where)
    has_ids, has_text = "prompt_tokens" in obj, "prompt" in obj
    if has_ids == has_text:
        raise ValueError(f"{where}: give exactly one of prompt_tokens and prompt")
    if has_ids:
        return BenchRequest(float(t), _int(obj["prompt_tokens"], "prompt_tokens", where), None, output)
    if not isinstance(obj["prompt"], str) or not obj["prompt"]:
        raise ValueError(f"{where}: prompt must be a non-empty string")
    return BenchRequest(float(t), None, obj["prompt"], output)


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> list[BenchRequest]:
    out = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            out.append(parse_line(line, f"{source}:{number}"))
    return sorted(out, key=lambda r: r.t)


def read_trace(path: str | Path) -> list[BenchRequest]:
    with open(path, encoding="utf-8") as f:
        return parse_trace(f, str(path))


def to_line(request: BenchRequest) -> str:
    obj: dict = {"t": request.t}
    if request.prompt_tokens is not None:
        obj["prompt_tokens"] = request.prompt_tokens
    else:
        obj["prompt"] = request.prompt
    obj["output_tokens"] = request.output_tokens
    return json.dumps(obj, ensure_ascii=False)


def write_trace(path: str | Path, requests: Iterable[BenchRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for request in requests:
            f.write(to_line(request) + "\n")


def scale_to_rate(requests: list[BenchRequest], rate: float) -> list[BenchRequest]:
    """The trace with its times stretched or squeezed so that its mean rate (requests over the
    time of the last arrival) becomes `rate`; the order and gaps' proportions are kept."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    span = max((r.t for r in requests), default=0.0)
    if span <= 0:
        return list(requests)
    factor = (len(requests) / rate) / span
    return [BenchRequest(r.t * factor, r.prompt_tokens, r.prompt, r.output_tokens) for r in requests]
