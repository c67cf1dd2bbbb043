"""Section 3: KV hand-off of a long prompt, read from the workers' Prometheus metrics.

The PrefillResponse (prefill_seconds, handoff_seconds, kv_bytes) stays inside the gateway, and a
prefill worker cannot be called without a decode reservation, so each request is sent alone and
the prefill worker's metrics are diffed around it:

- dopd_prefill_seconds_sum        forward time of the prefill batch (one request here)
- dopd_kv_handoff_seconds_sum     forward done -> decode worker acknowledged all KV
- dopd_kv_transfer_bytes_total{direction="sent",transport="grpc"}

KV streams layer by layer while the forward runs, so the streaming rate is approximated as
kv_bytes / (prefill_seconds + handoff_seconds) (first chunk leaves after layer 0, roughly at the
start of the forward). One extra request is sent while a thread polls the decode worker's
received-bytes counter; its timeline gives the bytes still outstanding when the forward ended, hence
the tail rate of the hand-off proper (an estimate, at the polling resolution).
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from common.rpc.channels import CHANNEL_OPTIONS
from services.client import generate

PREFILL_SUM = ("dopd_prefill_seconds_sum", ())
PREFILL_COUNT = ("dopd_prefill_seconds_count", ())
HANDOFF_SUM = ("dopd_kv_handoff_seconds_sum", ())
HANDOFF_COUNT = ("dopd_kv_handoff_seconds_count", ())
SENT = ("dopd_kv_transfer_bytes_total", (("direction", "sent"), ("transport", "grpc")))
RECEIVED = ("dopd_kv_transfer_bytes_total", (("direction", "received"), ("transport", "grpc")))


def scrape(address: str, timeout: float = 5.0) -> dict[tuple, float]:
    """Every sample of a Prometheus endpoint as {(name, sorted label pairs): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _diff(after: dict, before: dict, key: tuple) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


class CounterPoller(threading.Thread):
    """Samples one counter of a metrics endpoint every `interval` seconds: [(perf_counter, value)]."""

    def __init__(self, address: str, key: tuple, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.address, self.key, self.interval = address, key, interval
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                value = scrape(self.address, timeout=2.0).get(self.key, 0.0)
                self.samples.append((time.perf_counter(), value))
            except OSError:
                pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


async def _one(gateway: str, prompt: list[int]) -> float:
    async with grpc.aio.insecure_channel(gateway, options=CHANNEL_OPTIONS) as channel:
        t0 = time.perf_counter()
        await generate(channel, prompt, timeout=600.0, max_tokens=2, temperature=0.0, ignore_eos=True)
        return time.perf_counter() - t0


def measure_one(gateway: str, prefill_metrics: str, prompt: list[int]) -> dict:
    before = scrape(prefill_metrics)
    e2e = asyncio.run(_one(gateway, prompt))
    after = scrape(prefill_metrics)
    n_prefill, n_handoff = _diff(after, before, PREFILL_COUNT), _diff(after, before, HANDOFF_COUNT)
    if n_prefill != 1 or n_handoff != 1:
        raise RuntimeError(f"expected one prefill batch and one hand-off between scrapes, saw {n_prefill:g} and "
                           f"{n_handoff:g}: is something else using the cluster?")
    prefill_s, handoff_s = _diff(after, before, PREFILL_SUM), _diff(after, before, HANDOFF_SUM)
    kv_bytes = int(_diff(after, before, SENT))
    return {"prompt_tokens": len(prompt), "prefill_s": prefill_s, "handoff_s": handoff_s, "kv_bytes": kv_bytes,
            "e2e_s": e2e, "handoff_over_prefill": handoff_s / prefill_s,
            "stream_mb_s": kv_bytes / (prefill_s + handoff_s) / 1e6}


def measure_timeline(gateway: str, prefill_metrics: str, decode_metrics: str, prompt: list[int],
                     interval: float = 0.02) -> dict:
    """One request with the decode worker's received bytes polled: bytes outstanding at forward end."""
    poller = CounterPoller(decode_metrics, RECEIVED, interval)
    poller.start()
    time.sleep(3 * interval)
    try:
        m = measure_one(gateway, prefill_metrics, prompt)
    finally:
        time.sleep(3 * interval)
        poller.stop()
    samples = poller.samples
    if len(samples) < 3:
        return {**m, "timeline": None}
    base, final = samples[0][1], samples[0][1] + m["kv_bytes"]
    first = next((t for t, v in samples if v > base), None)
    last = next((t for t, v in samples if v >= final), None)
    gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:], strict=False)]
    poll = sorted(gaps)[len(gaps) // 2]
    if first is None or last is None or last - first < 4 * poll:
        # The whole transfer fell within a few polls: too short to say when its bytes arrived.
        return {**m, "timeline": None, "timeline_note": f"transfer shorter than 4 polls of {poll * 1e3:.0f} ms"}
    # The decode worker holds everything ~when the prefill worker's hand-off ends: the forward ended
    # handoff_s before that. Bytes already received then streamed during the forward. The last poll
    # before that instant gives a lower bound on them, so the tail below is an upper bound.
    forward_end = last - m["handoff_s"]
    at_end = max((v for t, v in samples if t <= forward_end), default=base) - base
    tail = m["kv_bytes"] - at_end
    return {**m, "timeline": {
        "poll_interval_s": poll, "first_bytes_to_all_s": last - first,
        "measured_stream_mb_s": m["kv_bytes"] / (last - first) / 1e6 if last > first else None,
        "bytes_received_by_forward_end": int(at_end), "tail_bytes": int(tail),
        "tail_mb_s": tail / m["handoff_s"] / 1e6 if m["handoff_s"] > 0 else None,
        "samples": len(samples)}}


def run_handoff(gateway: str, prefill_metrics: str, decode_metrics: str, prompts: list[list[int]],
                reference: ReferencePrefill | None = None, log=print) -> dict:
    runs = []
    for i, prompt in enumerate(prompts):
        m = measure_one(gateway, prefill_metrics, prompt)
        if reference is not None:
            m["reference_prefill_s"] = reference(prompt)
        runs.append(m)
        ref = f", in-process reference {m['reference_prefill_s']:.3f}s" if reference is not None else ""
        log(f"handoff: request {i + 1}/{len(prompts)}: {m['prompt_tokens']} tokens, prefill {m['prefill_s']:.3f}s, "
            f"hand-off {m['handoff_s'] * 1e3:.1f} ms, {m['kv_bytes'] / 1e6:.1f} MB{ref}")
    timeline = measure_timeline(gateway, prefill_metrics, decode_metrics, prompts[-1])
    tl = timeline.get("timeline")
    if not tl:
        log(f"handoff: polled request: no timeline ({timeline.get('timeline_note', 'too few samples')})")
    if tl:
        log(f"handoff: polled request: prefill {timeline['prefill_s']:.3f}s, first to last KV bytes received in "
            f"{tl['first_bytes_to_all_s']:.3f}s; {tl['bytes_received_by_forward_end'] / 1e6:.1f} of "
            f"{timeline['kv_bytes'] / 1e6:.1f} MB received by forward end, tail {tl['tail_bytes'] / 1e6:.1f} MB "
            f"in {timeline['handoff_s'] * 1e3:.1f} ms (poll every {tl['poll_interval_s'] * 1e3:.0f} ms)")
    n = len(runs)
    prefill = sum(r["prefill_s"] for r in runs) / n
    handoff = sum(r["handoff_s"] for r in runs) / n
    kv_bytes = sum(r["kv_bytes"] for r in runs) / n
    return {"runs": runs, "polled_run": timeline, "mean_prefill_s": prefill, "mean_handoff_s": handoff,
            "mean_kv_bytes": kv_bytes, "handoff_over_prefill": handoff / prefill,
            "stream_mb_s": kv_bytes / (prefill + handoff) / 1e6,
            "mean_reference_prefill_s": sum(r["reference_prefill_s"] for r in runs) / n if reference else None}



class ReferencePrefill:
    """ModelRunner.prefill in this process with no KV callback (nothing streams): what a prefill costs
    when no KV leaves the process. Run between cluster requests (the cluster idle), so that each
    cluster figure has a reference taken at the same moment on this noisy machine."""

    def __init__(self, model_name: str, warmup_tokens: int, threads: int) -> None:
        from common.kv.kv_store import PagedKVStore
        from common.modeling.loader import load_model
        from common.modeling.runner import ModelRunner, kv_layout

        loaded = load_model(model_name)
        self.threads = threads  # the prefill worker's, so that the two differ only in streaming
        self.runner = ModelRunner(loaded, PagedKVStore(kv_layout(loaded), 1, 16, loaded.device))
        self([100] * warmup_tokens)  # first calls at a new length pay one-time costs

    def __call__(self, prompt: list[int]) -> float:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t = time.perf_counter()
            self.runner.prefill([prompt], None)
            return time.perf_counter() - t
        finally:
            torch.set_num_threads(before)
