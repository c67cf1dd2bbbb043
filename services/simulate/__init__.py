"""`dopd simulate`: a discrete-event simulation of a whole cluster in virtual time.

It drives the project's own pure cores, unchanged (gateway routing, the prefill and decode
schedulers, block pools, the gateway's load recorder, the planner's decision core, predictors and
policy, the role-switch state machine), with time taken from a latency profile and KV transfers
from their bytes over a link. No gRPC, no asyncio, no sleeping: one heap of events.

    events.py    the clock and the event heap
    hardware.py  link bandwidth defaults per profile, transfer-time models, the step-time memo
    workers.py   one simulated worker: its role state, both schedulers, its pool and its link
    cluster.py   the request path (gateway, prefill, hand-off, decode) and the leak check
    switching.py role switches: prefill -> decode drains, decode -> prefill live-migrates
    planner.py   the planner every interval, as services/planner/controller.py runs it
    sim.py       one run: SimConfig + requests -> SimOutcome (results, timeline, switches, leaks)
    api.py       `dopd simulate` as a call: SimulateSpec in, SimulateResult (results.json's dict) out
    cli.py       `dopd simulate`: its arguments to a SimulateSpec, results.json and plots out
"""
