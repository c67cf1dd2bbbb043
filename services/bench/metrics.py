"""Per-request records and the run's summary (pure), with the metric names and definitions of
`vllm bench serve`:

- TTFT: from sending the request to receiving its first token.
- TPOT: (E2EL - TTFT) / (output tokens - 1); a request with one output token has no TPOT.
- ITL: the gaps between consecutive tokens of a request, all requests pooled.
- E2EL: from sending the request to the end of its response stream.
- request / output / total-token throughput: over completed requests, per second of `duration`.
- percentiles: numpy's linear interpolation; every latency in milliseconds.

SLOs: a request meets them when it completed, its TTFT <= slo_ttft_ms and its TPOT <=
slo_tpot_ms (a one-token request, having no TPOT, meets the TPOT SLO, as in vLLM's goodput), and,
when a stall SLO is given, its own p99 inter-token gap <= slo_itl_ms (DynaServe's P99 TBT: a
request whose tokens come evenly on average but stall now and then misses it; a request with no
gap, one token, meets it). The summary adds each request's p99 gap (`*_request_p99_itl_ms`) and
the longest gap of the run (`max_itl_ms`).
`slo_attainment` is over ALL requests: a failed request counts as missing the SLOs.
`goodput` is vLLM's request goodput: completed requests per second that meet every SLO given.
Failed requests are counted (`failed`, `errors`), never dropped.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (90, 99)
SLO_ITL_HELP = ("stall SLO in ms: each request's p99 inter-token gap (DynaServe's P99 TBT); counted in the "
                "attainment when given")


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds (t_sent from the run's start)."""

    request_id: str
    t_sent: float
    ttft: float | None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ok: bool = True
    error: str | None = None
    error_after: float | None = None  # a failed request: seconds from its send to its error
    error_detail: str | None = None  # what the server said with the error, where it said it

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @functools.cached_property  # read by several SLO checks and the summary: computed once
    def p99_itl(self) -> float | None:
        """This request's 99th percentile inter-token gap (seconds); None with no gap."""
        if not self.ok or not self.itls:
            return None
        return float(np.percentile(self.itls, 99))


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p99 of `values_s` (seconds) in ms, named `mean_{name}_ms` etc.;
    None where there are no values."""
    keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
    if len(values_s) == 0:
        return {f"{k}_{name}_ms": None for k in keys}
    ms = np.asarray(values_s, dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def meets_slo(r: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
              slo_itl_ms: float | None = None) -> bool:
    if not r.ok or r.ttft is None:
        return False
    if slo_ttft_ms is not None and r.ttft * 1000.0 > slo_ttft_ms:
        return False
    tpot = r.tpot
    if slo_tpot_ms is not None and tpot is not None and tpot * 1000.0 > slo_tpot_ms:
        return False
    p99_itl = r.p99_itl if slo_itl_ms is not None else None
    return not (p99_itl is not None and p99_itl * 1000.0 > slo_itl_ms)


def summarize(results: Sequence[RequestResult], duration: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None, slo_itl_ms: float | None = None) -> dict:
    """The run's metrics (see the module docstring); `duration` in seconds, > 0."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    done = [r for r in results if r.ok]
    total = len(results)
    total_input = sum(r.prompt_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    ttft_ok = [r for r in results if meets_slo(r, slo_ttft_ms, None)]
    tpot_ok = [r for r in results if meets_slo(r, None, slo_tpot_ms)]
    itl_ok = [r for r in results if meets_slo(r, None, None, slo_itl_ms)]
    good = [r for r in results if meets_slo(r, slo_ttft_ms, slo_tpot_ms, slo_itl_ms)]
    out = {
        "requests": total,
        "completed": len(done),
        "failed": total - len(done),
        "errors": dict(Counter(r.error or "UNKNOWN" for r in results if not r.ok)),
        "duration_s": duration,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    out |= _stats("ttft", [r.ttft for r in done if r.ttft is not None])
    out |= _stats("tpot", [t for r in done if (t := r.tpot) is not None])
    gaps = [gap for r in done for gap in r.itls]
    out |= _stats("itl", gaps)
    out |= _stats("request_p99_itl", [g for r in done if (g := r.p99_itl) is not None])
    out["max_itl_ms"] = max(gaps) * 1000.0 if gaps else None
    out |= _stats("e2el", [r.e2e for r in done if r.e2e is not None])
    out |= {
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "slo_itl_ms": slo_itl_ms,
        "slo_met": len(good),
        "ttft_attainment": len(ttft_ok) / total if total else None,
        "tpot_attainment": len(tpot_ok) / total if total else None,
        "itl_attainment": len(itl_ok) / total if total else None,
        "slo_attainment": len(good) / total if total else None,
        "goodput": len(good) / duration,
    }
    return out
