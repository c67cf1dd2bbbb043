"""Typed, validated settings for every service; environment variables carry the prefix DOPD_.

Each service reads its own settings class once at start. `dopd up` passes values to the child
processes through the same environment variables, so a process can always be started by hand
with nothing but its environment.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DOPD_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"  # the address servers bind
    # The host name other services use to reach this one (in containers: the service name).
    advertise_host: str = ""
    log_level: str = "INFO"
    # Seconds a SIGTERM waits for in-flight RPCs before the server stops.
    drain_grace_s: float = 10.0
    # Deadline of every internal RPC that has no caller deadline to inherit.
    rpc_timeout_s: float = 10.0
    # The internal plane's credential (common/rpc/auth.py): every Worker and Planner RPC must
    # carry it; "" leaves them open (logged). `dopd up` makes one per cluster.
    cluster_token: str = ""

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.host


class PlannerSettings(_Base):
    planner_port: int = 50052
    planner_metrics_port: int = 9102
    # A worker that missed heartbeats for this long is left out of the topology.
    worker_ttl_s: float = 5.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "dopd:"
    redis_timeout_s: float = 0.5
    # dynamic: forecast, split and switch roles; static: forecast and split, never switch;
    # off: only the registry of workers.
    planner_mode: str = Field("static", pattern="^(dynamic|static|off)$")
    predictor: str = "arima"
    # One planner interval in profile seconds; wall seconds are this times time_scale (sim engine).
    interval_s: float = 1.0
    time_scale: float = 1.0
    # The latency profile the split is computed from ("" = the sim engine's, or smollm2-cpu2).
    planner_profile: str = ""
    model: str = "smollm2"
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 200.0
    slo_itl_ms: float | None = None  # the stall SLO (each request's p99 gap); none by default
    # The configuration core may choose mixed workers (aggregation) besides prefill/decode splits
    # (`dopd up --mode dopd` sets it; dopd-split does not).
    mixed_workers: bool = False
    history_max_age_s: float = 6 * 3600.0
    # GetTopology answers UNAVAILABLE this long after a start, until the workers' heartbeats are
    # in: a restarted planner must not hand the gateway an empty topology.
    warmup_s: float = 1.5
    # The workers' engine settings (same variables as theirs), for the split.
    max_batch_size: int = 64
    prefill_token_budget: int = 512
    # Reconfiguration policy (services/planner/policy.py), in profile seconds. A switch in place takes
    # milliseconds to about a second, so a short cooldown and two moves an interval: in virtual time on
    # phase-shift (16 H100s, benchmarks/bench_policy.py) 99.7% attainment against 96.2% with 5 s and
    # one move.
    cooldown_s: float = 2.0
    persist_intervals: int = 2
    max_switches_per_interval: int = 2
    emergency_prefill_queue_tokens: int = 8192
    emergency_kv_usage: float = 0.95
    switch_timeout_s: float = 120.0


class WorkerSettings(_Base):
    worker_id: str = ""
    worker_port: int = 50060
    worker_metrics_port: int = 9110
    role: str = Field("decode", pattern="^(prefill|decode)$")
    # smollm2 | tiny-random | a local HF directory | sim:PROFILE (no weights; see common/profile.py)
    model: str = "smollm2"
    # sim only: run this many times slower than the profile says.
    time_scale: float = 1.0
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda
    torch_threads: int = 0  # 0 = torch's default
    planner_address: str = "127.0.0.1:50052"
    heartbeat_s: float = 1.0
    # Paged KV pool. Tokens per block; 0 = auto: 256 where decode runs flash-attn (its paged kernel
    # reads blocks in place, and takes multiples of 256 only), else 16 (common/kv/block_pool.py).
    block_size: int = Field(0, ge=0)
    kv_blocks: int = 2048
    # Decode: most requests in one running batch.
    max_batch_size: int = 64
    # Prefill: most prompt tokens in one forward pass (one prompt longer than this runs alone).
    # On a CPU, tokens/s is flat above ~256 tokens a pass (common/profiles/smollm2-cpu2.json), so
    # smaller batches cost nothing and hand KV to decode sooner, which measured better end to end
    # (benchmarks/bench_core.py). A GPU wants thousands: docker-compose.yml sets 8192.
    prefill_token_budget: int = 512
    # A decode worker that prefills its own prompts (`aggregated` mode, DOPD's ultra-short path):
    # tokens a step at most, decodes and prompt chunks together (vLLM's max_num_batched_tokens
    # for its API server on GPUs under 70 GiB).
    step_token_budget: int = 2048
    # Bounds on the queues a worker holds, so that its memory stays bounded whatever the load;
    # past one, a new request is refused at once with RESOURCE_EXHAUSTED (the gateway tries another
    # worker, and tells the client only when every worker refused). Prompts waiting for a prefill
    # forward on a prefill worker:
    prefill_queue_limit: int = Field(512, ge=1)
    # Requests reserved on a decode worker and not yet in its running batch (waiting for their KV,
    # including KV streams being received and prompts prefilled here, or for a seat in the batch).
    # Every one also holds its KV blocks, so kv_blocks bounds them too; this bound is for short ones.
    decode_waiting_limit: int = Field(1024, ge=1)
    # How long a decode worker holds a reservation whose KV has not arrived.
    kv_timeout_s: float = 30.0
    # KV is sent in chunks of at least/at most this many bytes (layers are coalesced up to
    # the minimum, and a layer larger than the maximum is split by tokens).
    kv_chunk_min_bytes: int = 256 * 1024
    kv_chunk_max_bytes: int = 1024 * 1024
    # How KV moves between workers (services/kvtransfer): nixl (the receiver reads it out of the
    # sender's pool with NIXL reads, services/kvtransfer/nixl_agent.py: prefill hand-offs, layer by
    # layer, and migrations; needs the `nixl` extra), shm (a migration's receiver copies it out
    # of the sender's pool mapped on the same host, common/kv/shared_memory.py; CPU pools only),
    # grpc (the bytes in PushKV chunks), auto (nixl, then shm, where both ends can). A sender
    # falls back to gRPC bytes where the receiver cannot read its pool; every worker takes them,
    # and reads peers only by what it names here.
    kv_transport: str = Field("auto", pattern="^(auto|grpc|shm|nixl)$")  # services/kvtransfer/transports


class GatewaySettings(_Base):
    gateway_port: int = 50051
    gateway_metrics_port: int = 9101
    # This gateway's name among the gateways of one cluster (`dopd up --gateways N` runs N on one
    # port); "" = gateway-<host>-<pid>.
    gateway_id: str = ""
    # The OpenAI-compatible HTTP API (services/gateway/openai_api.py); 0 = not served.
    http_port: int = 8000
    # API key the HTTP API asks for as `Authorization: Bearer KEY`; "" = none asked.
    api_key: str = ""
    # Requests that find every decode worker out of KV wait for room in a queue of this many
    # (first come first served, each until its deadline or its TTFT SLO under admission
    # control); past it, RESOURCE_EXHAUSTED at once. 0: refuse at once.
    decode_queue_limit: int = Field(1024, ge=0)
    model: str = "smollm2"
    planner_address: str = "127.0.0.1:50052"
    topology_refresh_s: float = 0.5
    # When no worker of a role takes a request (none serving, all refusing while roles change),
    # wait this long for the topology to change before answering UNAVAILABLE.
    no_worker_wait_s: float = 5.0
    # How often the gateway reports the load it saw to the planner (wall seconds; `dopd up` scales
    # it by the sim engine's time scale, so that an interval is one second of profile time).
    load_interval_s: float = 1.0
    default_max_tokens: int = 64
    # Longest a request may run end to end when the client set no deadline.
    request_timeout_s: float = 600.0
    # Serving mode (common/modes.py): static (first come first served), dopd and dopd-no-planner
    # (DOPD's scheduling policy, services/gateway/scheduling.py), dopd-no-policy, aggregated
    # (every worker prefills the requests it decodes). `dopd up --mode` sets it.
    mode: str = Field("static", pattern="^(aggregated|static|dopd|dopd-split|dopd-no-policy|dopd-no-planner)$")
    # Admission control: refuse at once a request whose predicted TTFT is past the SLO.
    # "" = the mode's default (on where the scheduling policy runs).
    admission: str = Field("", pattern="^(|on|off)$")
    # What the policy's thresholds are computed from: the SLOs, the workers' prefill budget (the
    # short-batch token cap), the latency profile ("" = as the planner picks it) and the sim
    # engine's time scale (the policy reasons in profile seconds).
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 200.0
    slo_itl_ms: float | None = None  # the stall SLO (each request's p99 gap): counted, and mixed workers' chunks
    prefill_token_budget: int = 512
    planner_profile: str = ""
    time_scale: float = 1.0
