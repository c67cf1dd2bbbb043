"""Prometheus metrics of a worker process."""

from prometheus_client import Counter, Gauge, Histogram

KV_BLOCKS_USED = Gauge("dopd_kv_blocks_used", "KV blocks lent to requests")
KV_BLOCKS_CAPACITY = Gauge("dopd_kv_blocks_capacity", "KV blocks in this worker's pool")
# Always 1: the worker's id as a label, to name series by worker in queries (every other worker
# metric is keyed by the scrape target only): `... * on (instance) group_left (worker_id) dopd_worker_info`.
WORKER_INFO = Gauge("dopd_worker_info", "Always 1; labels: this worker's id and model", ["worker_id", "model"])
# transport: grpc (bytes in PushKV chunks), shm (copied by the receiver out of the sender's pool,
# mapped) or nixl (read by the receiver out of the sender's pool with NIXL)
KV_TRANSFER_BYTES = Counter("dopd_kv_transfer_bytes_total", "KV bytes moved between workers",
                            ["direction", "transport"])
WORKER_ROLE = Gauge("dopd_worker_role", "1 for the role this worker serves, 0 for the others", ["role"])
RUNNING_REQUESTS = Gauge("dopd_worker_running_requests", "Requests in the running decode batch")
HELD_REQUESTS_MAX = Gauge("dopd_worker_held_requests_max",
                          "The most requests this worker has held at once (running, or reserved and waiting for "
                          "KV or a seat) since it started: what the gateways' seat limits bound")
WAITING_REQUESTS = Gauge("dopd_worker_waiting_requests", "Requests queued for prefill or waiting for KV")
PREFILL_SECONDS = Histogram("dopd_prefill_seconds", "Forward time of one prefill batch",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))
KV_HANDOFF_SECONDS = Histogram("dopd_kv_handoff_seconds", "Prefill done to decode worker holding all KV",
                               buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2))
DECODE_STEP_SECONDS = Histogram("dopd_decode_step_seconds", "Time of one decode step (whole batch)",
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2))
DECODE_BATCH_SIZE = Histogram("dopd_decode_batch_size", "Requests in one decode step",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ROLE_SWITCH_SECONDS = Histogram("dopd_role_switch_seconds", "Time of one in-place role switch on this worker",
                                ["from_role", "to_role"],
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
KV_MIGRATION_SECONDS = Histogram("dopd_kv_migration_seconds", "Time to move one running request to another worker",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
KV_MIGRATED_BYTES = Counter("dopd_kv_migrated_bytes_total", "KV bytes moved out by live migration")
LOCAL_PREFILL_TOKENS = Counter("dopd_local_prefill_tokens_total",
                               "Prompt tokens prefilled on the decode worker itself, in chunks (no KV moved)")

# Every label set these take exists from the start, at 0: a series that first appears at 1 would
# hide its first event from rate() and increase().
for _direction, _transport in (("sent", "grpc"), ("received", "grpc"), ("received", "shm"), ("sent", "nixl"),
                              ("received", "nixl")):
    KV_TRANSFER_BYTES.labels(_direction, _transport)
for _from, _to in (("prefill", "decode"), ("decode", "prefill")):
    ROLE_SWITCH_SECONDS.labels(_from, _to)
