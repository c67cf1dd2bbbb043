"""The serving modes a cluster runs in, as plain data: what `dopd up --mode`, `dopd simulate
--mode` and `dopd bench compare --modes` name. Pure.

    aggregated       every worker prefills and decodes in one continuous batch with chunked
                     prefill (vLLM's default design); no KV moves between workers
    static           a fixed prefill/decode split, first come first served (DistServe's design)
    dopd             the dynamic planner (roles switch in place, among prefill, decode and mixed
                     workers: services/planner/configuration.py chooses a split or aggregation)
                     plus the scheduling policy (services/gateway/scheduling.py), admission on
    dopd-split       ablation: dopd choosing among prefill/decode splits only (no mixed workers),
                     the planner before its configuration core
    dopd-no-policy   ablation: the planner (splits only: sending prompts to mixed workers needs
                     the policy's profile), with static's first come first served dispatch
    dopd-no-planner  ablation: the scheduling policy on a fixed split (the planner still
                     forecasts, for the policy's thresholds, but switches nothing)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServingMode:
    name: str
    disaggregated: bool  # separate prefill and decode workers (else every worker does both)
    switching: bool  # the planner changes roles
    policy: bool  # DOPD's scheduling policy (else first come first served)
    admission: bool  # refuse a request whose predicted TTFT is past the SLO, by default
    mixed: bool = False  # the planner may choose mixed workers (aggregation) besides splits

    @property
    def forecasting(self) -> bool:
        """Needs the planner's forecast (to switch, or for the policy's thresholds)."""
        return self.switching or self.policy


MODES: dict[str, ServingMode] = {m.name: m for m in (
    ServingMode("aggregated", disaggregated=False, switching=False, policy=False, admission=False),
    ServingMode("static", disaggregated=True, switching=False, policy=False, admission=False),
    ServingMode("dopd", disaggregated=True, switching=True, policy=True, admission=True, mixed=True),
    ServingMode("dopd-split", disaggregated=True, switching=True, policy=True, admission=True),
    ServingMode("dopd-no-policy", disaggregated=True, switching=True, policy=False, admission=False),
    ServingMode("dopd-no-planner", disaggregated=True, switching=False, policy=True, admission=True),
)}


def serving_mode(name: str) -> ServingMode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; one of {', '.join(MODES)}") from None
