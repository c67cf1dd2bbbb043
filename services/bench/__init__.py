"""The benchmark harness: seeded workloads and traces, an open-loop load generator against the
gateway, vLLM-style latency metrics with SLO attainment and goodput, plots, and a DistServe
goodput sweep. Pure cores (`workloads`, `arrivals`, `trace`, `metrics`, the search in `sweep`)
do no I/O; `runner` is the thin async adapter, `sources` where requests come from (also for
`dopd simulate`), `api` one run as a call (a BenchSpec in, results out) and `cli` the command line."""
