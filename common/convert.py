"""Protobuf <-> in-process dataclasses, in one place."""

from __future__ import annotations

from common.load import LengthDist, LoadForecast
from common.pb import common_pb2
from common.types import Role, SamplingParams

ROLE_TO_PB = {Role.PREFILL: common_pb2.ROLE_PREFILL, Role.DECODE: common_pb2.ROLE_DECODE,
              Role.MIXED: common_pb2.ROLE_MIXED}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}
FINISH_TO_PB = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
                "abort": common_pb2.FINISH_REASON_ABORT}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
                                     max_tokens=p.max_tokens, stop_token_ids=sorted(p.stop_token_ids),
                                     index_offset=p.index_offset)


def sampling_from_pb(m: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=m.temperature, top_p=m.top_p or 1.0, top_k=m.top_k, seed=m.seed,
                          max_tokens=m.max_tokens, stop_token_ids=frozenset(m.stop_token_ids),
                          index_offset=m.index_offset)


def forecast_to_pb(f):
    """common/load.LoadForecast -> planner_pb2.Forecast."""
    from common.pb import planner_pb2

    return planner_pb2.Forecast(rate=f.rate, prompt_quantiles=list(f.prompt.quantiles), prompt_mean=f.prompt.mean,
                                output_quantiles=list(f.output.quantiles), output_mean=f.output.mean,
                                predictor=f.predictor)


def forecast_from_pb(m):
    """planner_pb2.Forecast -> LoadForecast; None when the message carries none (or a malformed one)."""
    try:
        return LoadForecast(m.rate, LengthDist(tuple(m.prompt_quantiles), m.prompt_mean),
                            LengthDist(tuple(m.output_quantiles), m.output_mean), m.predictor)
    except ValueError:
        return None
