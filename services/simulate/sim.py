"""One simulation run: requests in, per-request results, the status timeline and the switches out.

    outcome = simulate(requests, SimConfig(profile, workers=16, mode="dopd", ...))

Deterministic: the same requests and config give the same outcome (only `wall_s`, `cpu_s` and
the planner's `decision_seconds` are measured on the host).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from common.config import GatewaySettings, PlannerSettings, WorkerSettings
from common.kv.block_pool import DEFAULT_BLOCK_SIZE
from common.load import SLO
from common.modes import MODES as SERVING_MODES
from common.modes import serving_mode
from common.profile import LatencyProfile
from services.bench.metrics import RequestResult
from services.bench.outcome import StatusSample
from services.bench.workloads import BenchRequest
from services.planner.core import PlannerCore, PoolShape
from services.planner.policy import PolicyConfig, ReconfigPolicy
from services.planner.predictors import make_predictor
from services.simulate.cluster import Cluster
from services.simulate.events import EventLoop
from services.simulate.planner import PlannerDriver

MODES = tuple(SERVING_MODES)
# vLLM's chunked-prefill step budget (max_num_batched_tokens) for its OpenAI server on GPUs
# below 70 GiB; 8192 on larger ones. `aggregated` mode's step budget unless told otherwise.
DEFAULT_CHUNK_TOKENS = 2048


def setting(cls, name: str):
    """A setting's declared default (not the environment's: a run must not depend on DOPD_*)."""
    return cls.model_fields[name].default


def default_policy() -> PolicyConfig:
    """The policy `dopd up` runs (PlannerSettings' defaults, as services/planner/server.build_core)."""
    return PolicyConfig.from_settings(PlannerSettings.model_construct())  # declared defaults, no environment


def default_split(workers: int) -> tuple[int, int]:
    prefill = max(1, workers // 2)
    return prefill, workers - prefill


@dataclass(frozen=True)
class SimConfig:
    profile: LatencyProfile
    workers: int
    mode: str = "static"
    split: tuple[int, int] | None = None  # prefill, decode at the start; default half and half
    link_gbps: float = 400.0
    kv_blocks: int = setting(WorkerSettings, "kv_blocks")
    # A worker's 0 means auto (by device and kernel); the simulator keeps the default 16.
    block_size: int = setting(WorkerSettings, "block_size") or DEFAULT_BLOCK_SIZE
    max_batch_size: int = setting(WorkerSettings, "max_batch_size")
    prefill_token_budget: int = setting(WorkerSettings, "prefill_token_budget")
    request_timeout_s: float = 60.0  # as `dopd bench --request-timeout`
    interval_s: float = setting(PlannerSettings, "interval_s")
    sample_interval_s: float = 0.5  # as the bench runner's status samples
    slo_ttft_s: float = setting(PlannerSettings, "slo_ttft_ms") / 1e3
    slo_tpot_s: float = setting(PlannerSettings, "slo_tpot_ms") / 1e3
    slo_itl_s: float | None = None  # the stall SLO (each request's p99 gap), when one is given
    predictor: str = setting(PlannerSettings, "predictor")
    policy: PolicyConfig = field(default_factory=default_policy)
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # tokens a step (decodes + prompt chunks) on a worker that prefills
    admission: bool | None = None  # admission control; None: the mode's default
    # Requests that may wait for decode room, as the gateway's DecodeQueue (0: refused at once).
    decode_queue_limit: int = setting(GatewaySettings, "decode_queue_limit")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.workers < 2:
            raise ValueError(f"need at least 2 workers (one of each role), got {self.workers}")
        p, d = self.initial_split
        if serving_mode(self.mode).disaggregated and (p < 1 or d < 1 or p + d != self.workers):
            raise ValueError(f"split {p}:{d} must give each role >= 1 worker and add up to {self.workers}")
        if not (self.interval_s > 0 and self.sample_interval_s > 0 and self.request_timeout_s > 0):
            raise ValueError("interval, sample interval and request timeout must be > 0")

    @property
    def initial_split(self) -> tuple[int, int]:
        if not serving_mode(self.mode).disaggregated:
            return 0, self.workers
        return self.split or default_split(self.workers)


@dataclass
class SimOutcome:
    results: list[RequestResult]
    samples: list[StatusSample]
    switches: list[dict]
    decisions: list[tuple[float, int, int, float]]
    duration: float  # virtual seconds from 0 to the last arrival or response
    events: int
    decode_steps: int
    prefill_batches: int
    leaks: list[str]
    wall_s: float
    cpu_s: float
    decision_seconds: float = 0.0
    refused: int = 0  # by admission control (also counted in `results` as RESOURCE_EXHAUSTED)
    # The configuration core's choices where they changed (each with its time, predicted rates and why).
    configurations: list[dict] = field(default_factory=list)


def simulate(requests: list[BenchRequest], cfg: SimConfig) -> SimOutcome:
    arrivals = []
    for r in sorted(requests, key=lambda r: r.t):
        if r.prompt_tokens is None:
            raise ValueError("the simulator has no tokenizer: give prompts as prompt_tokens, not text")
        arrivals.append((r.t, r.prompt_tokens, r.output_tokens))
    loop = EventLoop()
    mode = serving_mode(cfg.mode)
    if cfg.admission is not None:
        mode = replace(mode, admission=cfg.admission)
    p, d = cfg.initial_split
    cluster = Cluster(loop, cfg.profile, p, d, kv_blocks=cfg.kv_blocks, block_size=cfg.block_size,
                      max_batch_size=cfg.max_batch_size, prefill_token_budget=cfg.prefill_token_budget,
                      link_gbps=cfg.link_gbps, request_timeout_s=cfg.request_timeout_s, mode=mode,
                      chunk_tokens=cfg.chunk_tokens, decode_queue_limit=cfg.decode_queue_limit)
    cluster.submit(arrivals)
    planner = None
    if mode.forecasting:
        core = PlannerCore(
            predictor=make_predictor(cfg.predictor), profile=cfg.profile,
            slo=SLO(cfg.slo_ttft_s, cfg.slo_tpot_s, cfg.slo_itl_s),
            shape=PoolShape(cfg.kv_blocks, cfg.block_size, cfg.max_batch_size, cfg.prefill_token_budget),
            interval_s=cfg.interval_s, switching=mode.switching, policy=ReconfigPolicy(cfg.policy),
            mixed=mode.mixed)
        planner = PlannerDriver(cluster, core)
        planner.start()
    samples: list[StatusSample] = []

    def sample() -> None:
        samples.append(cluster.sample())
        if cluster.active():
            loop.after(cfg.sample_interval_s, sample)

    loop.at(0.0, sample)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    loop.run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    results = cluster.results()
    duration = max([r.t for r in cluster.requests] + [r.done_at or 0.0 for r in cluster.requests] + [1e-6])
    if samples[-1].t < duration:  # the cluster at the last response (timeouts of ended requests run later)
        last = cluster.sample()
        last.t = duration
        samples.append(last)
    switches = sorted(cluster.switches.done, key=lambda sw: sw.started)
    return SimOutcome(
        results=results, samples=samples, switches=[sw.record() for sw in switches],
        decisions=planner.decisions if planner else [], duration=duration, events=loop.processed,
        decode_steps=cluster.decode_steps, prefill_batches=cluster.prefill_batches, leaks=cluster.leaks(),
        wall_s=wall, cpu_s=cpu, decision_seconds=planner.decision_seconds if planner else 0.0,
        refused=cluster.refused, configurations=planner.choices if planner else [])
