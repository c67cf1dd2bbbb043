"""Client helpers over the gRPC stubs: what `dopd generate`, `dopd status`, the tests and the
benchmarks use to talk to a cluster."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.convert import FINISH_FROM_PB, ROLE_FROM_PB, ROLE_TO_PB
from common.pb import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from common.rpc.auth import api_key_metadata
from common.rpc.channels import internal_channel
from common.types import Role


@dataclass
class Completion:
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def generate_request(prompt: str | list[int], **kw) -> gateway_pb2.GenerateRequest:
    """kw: max_tokens, temperature, top_p, top_k, seed, stop, chat, ignore_eos, request_id."""
    if isinstance(prompt, str):
        return gateway_pb2.GenerateRequest(prompt=prompt, **kw)
    return gateway_pb2.GenerateRequest(prompt_token_ids=gateway_pb2.TokenIds(ids=prompt), **kw)


async def generate(channel: grpc.aio.Channel, prompt: str | list[int], timeout: float = 300.0,
                   on_text=None, api_key: str = "", **kw) -> Completion:
    """Run one Generate call to its end; `on_text(str)` sees the text as it streams; `api_key`:
    the gateway's, when it has one (sent as `authorization: Bearer KEY`)."""
    stub = gateway_pb2_grpc.GatewayStub(channel)
    out = Completion()
    async for msg in stub.Generate(generate_request(prompt, **kw), timeout=timeout,
                                   metadata=api_key_metadata(api_key)):
        out.request_id = msg.request_id
        out.token_ids.extend(msg.token_ids)
        out.text += msg.text
        if on_text and msg.text:
            on_text(msg.text)
        if msg.finish_reason:
            out.finish_reason = FINISH_FROM_PB[msg.finish_reason]
            out.prompt_tokens = msg.usage.prompt_tokens
            out.completion_tokens = msg.usage.completion_tokens
    return out


async def health(address: str, timeout: float = 2.0, internal: bool = False) -> str:
    """grpc.health.v1 of the service at `address`; `internal`: a worker or the planner, reached as
    the internal plane is (over mutual TLS when it is on)."""
    try:
        async with (internal_channel(address) if internal else grpc.aio.insecure_channel(address)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def worker_stats(address: str, timeout: float = 2.0):
    async with internal_channel(address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=timeout)


async def cluster_status(target: str, timeout: float = 5.0) -> dict:
    """Every service with its role, addresses, health, running requests and KV blocks."""
    async with grpc.aio.insecure_channel(target) as channel:
        status = await gateway_pb2_grpc.GatewayStub(channel).GetStatus(gateway_pb2.GetStatusRequest(), timeout=timeout)
    # One gateway, or several on one port (each named by the planner's topology; the one that
    # answered gives its running requests).
    gateways = list(status.topology.gateways) or [common_pb2.GatewayInfo(
        gateway_id="gateway", address=status.gateway_address, metrics_address=status.gateway_metrics_address)]
    gateway_health = await health(status.gateway_address)
    services = [
        {"name": g.gateway_id, "role": "gateway", "address": g.address, "metrics": g.metrics_address,
         "health": gateway_health,
         "running": status.running_requests if g.metrics_address == status.gateway_metrics_address else None,
         "kv_used": None, "kv_total": None} for g in gateways] + [
        {"name": "planner", "role": "planner", "address": status.planner_address,
         "metrics": status.topology.planner_metrics_address or None,
         "health": await health(status.planner_address, internal=True), "running": None, "kv_used": None,
         "kv_total": None},
    ]
    for w in status.topology.workers:
        entry = {"name": w.worker_id, "role": ROLE_FROM_PB.get(w.role, "?"), "address": w.address,
                 "metrics": w.metrics_address, "health": await health(w.address, internal=True)}
        try:
            live = await worker_stats(w.address)
            entry.update(running=live.running_requests, waiting=live.waiting_requests,
                         kv_used=live.kv_blocks_used, kv_total=live.kv_blocks_total)
        except grpc.aio.AioRpcError:
            entry.update(running=None, kv_used=None, kv_total=None)
        services.append(entry)
    plan = await planner_plan(status.planner_address, timeout)
    if plan is not None:
        roles = [ROLE_FROM_PB.get(w.role) for w in status.topology.workers]
        plan["split_now"] = f"{roles.count(Role.PREFILL)}P:{roles.count(Role.DECODE)}D" + (
            f":{roles.count(Role.MIXED)}M" if Role.MIXED in roles else "")
        if plan.get("configuration"):
            plan["configuration"] = json.loads(plan["configuration"])
    return {"model": status.model, "serving_mode": status.serving_mode, "topology_version": status.topology.version,
            "services": services, "plan": plan}


def _pb_dict(message) -> dict:
    doc = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    # int64 comes out of JSON as a string
    for key in ("migrated_bytes", "migrated_bytes_shared", "migrated_bytes_nixl", "intervals_recorded"):
        if key in doc:
            doc[key] = int(doc[key])
    return doc


def _role_names(doc: dict) -> dict:
    """Enum names as JSON gives them (ROLE_PREFILL) to the roles' own names (prefill)."""
    for key in ("from_role", "to_role"):
        if key in doc:
            doc[key] = doc[key].removeprefix("ROLE_").lower()
    return doc


async def planner_plan(address: str, timeout: float = 5.0) -> dict | None:
    """The planner's GetPlan as a dict (roles as names), or None when it does not answer."""
    try:
        async with internal_channel(address) as channel:
            plan = await planner_pb2_grpc.PlannerStub(channel).GetPlan(planner_pb2.GetPlanRequest(), timeout=timeout)
    except grpc.aio.AioRpcError:
        return None
    doc = _pb_dict(plan)
    doc["recent_switches"] = [_role_names(_pb_dict(sw)) for sw in plan.recent_switches]
    return doc


async def set_worker_role(target: str, worker: str, role: str, timeout: float = 120.0, chunk_budget: int = 0) -> dict:
    """Switch `worker` (its id in the topology, e.g. decode-0) to `role` through SetRole (a mixed
    worker's `chunk_budget`, 0: its own setting); wait until it is done and return its timings.
    Raises LookupError when the gateway's topology lacks it."""
    async with grpc.aio.insecure_channel(target) as channel:
        status = await gateway_pb2_grpc.GatewayStub(channel).GetStatus(gateway_pb2.GetStatusRequest(), timeout=10)
    match = [w for w in status.topology.workers if w.worker_id == worker]
    if not match:
        known = ", ".join(sorted(w.worker_id for w in status.topology.workers)) or "none"
        raise LookupError(f"no worker {worker!r} in the topology (workers: {known})")
    async with internal_channel(match[0].address) as channel:
        reply = await worker_pb2_grpc.WorkerStub(channel).SetRole(
            worker_pb2.SetRoleRequest(role=ROLE_TO_PB[Role(role)], chunk_budget=chunk_budget), timeout=timeout)
    return _role_names(_pb_dict(reply))


async def cluster_ready(target: str, addresses: list[str], n_workers: int, n_gateways: int = 1) -> bool:
    """True when every address is SERVING and the gateway's topology lists n_workers workers and,
    with several gateways on `target`, as many gateways (every address but the gateway's
    `target` is of the internal plane)."""
    for address in [target, *addresses]:
        if await health(address, timeout=1.0, internal=address != target) != "SERVING":
            return False
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            status = await gateway_pb2_grpc.GatewayStub(channel).GetStatus(gateway_pb2.GetStatusRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return (len([w for w in status.topology.workers if w.serving]) == n_workers
            and (n_gateways <= 1 or len(status.topology.gateways) >= n_gateways))
