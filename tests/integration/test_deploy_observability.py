"""Deployment and observability, checked with the real tools:

- docker-compose.yml validates with `docker-compose config` and has what a GPU bring-up needs;
  deploy/prometheus/prometheus.yml validates with `promtool check config` and scrapes every
  compose service; the Grafana provisioning matches the dashboard.
- A live cluster under load (the sim engine: real services and gRPC, forward passes timed by a
  small profile; the planner made to switch a decode worker to prefill, live-migrating its running
  requests): every service's /metrics passes `promtool check metrics`; the compose health-check
  commands pass against the live services; a real Prometheus server scrapes the cluster and every
  dashboard panel's query returns data through /api/v1/query; `dopd dashboard` writes a PNG for
  every panel.

Each test skips, saying why, when its binary is missing (`make install` installs them with apt).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from services.client import generate
from services.dashboard.panels import expand, load_panels, metric_names
from services.launcher import free_port
from tests.helpers import ClusterHandle, start_cluster

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# Prefill 0.3 s a batch, a decode step 50 ms: a burst of long prompts queues on the one prefill
# worker for seconds while long decodes keep both decode workers busy.
PROFILE = {
    "name": "obs-flat",
    "model": {"num_layers": 4, "num_kv_heads": 2, "head_dim": 32, "dtype": "bfloat16", "vocab_size": 32000,
              "max_context": 4096},
    "prefill": {"tokens": [1, 4096], "seconds": [0.3, 0.3]},
    "decode": {"batch": [1, 64], "context": [1, 4096], "seconds": [[0.05, 0.05], [0.05, 0.05]]},
}
LONG_DECODES, LONG_DECODE_TOKENS = 8, 240
PROMPT_BURST, BURST_PROMPT_TOKENS = 16, 600


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        package = "docker-compose" if "compose" in binary else "prometheus"
        pytest.skip(f"{binary} is not installed (apt-get install {package}; `make install` does it)")
    return path


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


# -- the deployment files ---------------------------------------------------------------------

def compose_config(env: dict[str, str] | None = None) -> dict:
    exe = need("docker-compose")
    out = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DOPD_CLUSTER_TOKEN": "compose-test-token", **(env or {})}, cwd=ROOT)
    assert out.returncode == 0, f"docker-compose config failed:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


def workers_of(config: dict) -> dict[str, dict]:
    return {name: s for name, s in config["services"].items() if s.get("command", [])[-1:] == ["services.worker"]}


def test_compose_requires_a_cluster_token():
    exe = need("docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "DOPD_CLUSTER_TOKEN"}
    out = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, env=env,
                         cwd=ROOT)
    assert out.returncode != 0 and "DOPD_CLUSTER_TOKEN" in out.stderr


def test_compose_file_validates_and_has_the_cluster():
    config = compose_config()
    services = config["services"]
    assert {"redis", "planner", "gateway", "prometheus", "grafana"} <= set(services)
    workers = workers_of(config)
    assert len(workers) >= 2
    gpus = []
    for name, w in workers.items():
        devices = w["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"], name
        gpus += devices[0]["device_ids"]
        env = w["environment"]
        assert env["DOPD_WORKER_ID"] == env["DOPD_ADVERTISE_HOST"] == name
        assert "dopd-workers" in w["networks"]["default"]["aliases"], name  # Prometheus' discovery
    assert len(gpus) == len(set(gpus)) == len(workers), f"one GPU a worker: {gpus}"
    for name in ["planner", "gateway", *workers]:
        env = services[name]["environment"]
        assert (env["DOPD_MODE"], env["DOPD_PLANNER_MODE"], env["DOPD_MODEL"]) == ("dopd", "dynamic", "smollm2"), name
        assert env["DOPD_CLUSTER_TOKEN"] == "compose-test-token", name
        assert any(str(v).endswith(":/models:ro") for v in services[name]["volumes"]), name
    for name, s in services.items():
        assert s.get("healthcheck", {}).get("test"), f"{name} has no health check"
    published = {str(p["target"] if isinstance(p, dict) else p).split(":")[-1] for p in services["gateway"]["ports"]}
    assert {"50051", "8000"} <= published
    assert services["gateway"]["environment"]["DOPD_HTTP_PORT"] == "8000"
    # The model is one setting, a directory of the mounted volume.
    custom = compose_config({"DOPD_MODEL": "/models/my-model", "DOPD_MODEL_DIR": "/srv/models"})
    for name in ["planner", "gateway", *workers_of(custom)]:
        assert custom["services"][name]["environment"]["DOPD_MODEL"] == "/models/my-model"


def test_prometheus_config_validates_and_scrapes_every_service():
    exe = need("promtool")
    out = subprocess.run([exe, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    from common.config import GatewaySettings, PlannerSettings, WorkerSettings

    jobs = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    static = {t for j in jobs.values() for c in j.get("static_configs", []) for t in c["targets"]}
    assert f"gateway:{GatewaySettings().gateway_metrics_port}" in static
    assert f"planner:{PlannerSettings().planner_metrics_port}" in static
    dns = jobs["workers"]["dns_sd_configs"][0]
    assert dns["names"] == ["dopd-workers"] and dns["port"] == WorkerSettings().worker_metrics_port


def test_grafana_provisioning_matches_the_dashboard():
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dopd.yml").read_text())
    compose = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the anchors and merge keys
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/dopd.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]


# -- a live cluster under load ------------------------------------------------------------------

def scrape(address: str) -> str:
    return http_get(f"http://{address}/metrics")


def metric_sum(body: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in body.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def drive_load(handle, planner_metrics: str) -> dict:
    """Long decodes on both decode workers, then a burst of long prompts that queues on the one
    prefill worker: the planner's emergency rule moves a decode worker to prefill, live-migrating
    its running requests. Waits for every request."""
    async with handle.channel() as ch:
        async def one(prompt_len: int, max_tokens: int, seed: int):
            try:
                return await generate(ch, [100 + (seed * 7 + i) % 9000 for i in range(prompt_len)],
                                      max_tokens=max_tokens, temperature=0.0, ignore_eos=True, timeout=120)
            except Exception as exc:  # noqa: BLE001 - counted, the metrics see failures too
                return exc

        decodes = [asyncio.create_task(one(16, LONG_DECODE_TOKENS, i)) for i in range(LONG_DECODES)]
        await asyncio.sleep(1.5)
        burst = [asyncio.create_task(one(BURST_PROMPT_TOKENS, 8, 100 + i)) for i in range(PROMPT_BURST)]
        deadline = time.monotonic() + 30
        while metric_sum(scrape(planner_metrics), "dopd_planner_role_switches_total") < 1:
            assert time.monotonic() < deadline, "the planner made no role switch under the prompt burst"
            await asyncio.sleep(0.25)
        results = await asyncio.gather(*decodes, *burst)
    return {"ok": sum(not isinstance(r, Exception) for r in results), "requests": len(results),
            "errors": [repr(r) for r in results if isinstance(r, Exception)]}


@dataclass
class Live:
    handle: ClusterHandle
    metrics: dict[str, str]  # service name -> its metrics address
    started: float  # unix time the load began
    load: dict
    prometheus: str | None  # the URL of a Prometheus server that scraped it all; None: not installed


def start_prometheus(exe: str, metrics: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, str]:
    """A real Prometheus server scraping every service each second, its storage in `tmp`."""
    jobs: dict[str, list[str]] = {}
    for name, address in metrics.items():
        jobs.setdefault(name if name in ("gateway", "planner") else "workers", []).append(address)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                                 for job, targets in jobs.items()]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=open(tmp / "prometheus.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(tmp / 'prometheus.log').read_text()[-2000:]}")
        try:
            targets = json.loads(http_get(f"{url}/api/v1/targets"))["data"]["activeTargets"]
            if len(targets) == len(metrics) and all(t["health"] == "up" for t in targets):
                return proc, url
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("Prometheus did not scrape every service in 30 s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def live(redis_url, redis_prefix, tmp_path_factory):
    """One cluster for every live test: Prometheus (where installed) scrapes it from before the
    load to after it."""
    tmp = tmp_path_factory.mktemp("obs")
    profile = tmp / "obs-flat.json"
    profile.write_text(json.dumps(PROFILE))
    handle = start_cluster(f"sim:{profile}", tmp / "logs", redis_url, redis_prefix + "obs:", prefill=1, decode=2,
                           kv_blocks=2048, mode="dopd-no-policy", planner="dynamic",
                           env={"DOPD_EMERGENCY_PREFILL_QUEUE_TOKENS": "1200", "DOPD_KV_TIMEOUT_S": "20"})
    prom = None
    try:
        where = {p.name: p.metrics_address for p in handle.cluster.procs}
        url = None
        if exe := shutil.which("prometheus"):
            prom, url = start_prometheus(exe, where, tmp)
        started = time.time()
        load = asyncio.run(drive_load(handle, where["planner"]))
        time.sleep(2.5)  # the scrapes after the last request
        yield Live(handle, where, started, load, url)
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(10)
        codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), f"a service did not drain cleanly: {codes}"


@pytest.fixture(scope="module")
def prometheus(live) -> str:
    if live.prometheus is None:
        need("prometheus")  # skips, saying why
    return live.prometheus


def test_load_switched_roles_and_migrated(live):
    where, load = live.metrics, live.load
    assert load["ok"] >= load["requests"] - 2, load  # a request or two may be refused while roles change
    assert metric_sum(scrape(where["planner"]), "dopd_planner_role_switches_total") >= 1
    workers = [name for name in where if name.startswith(("prefill-", "decode-"))]
    assert sum(metric_sum(scrape(where[w]), "dopd_kv_migration_seconds_count") for w in workers) >= 1


def test_every_metrics_endpoint_passes_promtool(live):
    exe = need("promtool")
    for name, address in live.metrics.items():
        body = scrape(address)
        out = subprocess.run([exe, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{name} (http://{address}/metrics): {out.stdout}{out.stderr}"


def test_compose_health_checks_pass_on_live_services(live):
    """The health-check commands of docker-compose.yml, run as they are but on the live ports."""
    handle = live.handle
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    compose_port = {"planner": "50052", "gateway": "50051", "prefill-0": "50060", "decode-0": "50060"}
    for proc in handle.cluster.procs:
        if proc.name not in compose_port:
            continue
        test = services[proc.name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], test
        code = test[3].replace(f"127.0.0.1:{compose_port[proc.name]}", proc.address)
        assert code != test[3], f"{proc.name}: the health check does not name port {compose_port[proc.name]}"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{proc.name}: {out.stderr}"
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the check must fail
    code = services["gateway"]["healthcheck"]["test"][3].replace("127.0.0.1:50051", dead)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode != 0


def test_every_dashboard_panel_query_returns_data(live, prometheus):
    """Each query of deploy/grafana/dashboards/dopd.json, through /api/v1/query, over a window
    that holds the whole load: at least one series with a number."""
    from services.dashboard.prometheus import Prometheus

    exported = set()
    for address in live.metrics.values():
        exported |= {line.split()[2] for line in scrape(address).splitlines() if line.startswith("# TYPE ")}
    panels = load_panels()
    needed = set().union(*(metric_names(t.expr) for p in panels for t in p.targets))
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in needed}
    missing = sorted(n for n in base if n not in exported)
    assert not missing, f"the dashboard reads metrics no service exports: {missing}"
    prom = Prometheus(prometheus)
    window = time.time() - live.started + 5
    failures = []
    for panel in panels:
        for target in panel.targets:
            expr = expand(target.expr.replace("$__rate_interval", f"{window:.0f}s"), 1.0, 1.0, window)
            result = prom.query(expr)
            if not any(math.isfinite(v) for s in result for _, v in s.points):
                failures.append(f"{panel.title} [{target.ref}] {expr}: {result}")
    assert not failures, "panel queries without data:\n" + "\n".join(failures)


def test_dopd_dashboard_renders_every_panel(live, prometheus, tmp_path):
    out = tmp_path / "render"
    span = math.ceil(time.time() - live.started)
    run = subprocess.run([sys.executable, "-m", "services.dashboard", "--prometheus", prometheus, "--out", str(out),
                          "--range", str(span), "--step", "1", "--require-data"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "panels.json").read_text())
    assert summary["scrape_interval"] == 1.0  # read from the server's configuration
    panels = load_panels()
    assert [p["title"] for p in summary["panels"]] == [p.title for p in panels]
    for panel in panels:
        png = out / f"{panel.slug}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert (out / "dashboard.png").stat().st_size > 20000
    # An unreachable server is a clear error, not a traceback.
    dead = subprocess.run([sys.executable, "-m", "services.dashboard", "--prometheus",
                           f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert dead.returncode == 2 and "cannot reach Prometheus" in dead.stderr
