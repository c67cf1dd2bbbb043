"""Every server has health, reflection and Prometheus metrics; `dopd status` sees the cluster;
the planner mirrors its registry to Redis under the test prefix."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import grpc
import redis
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.client import generate, health


async def test_health_serving_everywhere(tiny_cluster):
    for proc in tiny_cluster.cluster.procs:
        assert await health(proc.address) == "SERVING", proc.name


def test_reflection_lists_services(tiny_cluster):
    expected = {"gateway": "dopd.v1.Gateway", "planner": "dopd.v1.Planner", "decode": "dopd.v1.Worker",
                "prefill": "dopd.v1.Worker"}
    for proc in tiny_cluster.cluster.procs:
        with grpc.insecure_channel(proc.address) as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {expected[proc.role], "grpc.health.v1.Health"} <= services, proc.name


async def test_metrics_endpoints(tiny_cluster):
    async with tiny_cluster.channel() as ch:
        await generate(ch, "Hello", max_tokens=3)
    required = {
        "gateway": ["dopd_requests_total{status=\"ok\"}", "dopd_time_to_first_token_seconds_bucket",
                    "dopd_time_per_output_token_seconds_bucket"],
        "prefill": ["dopd_kv_blocks_used", "dopd_kv_blocks_capacity",
                    "dopd_kv_transfer_bytes_total{direction=\"sent\",transport=\"grpc\"}",
                    "dopd_worker_role{role=\"prefill\"} 1.0"],
        "decode": ["dopd_kv_blocks_used", "dopd_kv_blocks_capacity",
                   "dopd_kv_transfer_bytes_total{direction=\"received\",transport=\"grpc\"}",
                   "dopd_worker_role{role=\"decode\"} 1.0"],
        "planner": ["dopd_planner_live_workers"],
    }
    for proc in tiny_cluster.cluster.procs:
        body = urllib.request.urlopen(f"http://{proc.metrics_address}/metrics", timeout=5).read().decode()
        for name in required[proc.role]:
            assert name in body, f"{proc.name}: {name} missing"


def test_dopd_status_json(tiny_cluster):
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--target", tiny_cluster.gateway, "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    status = json.loads(out.stdout)
    assert status["serving_mode"] == "static"  # the launcher's default mode, as the gateway serves it
    roles = sorted(s["role"] for s in status["services"])
    assert roles == ["decode", "gateway", "planner", "prefill"]
    assert all(s["health"] == "SERVING" for s in status["services"])
    decode = next(s for s in status["services"] if s["role"] == "decode")
    assert decode["kv_total"] == 1536


def test_dopd_generate_cli(tiny_cluster):
    out = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--target", tiny_cluster.gateway,
                          "--max-tokens", "5", "Hello"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip()
    assert "[5 tokens, finish: length]" in out.stderr


def test_planner_mirrors_registry_to_redis(tiny_cluster, redis_url, redis_prefix):
    client = redis.Redis.from_url(redis_url)
    workers = client.hgetall(redis_prefix + "tiny:workers")  # each test cluster has its own prefix
    roles = sorted(json.loads(v)["role"] for v in workers.values())
    assert roles == ["ROLE_DECODE", "ROLE_PREFILL"]
