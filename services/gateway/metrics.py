"""Prometheus metrics of the gateway."""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
REQUESTS = Counter("dopd_requests_total", "Generate requests by how they ended", ["status"])
TTFT = Histogram("dopd_time_to_first_token_seconds", "Request arrival to first token", buckets=_LATENCY)
TPOT = Histogram("dopd_time_per_output_token_seconds", "(E2E - TTFT) / (output tokens - 1)",
                 buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2))
E2E = Histogram("dopd_e2e_request_latency_seconds", "Request arrival to last token", buckets=_LATENCY)
RUNNING = Gauge("dopd_gateway_running_requests", "Generate requests in flight")
PROMPT_TOKENS = Counter("dopd_prompt_tokens_total", "Prompt tokens of admitted requests")
GENERATION_TOKENS = Counter("dopd_generation_tokens_total", "Tokens streamed back to clients")
PATHS = Counter("dopd_gateway_paths_total", "Requests by the path they took (long, short, ultra-short: prefilled on "
                                            "the decode worker; every request in aggregated mode)", ["path"])
ADMISSION_REFUSED = Counter("dopd_admission_refused_total",
                            "Requests refused at once because their predicted TTFT was past the SLO, or because "
                            "no decode seat within the TPOT SLO was predicted to free for them in time")
SHORT_HELD = Gauge("dopd_gateway_short_prompts_held",
                   "Short prompts held for a batch while every prefill worker is busy")
HTTP_REQUESTS = Counter("dopd_http_requests_total", "OpenAI API requests by endpoint and HTTP status",
                        ["endpoint", "code"])
REPLAYS = Counter("dopd_gateway_replays_total", "Requests replayed elsewhere (prompt + tokens so far prefilled again) "
                  "after the worker serving them died or broke its stream, by the stage that failed", ["stage"])
DECODE_QUEUE = Gauge("dopd_gateway_decode_queue", "Requests waiting for decode KV (every decode worker full), "
                     "first come first served")
SEAT_WAITS = Counter("dopd_gateway_seat_waits_total", "Requests that found every decode worker's batch at its seats "
                     "within the TPOT SLO (admission control) and queued for one (those that come while others "
                     "wait join the queue behind them, uncounted here)")
# SLO attainment and goodput (requests a second that met both SLOs), judged as `dopd bench` judges a
# request (services/bench/metrics.py): every request that ended counts once; failed and refused
# ones miss; cancelled ones (the client went away) are not counted.
SLO_REQUESTS = Counter("dopd_slo_requests_total", "Requests that ended, by whether they met every SLO: TTFT, TPOT "
                       "and, when given, the stall SLO on their p99 gap (failed and refused ones miss; cancelled "
                       "ones are not counted)", ["result"])
SLO_SECONDS = Gauge("dopd_gateway_slo_seconds", "The SLOs requests are judged by, in wall seconds (the sim "
                    "engine's time scale applied)", ["slo"])
# Every label value exists from the start, at 0: a series that first appears at 1 hides its first
# event from rate() and increase().
for _result in ("met", "missed"):
    SLO_REQUESTS.labels(_result)
for _status in ("ok", "error", "cancelled"):
    REQUESTS.labels(_status)
