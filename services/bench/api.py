"""`dopd bench` as a library call: a `BenchSpec` in, one run against a gateway, results.json's
dict out (and under `out`, as the command writes them: results.json, requests.jsonl, the plots).

    bench_run(spec)   one run; the summary printed as the command prints it
    bench_once(spec)  the same with the command's exit code (0 ran, 1 no answer or nothing
                      completed, 2 bad arguments), errors said on stderr: `dopd bench` and
                      `dopd bench compare` alike
    served(spec)      the model the target serves and its KV cost, asked of it
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from services.bench.sources import DEFAULT_RATE, RequestSource, build_requests, max_context_of, print_summary

if TYPE_CHECKING:
    from services.bench.report import KVCost


class TargetError(OSError):
    """The gateway (or the OpenAI API) did not say what it serves; the message says which, and why."""


@dataclass(frozen=True)
class BenchSpec:
    """One run of `dopd bench`: the requests, where they go, the SLOs and where the results go."""

    source: RequestSource
    slo_ttft_ms: float
    slo_tpot_ms: float
    out: Path
    slo_itl_ms: float | None = None
    target: str | None = None  # the gateway's gRPC address; with the openai backend optional (status samples)
    backend: str = "grpc"  # or "openai"
    base_url: str | None = None  # openai: the API's base URL
    api_key: str = ""
    time_scale: float = 1.0  # send at t x F wall seconds; results in profile time
    request_timeout_s: float = 60.0  # profile seconds per request
    progress: bool = True
    model: str | None = None  # None: asked of the target (`served`)
    kv: KVCost | None = None  # a prompt's hand-off cost, for the harness check; None: not known


async def _status(target: str):
    import grpc

    from common.pb import gateway_pb2, gateway_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        return await gateway_pb2_grpc.GatewayStub(channel).GetStatus(gateway_pb2.GetStatusRequest(), timeout=5.0)


def _served_model(base_url: str, api_key: str) -> str:
    """The first model an OpenAI API lists (GET /models)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=10.0)
        reply.raise_for_status()
        return reply.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise OSError(f"no model listed: {exc}") from exc


def served(spec: BenchSpec) -> tuple[str, KVCost | None]:
    """(model, KV cost) of what the target serves: the gateway's status, or, without a target, the
    OpenAI API's first model (KV cost not known). TargetError when neither answers."""
    import grpc

    from services.bench.report import kv_cost

    try:
        if spec.target:
            status = asyncio.run(_status(spec.target))
            return status.model, kv_cost(status.model, [list(w.kv_transports) for w in status.topology.workers],
                                         status.serving_mode)
        return _served_model(spec.base_url, spec.api_key), None
    except grpc.aio.AioRpcError as exc:
        raise TargetError(f"gateway {spec.target}: {exc.code().name}: {exc.details()}") from exc
    except OSError as exc:
        raise TargetError(f"{spec.base_url}: {exc}") from exc


def config_doc(spec: BenchSpec, model: str, duration: float, requests: int) -> dict:
    """results.json's `config`: what was run (`trace` lists every file, in the order given)."""
    s = spec.source
    return {"target": spec.target, "backend": spec.backend, "base_url": spec.base_url, "model": model,
            "workload": s.workload,
            "trace": [str(t) for t in s.trace] if s.trace else None,
            "rate": s.rate if s.rate is not None else (DEFAULT_RATE if s.workload else None),
            "burstiness": s.burstiness, "duration_s": duration, "seed": s.seed,
            "slo_ttft_ms": spec.slo_ttft_ms, "slo_tpot_ms": spec.slo_tpot_ms, "slo_itl_ms": spec.slo_itl_ms,
            "time_scale": spec.time_scale, "max_context": max_context_of(s),
            "request_timeout_s": spec.request_timeout_s, "requests": requests}


def bench_run(spec: BenchSpec) -> dict:
    """One run: the requests sent open loop, results.json, requests.jsonl and the plots written
    under spec.out, the summary printed; results.json's dict. Asks the target what it serves
    first unless spec.model says (TargetError when it does not answer)."""
    from services.bench.plots import plot_latency_cdfs, plot_timeline
    from services.bench.report import build_results, load_ceiling
    from services.bench.runner import RunSettings, run_load

    if spec.model is None:
        model, kv = served(spec)
        spec = replace(spec, model=model, kv=kv)
    requests, duration = build_requests(spec.source)
    settings = RunSettings(target=spec.target, backend=spec.backend, base_url=spec.base_url or "",
                           api_key=spec.api_key, model=spec.model, request_timeout=spec.request_timeout_s,
                           time_scale=spec.time_scale, seed=spec.source.seed, progress=spec.progress)
    config = config_doc(spec, spec.model, duration, len(requests))
    outcome = asyncio.run(run_load(requests, settings))
    results = build_results(requests, outcome, config, duration, spec.slo_ttft_ms, spec.slo_tpot_ms, load_ceiling(),
                            spec.kv, slo_itl_ms=spec.slo_itl_ms)
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "results.json").write_text(json.dumps(results, indent=2))
    with open(spec.out / "requests.jsonl", "w") as f:
        for r in outcome.results:
            f.write(json.dumps(asdict(r)) + "\n")
    plot_latency_cdfs(outcome.results, spec.out, spec.slo_ttft_ms, spec.slo_tpot_ms)
    plot_timeline(outcome.samples, results["timeline"]["arrivals_per_s"], spec.out)
    print_summary(results, spec.out)
    return results


def completed_some(results: dict) -> bool:
    """Whether a run counts as run: some request completed, or there was none to send."""
    return bool(results["completed"] or not results["requests"])


def bench_once(spec: BenchSpec) -> tuple[int, dict | None]:
    """One run as `dopd bench` makes it: (its exit code, its results; None when it did not run)."""
    try:
        results = bench_run(spec)
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    return (0 if completed_some(results) else 1), results
