"""The gateway's gRPC front end: a thin adapter over the gateway (services/gateway/front.py: the
tokenizer, the request core, the topology and the load reports, start and drain). It converts
Generate calls into the gateway's requests and its token events into GenerateResponse messages.
"""

from __future__ import annotations

import time

from common.config import GatewaySettings
from common.convert import FINISH_TO_PB
from common.errors import Unavailable
from common.pb import gateway_pb2, gateway_pb2_grpc
from common.rpc.errors import grpc_errors
from common.rpc.server import Service, run_server
from services.gateway.front import Gateway
from services.gateway.validation import validate_params


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings

    # -- Generate -----------------------------------------------------------------------------
    def _prompt_ids(self, request) -> list[int]:
        if request.WhichOneof("input") == "prompt_token_ids":
            return list(request.prompt_token_ids.ids)
        if request.chat and request.prompt:
            return self.gateway.chat_prompt_ids([{"role": "user", "content": request.prompt}])
        return self.gateway.text_prompt_ids(request.prompt)

    @grpc_errors
    async def Generate(self, request, context):
        arrived = time.perf_counter()
        if self.gateway.core is None:
            raise Unavailable("gateway is still starting")
        params = validate_params(request, self.settings.default_max_tokens)
        req = self.gateway.new_request(self._prompt_ids(request), params, request.request_id,
                                       context.time_remaining() or self.settings.request_timeout_s, arrived)
        async for event in self.gateway.generate(req):
            if event.finish_reason is None:
                yield gateway_pb2.GenerateResponse(request_id=event.request_id, token_ids=event.token_ids,
                                                   text=event.text)
            else:
                yield gateway_pb2.GenerateResponse(
                    request_id=event.request_id, text=event.text, finish_reason=FINISH_TO_PB[event.finish_reason],
                    usage=gateway_pb2.Usage(prompt_tokens=event.prompt_tokens,
                                            completion_tokens=event.completion_tokens))

    @grpc_errors
    async def GetStatus(self, request, context):
        return gateway_pb2.GetStatusResponse(
            gateway_address=f"{self.settings.public_host}:{self.settings.gateway_port}",
            gateway_metrics_address=f"{self.settings.public_host}:{self.settings.gateway_metrics_port}",
            planner_address=self.settings.planner_address, model=self.settings.model,
            topology=self.gateway.topology, running_requests=self.gateway.core.running if self.gateway.core else 0,
            serving_mode=self.settings.mode)


async def main() -> None:
    settings = GatewaySettings()
    gateway = Gateway(settings)
    try:
        await run_server(host=settings.host, port=settings.gateway_port,
                         metrics_port=settings.gateway_metrics_port,
                         services=[Service("dopd.v1.Gateway", GatewayServicer(gateway),
                                           gateway_pb2_grpc.add_GatewayServicer_to_server)],
                         start=gateway.start, drain=gateway.drain, grace=settings.drain_grace_s,
                         cluster_token=settings.cluster_token, internal=False, api_key=settings.api_key)
    finally:
        await gateway.channels.close()
