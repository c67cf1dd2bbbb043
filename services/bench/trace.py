"""JSONL request traces: one request a line,

    {"t": 0.25, "prompt_tokens": 512, "output_tokens": 128}
    {"t": 0.40, "prompt": "Write a haiku about the sea.", "output_tokens": 64}

`t` is seconds from the start (>= 0), `output_tokens` >= 1, and exactly one of `prompt_tokens`
(>= 1; the runner sends that many seeded random token ids) or `prompt` (text, tokenized by the
gateway). Blank lines are skipped; anything else that does not fit raises ValueError naming the
line. Requests come back ordered by `t`.

Azure LLM inference traces (Azure/AzurePublicDataset, `AzureLLMInferenceTrace_{conv,code}.csv`)
are read too: a CSV with the header `TIMESTAMP,ContextTokens,GeneratedTokens`, one request a
row, the timestamp a date and time (`2023-11-16 18:15:46.6805900`). `t` becomes seconds from the
first row, or from `origin` when given, so that several traces of the same hour keep their
relative timing (`read_traces` uses the earliest first timestamp of all CSVs given). A count of
0 tokens is read as 1 (a BenchRequest asks for at least one); nothing else is clipped.

`merge_traces` puts several traces on one clock: every request keeps its `t`, all of them
ordered by `t` (ties in the order the traces were given).
"""

from __future__ import annotations

import csv
import heapq
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from services.bench.workloads import BenchRequest, clamp_to_context

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


AZURE_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]


def clamp_trace(requests: Sequence[BenchRequest], max_context: int) -> list[BenchRequest]:
    """The trace with each request fitted into `max_context` tokens as the workloads are
    (`workloads.clamp_to_context`: the prompt is cut first); times are kept. A request with a text
    prompt keeps its text (only the server's tokenizer knows its length) and its output length."""
    out = []
    for r in requests:
        if r.prompt_tokens is None:
            out.append(r)
            continue
        prompt, output = clamp_to_context(r.prompt_tokens, r.output_tokens, max_context)
        out.append(replace(r, prompt_tokens=prompt, output_tokens=output))
    return out


def _azure_time(text: str, where: str) -> datetime:
    # fromisoformat takes at most 6 fractional digits in Python 3.11; the traces have 7.
    head, dot, frac = text.strip().partition(".")
    try:
        return datetime.fromisoformat(head + (dot + frac[:6] if dot else ""))
    except ValueError:
        raise ValueError(f"{where}: TIMESTAMP must be a date and time, got {text!r}") from None


def _azure_rows(lines: Iterable[str], source: str) -> list[tuple[datetime, int, int]]:
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != AZURE_HEADER:
        raise ValueError(f"{source}:1: expected the header {','.join(AZURE_HEADER)}, got {header!r}")
    rows = []
    for number, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        where = f"{source}:{number}"
        if len(row) != 3:
            raise ValueError(f"{where}: expected 3 fields, got {len(row)}")
        try:
            context, generated = int(row[1]), int(row[2])
        except ValueError:
            raise ValueError(f"{where}: ContextTokens and GeneratedTokens must be integers") from None
        if context < 0 or generated < 0:
            raise ValueError(f"{where}: token counts must be >= 0")
        rows.append((_azure_time(row[0], where), context, generated))
    return rows


def parse_azure_csv(lines: Iterable[str], source: str = "<csv>", origin: datetime | None = None) -> list[BenchRequest]:
    """An Azure trace's rows as requests, `t` in seconds from `origin` (default: the first row's
    time; rows before `origin` raise)."""
    return _azure_requests(_azure_rows(lines, source), source, origin)


def _azure_requests(rows: list[tuple[datetime, int, int]], source: str,
                    origin: datetime | None) -> list[BenchRequest]:
    if not rows:
        return []
    start = origin if origin is not None else min(r[0] for r in rows)
    out = []
    for when, context, generated in rows:
        t = (when - start).total_seconds()
        if t < 0:
            raise ValueError(f"{source}: a row at {when} is before the origin {start}")
        out.append(BenchRequest(t, max(1, context), None, max(1, generated)))
    return sorted(out, key=lambda r: r.t)


def _read_azure_rows(path: str | Path) -> list[tuple[datetime, int, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        return _azure_rows(f, str(path))


def read_azure_csv(path: str | Path, origin: datetime | None = None) -> list[BenchRequest]:
    return _azure_requests(_read_azure_rows(path), str(path), origin)


def merge_traces(traces: Sequence[Sequence[BenchRequest]]) -> list[BenchRequest]:
    """Several traces on one clock: all their requests, ordered by `t` (stable: a tie keeps the
    order of the traces as given, and each trace's own order)."""
    ordered = [sorted(trace, key=lambda r: r.t) for trace in traces]
    return list(heapq.merge(*ordered, key=lambda r: r.t))


def read_traces(paths: Sequence[str | Path]) -> list[BenchRequest]:
    """JSONL and Azure CSV traces (by suffix `.csv`) merged onto one clock. The CSVs share one
    origin, the earliest first timestamp among them; JSONL times are used as they are."""
    # Each CSV is read once: its rows give both the common origin and its requests.
    rows = {str(p): _read_azure_rows(p) for p in paths if str(p).lower().endswith(".csv")}
    origin = min((r[0] for rs in rows.values() for r in rs), default=None)
    return merge_traces([_azure_requests(rows[str(p)], str(p), origin) if str(p) in rows else read_trace(p)
                         for p in paths])
