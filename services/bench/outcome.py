"""What a run produced, as plain data (pure): the per-request results, the cluster's status over
time, and the harness's own figures. `runner` fills it; `report` and `plots` read it."""

from __future__ import annotations

from dataclasses import dataclass

from services.bench.metrics import RequestResult


@dataclass
class StatusSample:
    """The cluster at time t (profile seconds): serving workers per role, their queues
    (as their last heartbeat to the planner reported them), the gateway's in-flight requests."""

    t: float
    prefill_workers: int = 0
    decode_workers: int = 0  # mixed workers included (they decode)
    mixed_workers: int = 0
    prefill_waiting: int = 0
    prefill_running: int = 0
    decode_waiting: int = 0
    decode_running: int = 0
    gateway_running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    error: str | None = None


@dataclass
class RunOutcome:
    results: list[RequestResult]
    samples: list[StatusSample]
    duration: float  # profile seconds from the start to the last response (or the last send)
    wall_s: float
    cpu_s: float  # time.process_time() of this process over the run
    lateness: list[float]  # per sent request: profile seconds it went out after its scheduled time
    sent: int
    messages: int = 0  # GenerateResponse messages received
    tokens: int = 0  # output tokens received
    length_mismatch: int = 0  # completed requests with another output length than asked for
