"""Prometheus metrics of the planner."""

from prometheus_client import Counter, Gauge, Histogram

LIVE_WORKERS = Gauge("dopd_planner_live_workers", "Workers in the topology", ["role"])
ROLE_SWITCHES = Counter("dopd_planner_role_switches_total", "Role switches the planner made",
                        ["from_role", "to_role"])
PREDICTED_RATE = Gauge("dopd_planner_predicted_request_rate", "Predicted arrival rate (requests/s, profile time)")
OBSERVED_RATE = Gauge("dopd_planner_observed_request_rate", "Arrival rate of the last interval (requests/s)")
TARGET_WORKERS = Gauge("dopd_planner_target_workers", "Workers the split wants per role", ["role"])
DECISION_SECONDS = Histogram("dopd_planner_decision_seconds", "One decision: prediction (model fit) and split",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
HISTORY_INTERVALS = Gauge("dopd_planner_history_intervals", "Intervals of load history held")

# Every label set these take exists from the start, at 0: a series that first appears at 1 would
# hide its first switch from rate() and increase().
for _from, _to in (("prefill", "decode"), ("decode", "prefill")):
    ROLE_SWITCHES.labels(_from, _to)
