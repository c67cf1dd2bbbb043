"""Helpers for integration tests: cluster start-up, leak checks, and greedy-identity checks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from common.convert import ROLE_FROM_PB
from common.pb import gateway_pb2, gateway_pb2_grpc
from services.client import worker_stats
from services.launcher import Cluster, ClusterSpec, free_port


@dataclass
class ClusterHandle:
    cluster: Cluster
    gateway: str
    workers: dict[str, str]  # role-name -> address, e.g. {"prefill-0": ..., "decode-0": ...}

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.gateway)


def start_cluster(model: str, log_dir: Path, redis_url: str, redis_prefix: str, prefill: int = 1,
                  decode: int = 1, kv_blocks: int = 512, env: dict | None = None,
                  worker_env: dict | None = None, **spec) -> ClusterHandle:
    """A cluster on real processes; `spec` sets other ClusterSpec fields (mode, planner, SLOs)."""
    spec = dict({"http_port": free_port()}, **spec)
    spec = ClusterSpec(model=model, prefill=prefill, decode=decode, port=free_port(), log_dir=log_dir,
                       redis_url=redis_url, redis_prefix=redis_prefix, kv_blocks=kv_blocks,
                       extra_env=env or {}, worker_env=worker_env or {}, **spec)
    cluster = Cluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(600)
    except BaseException:
        cluster.stop()
        raise
    workers = {p.name: p.address for p in cluster.procs if p.role in ("prefill", "decode")}
    return ClusterHandle(cluster, cluster.gateway_address, workers)


async def assert_no_leaks(handle: ClusterHandle, timeout: float = 10.0) -> None:
    """Every KV block free and no request left on every worker (release is asynchronous: poll)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = {name: await worker_stats(addr) for name, addr in handle.workers.items()}
        busy = {n: (s.kv_blocks_used, s.running_requests, s.waiting_requests) for n, s in stats.items()
                if s.kv_blocks_used or s.running_requests or s.waiting_requests}
        if not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leak: (kv blocks used, running, waiting) per worker: {busy}")
        await asyncio.sleep(0.1)


async def gateway_topology(handle: ClusterHandle) -> dict[str, str]:
    async with handle.channel() as ch:
        status = await gateway_pb2_grpc.GatewayStub(ch).GetStatus(gateway_pb2.GetStatusRequest(), timeout=5)
    return {w.worker_id: ROLE_FROM_PB[w.role] for w in status.topology.workers}


@dataclass
class IdentityReport:
    requests: int = 0
    tokens_compared: int = 0
    exact: int = 0
    near_ties: list[tuple[int, int, float]] = field(default_factory=list)  # (request, step, logit gap)


NEAR_TIE = 1e-4


def check_greedy_identity(model, prompts: list[list[int]], ours: list[list[int]], max_tokens: list[int],
                          eos_ids: set[int], near_tie: float = NEAR_TIE) -> IdentityReport:
    """Compare each served completion with model.generate(do_sample=False) on the same prompt.

    A mismatch is accepted only where the reference's logits of the two competing tokens were
    within `near_tie` of each other at that step; after it the sequences legitimately diverge, so
    the comparison of that request stops there.
    """
    report = IdentityReport(requests=len(prompts))
    device = next(model.parameters()).device
    for i, (prompt, got, n) in enumerate(zip(prompts, ours, max_tokens, strict=True)):
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 eos_token_id=sorted(eos_ids), pad_token_id=0)[0, len(prompt):].tolist()
        if got == ref:
            report.exact += 1
            report.tokens_compared += len(ref)
            continue
        step = next((j for j, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), min(len(got), len(ref)))
        report.tokens_compared += step
        assert step < min(len(got), len(ref)), (
            f"request {i}: one completion is a prefix of the other: ours {len(got)} tokens, reference {len(ref)}")
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + ref[:step]], device=device)).logits[0, -1]
        gap = abs(float(logits[got[step]] - logits[ref[step]]))
        assert gap <= near_tie, (
            f"request {i} (prompt {len(prompt)} tokens) differs at step {step}: ours {got[step]}, "
            f"reference {ref[step]}, logit gap {gap:.2e} > {near_tie}")
        report.near_ties.append((i, step, gap))
    return report


def flat_sim_profile(name: str, prefill_s: float, decode_s: float, layers: int = 4, kv_heads: int = 2,
                     head_dim: int = 32, dtype: str = "bfloat16") -> dict:
    """A sim-engine latency profile (common/profile.py) whose every prefill batch takes
    `prefill_s` and every decode step `decode_s`, for a model of this KV shape."""
    return {
        "name": name,
        "model": {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype,
                  "vocab_size": 32000, "max_context": 4096},
        "prefill": {"tokens": [1, 4096], "seconds": [prefill_s, prefill_s]},
        "decode": {"batch": [1, 64], "context": [1, 4096], "seconds": [[decode_s, decode_s], [decode_s, decode_s]]},
    }


def pseudo_completion(prompt: list[int], n: int) -> list[int]:
    """The sim engine's first `n` tokens for `prompt` (common/modeling/sim_runner.pseudo_token)."""
    from common.modeling.sim_runner import pseudo_token

    out = [pseudo_token(prompt[-1], len(prompt))]
    while len(out) < n:
        out.append(pseudo_token(out[-1], len(prompt) + len(out)))
    return out
