"""Starts and stops a local cluster (planner, gateway, workers, and redis-server if none answers)
as child processes, and restarts those that die (`supervise`, what `dopd up` runs). Used by
`dopd up`, the tests and the benchmarks.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common.errors import EXIT_MODEL_REFUSED
from common.modes import serving_mode
from common.rpc import auth
from services.supervisor import Restart, RestartPolicy, Supervisor


@dataclass
class Proc:
    name: str
    role: str
    address: str
    metrics_address: str
    log_path: Path
    popen: subprocess.Popen
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterSpec:
    model: str = "smollm2"
    prefill: int = 1
    decode: int = 1
    host: str = "127.0.0.1"
    port: int = 50051  # the gateway; the planner and workers take the next free ports
    # Gateway processes serving that port (and the HTTP one) together, SO_REUSEPORT: "gateway",
    # then "gateway-1", ... Each has its own metrics port.
    gateways: int = 1
    # The gateway's OpenAI-compatible HTTP API: this port or, if taken, the next free one; 0: off.
    http_port: int = 8000
    log_dir: Path = Path("runs/cluster")
    redis_url: str = field(default_factory=lambda: os.environ.get("DOPD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    redis_prefix: str = ""  # default: dopd:<gateway port>: so that clusters sharing a Redis don't mix
    kv_blocks: int = 2048
    torch_threads: int = 0
    time_scale: float = 1.0  # sim models only
    planner: str = "static"  # dynamic | static | off (services/planner)
    # Serving mode (common/modes.py), the gateway's: aggregated makes every worker a decode
    # worker that prefills its own requests (prefill + decode workers in all).
    mode: str = "static"
    predictor: str = "arima"
    slo_ttft_ms: float = 2000.0  # the SLOs the planner splits for
    slo_tpot_ms: float = 200.0
    slo_itl_ms: float | None = None  # the stall SLO, passed to the planner when given
    interval_s: float = 1.0  # one planner interval, profile seconds
    extra_env: dict[str, str] = field(default_factory=dict)
    worker_env: dict[str, dict[str, str]] = field(default_factory=dict)  # by worker name, e.g. "decode-1"


@dataclass(frozen=True)
class SupervisionEvent:
    """What `Cluster.supervise` did: `exited` (a restart is scheduled), `restarted` (done: `pid`),
    or `restart_failed` (the command could not be started: `error`; the next try is scheduled)."""

    kind: str
    restart: Restart
    pid: int | None = None
    error: str = ""

    def describe(self) -> str:
        r = self.restart
        if self.kind == "restarted":
            return f"{r.name} restarted (pid {self.pid}): restart {r.restarts}, attempt {r.attempt} of its streak"
        if self.kind == "restart_failed":
            return (f"{r.name} could not be started ({self.error}); attempt {r.attempt} in {r.backoff_s:g} s")
        return (f"{r.name} exited ({exit_description(r.exit_code)}) after {r.uptime_s:.1f} s up; "
                f"restart {r.restarts} (attempt {r.attempt}) in {r.backoff_s:g} s")


class ModelRefusedAtStart(RuntimeError):
    """A worker refused the cluster's model at load (common/modeling/support.py): the one line
    that says why, not a log tail."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")


REFUSAL_LINE = re.compile(r"model '.*' \(model_type .*\) is refused: .*")


def refusal_line(log: str) -> str:
    """The refusal a worker logged (its last), or a pointer to the log if none is there."""
    found = REFUSAL_LINE.findall(log)
    return found[-1] if found else f"refused its model (exit {EXIT_MODEL_REFUSED}); see its log"


def exit_description(code: int | None) -> str:
    if code is None:
        return "?"
    if code < 0:
        try:
            return f"{code}, {signal.Signals(-code).name}"
        except ValueError:
            return str(code)
    return str(code)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _ports(host: str, start: int, count: int, taken: set[int]) -> list[int]:
    """`count` free ports from `start` upwards, none of them in `taken`, which then holds them too.

    Every port a cluster hands out goes through one `taken` set: a port only checked free (nothing
    binds it until its service starts) may otherwise be handed out twice, e.g. a caller's randomly
    chosen HTTP port landing inside the gateway's range of worker ports (a flaky CI bind error)."""
    out, port = [], start
    while len(out) < count:
        if port not in taken and _port_free(host, port):
            out.append(port)
            taken.add(port)
        port += 1
    return out


def cluster_ports(host: str, gateway_port: int, http_port: int, n_workers: int, n_gateways: int = 1
                  ) -> tuple[list[int], list[int], int]:
    """The ports of a cluster whose gateway listens on `gateway_port`: gRPC (planner, then each
    worker) from gateway_port + 1, metrics (planner, gateway, each worker, then each further
    gateway) from gateway_port + 1000, and the OpenAI API's from `http_port` (0: none). All
    distinct and free when chosen."""
    taken = {gateway_port}
    grpc_ports = _ports(host, gateway_port + 1, 1 + n_workers, taken)
    metrics_ports = _ports(host, gateway_port + 1000, 1 + n_gateways + n_workers, taken)
    return grpc_ports, metrics_ports, (_ports(host, http_port, 1, taken)[0] if http_port else 0)


# glibc's allocator, for services that allocate large short-lived buffers (whole-prompt KV
# tensors, 8 MiB a layer and more): every block of 4 MiB or more is mmapped and given back to the
# kernel when freed (by default the threshold rises to 32 MiB after the first large free, and
# such buffers then stay in the heap as its high-water mark), and at most two arenas. Measured
# with benchmarks/chaos.py (16 sim workers, 240 s of mix with chaos, docs/results/chaos): the total
# resident memory of the processes never restarted grew +14% over the run by default and +4.4%
# with this; a threshold of 128 KiB (KV chunks mmapped too) held it as well but cost so much CPU
# in page faults that requests missed their deadlines on 2 cores. The environment may override
# either (the Dockerfile sets the same).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4194304", "MALLOC_ARENA_MAX": "2"}


def rss_kib(pid: int) -> int | None:
    """The resident memory of process `pid` in KiB (Linux /proc), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_table(before: dict[str, tuple[int, int | None]], after: dict[str, tuple[int, int | None]]
              ) -> tuple[list[str], dict[str, float]]:
    """Two `Cluster.memory()` snapshots side by side, for a benchmark's report: a line per process
    (MiB before -> after, and the growth), and the growth of each process that is the same one in
    both (a restarted process is a new one: its growth says nothing)."""
    lines, growth = [], {}
    for name in sorted(before):
        (pid0, a), (pid1, b) = before[name], after.get(name, (None, None))
        if a and b and pid0 == pid1:
            growth[name] = b / a - 1
        mib = [f"{x / 1024:8.1f}" if x else "     nan" for x in (a, b)]
        lines.append(f"{name:10s} {mib[0]} -> {mib[1]}" + (f"  {growth[name]:+.1%}" if name in growth else "")
                     + ("" if pid0 == pid1 else "  (restarted: a new process)"))
    return lines, growth


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def start_redis(host: str, log_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start a private redis-server (no persistence) on `port` (default: a free one)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no Redis answers and redis-server is not installed (apt-get install redis-server)")
    port = port or free_port(host)
    with open(log_dir / "redis.log", "a") as log:
        popen = subprocess.Popen([exe, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://{host}:{port}/0"
    for _ in range(50):
        if redis_answers(url):
            return popen, url
        time.sleep(0.1)
    popen.kill()
    raise RuntimeError("redis-server did not start")


class Cluster:
    def __init__(self, spec: ClusterSpec, restart_policy: RestartPolicy | None = None) -> None:
        self.spec = spec
        self.procs: list[Proc] = []
        self.redis: subprocess.Popen | None = None  # only a redis-server this cluster started itself
        self.redis_url = spec.redis_url
        self.http_port = 0  # chosen at start
        self.token_file: Path | None = None  # where the dopd commands find the cluster token
        self.supervisor = Supervisor(restart_policy or RestartPolicy())

    @property
    def gateway_address(self) -> str:
        return f"{self.spec.host}:{self.spec.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI API's base URL ("" when it is off)."""
        return f"http://{self.spec.host}:{self.http_port}/v1" if self.http_port else ""

    def _spawn(self, name: str, role: str, module: str, port: int, metrics_port: int, env: dict) -> None:
        log_path = self.spec.log_dir / f"{name}.log"
        full_env = {**MALLOC_ENV, **os.environ, **self.spec.extra_env, **env, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", module]
        with open(log_path, "w") as log:
            popen = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        h = self.spec.host
        self.procs.append(Proc(name, role, f"{h}:{port}", f"{h}:{metrics_port}", log_path, popen, argv, full_env))
        self.supervisor.started(name, time.monotonic())

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one service (SIGKILL by default: no drain, as a crash)."""
        p = self.proc(name)
        p.popen.send_signal(sig)
        p.popen.wait()

    def restart(self, name: str) -> None:
        """Start a service again with the same command, environment and ports (after kill)."""
        p = self.proc(name)
        if p.popen.poll() is None:
            raise RuntimeError(f"{name} is still running")
        with open(p.log_path, "a") as log:
            p.popen = subprocess.Popen(p.argv, env=p.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.supervisor.started(name, time.monotonic())

    def memory(self) -> dict[str, tuple[int, int | None]]:
        """name -> (pid, resident memory in KiB, None if it is gone) of every child, redis included."""
        return {name: (popen.pid, rss_kib(popen.pid)) for name, popen in self._supervised()}

    def _supervised(self) -> list[tuple[str, subprocess.Popen]]:
        """Every child to keep running: the services, and the redis-server if this cluster started it."""
        out = [(p.name, p.popen) for p in self.procs]
        if self.redis is not None:
            out.append(("redis", self.redis))
        return out

    def _respawn(self, name: str) -> int:
        """Start `name` again as it was first started (same command, environment, ports); its pid."""
        if name == "redis" and self.redis is not None:
            if self.redis.poll() is None:
                raise RuntimeError("redis is still running")
            with open(self.spec.log_dir / "redis.log", "a") as log:
                self.redis = subprocess.Popen(self.redis.args, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True)
            self.supervisor.started(name, time.monotonic())
            return self.redis.pid
        self.restart(name)
        return self.proc(name).popen.pid

    def supervise(self, now: float | None = None) -> list[SupervisionEvent]:
        """One round of `restart: unless-stopped`: note the children that died since the last
        round, and start again those whose backoff (services/supervisor.py) has passed. Call it
        every fraction of a second; `now` is time.monotonic() unless given (tests)."""
        now = time.monotonic() if now is None else now
        sup = self.supervisor
        events: list[SupervisionEvent] = []
        if sup.stopped:
            return events
        for name, popen in self._supervised():
            if not sup.knows(name):
                sup.started(name, now)
            if popen.poll() is None:
                if sup.pending(name) is not None:
                    sup.started(name, now)  # started again by someone else (Cluster.restart)
                continue
            if sup.pending(name) is None and not sup.refused(name):
                decision = sup.exited(name, popen.returncode, now)
                if decision is not None:
                    events.append(SupervisionEvent("exited", decision))
        for decision in sup.due(now):
            try:
                pid = self._respawn(decision.name)
            except OSError as exc:
                again = sup.failed_to_start(decision.name, now)
                if again is not None:
                    events.append(SupervisionEvent("restart_failed", again, error=str(exc)))
                continue
            sup.started(decision.name, now)  # on this round's clock (restart() noted the wall clock's)
            events.append(SupervisionEvent("restarted", decision, pid=pid))
        return events

    def start(self) -> None:
        s = self.spec
        s.log_dir.mkdir(parents=True, exist_ok=True)
        if not redis_answers(self.redis_url):
            self.redis, self.redis_url = start_redis(s.host, s.log_dir)
            self.supervisor.started("redis", time.monotonic())
        n_workers = s.prefill + s.decode
        grpc_ports, metrics_ports, self.http_port = cluster_ports(s.host, s.port, s.http_port, n_workers, s.gateways)
        planner_address = f"{s.host}:{grpc_ports[0]}"
        # The internal plane's credential (common/rpc/auth.py): this process's, or a new one,
        # which this process then uses too (its own calls to the workers and the planner); the
        # dopd commands in other processes find it in a file only this user can read.
        if not auth.cluster_token():
            os.environ[auth.ENV] = secrets.token_urlsafe(32)
        self.token_file = auth.write_token_file(self.gateway_address, auth.cluster_token())
        common = {"DOPD_HOST": s.host, "DOPD_MODEL": s.model, "DOPD_PLANNER_ADDRESS": planner_address,
                  "DOPD_TIME_SCALE": str(s.time_scale), auth.ENV: auth.cluster_token()}
        self._spawn("planner", "planner", "services.planner", grpc_ports[0], metrics_ports[0], {
            **common, "DOPD_PLANNER_PORT": str(grpc_ports[0]), "DOPD_PLANNER_METRICS_PORT": str(metrics_ports[0]),
            "DOPD_REDIS_URL": self.redis_url, "DOPD_REDIS_PREFIX": s.redis_prefix or f"dopd:{s.port}:",
            "DOPD_PLANNER_MODE": s.planner, "DOPD_PREDICTOR": s.predictor, "DOPD_INTERVAL_S": str(s.interval_s),
            "DOPD_SLO_TTFT_MS": str(s.slo_ttft_ms), "DOPD_SLO_TPOT_MS": str(s.slo_tpot_ms),
            "DOPD_MIXED_WORKERS": str(serving_mode(s.mode).mixed).lower(),
            **({"DOPD_SLO_ITL_MS": str(s.slo_itl_ms)} if s.slo_itl_ms is not None else {})})
        # The first gateway's metrics port comes before the workers' (as with one gateway), the
        # others' after them.
        gateway_metrics = [metrics_ports[1], *metrics_ports[2 + n_workers:]]
        for g, metrics_port in enumerate(gateway_metrics):
            name = "gateway" if g == 0 else f"gateway-{g}"
            self._spawn(name, "gateway", "services.gateway", s.port, metrics_port, {
                **common, "DOPD_GATEWAY_PORT": str(s.port), "DOPD_GATEWAY_METRICS_PORT": str(metrics_port),
                "DOPD_GATEWAY_ID": name, "DOPD_HTTP_PORT": str(self.http_port),
                "DOPD_LOAD_INTERVAL_S": str(s.interval_s * s.time_scale), "DOPD_MODE": s.mode,
                "DOPD_SLO_TTFT_MS": str(s.slo_ttft_ms), "DOPD_SLO_TPOT_MS": str(s.slo_tpot_ms),
                **({"DOPD_SLO_ITL_MS": str(s.slo_itl_ms)} if s.slo_itl_ms is not None else {})})
        roles = ["prefill"] * s.prefill + ["decode"] * s.decode
        if not serving_mode(s.mode).disaggregated:
            roles = ["decode"] * n_workers  # each prefills the requests it decodes
        first_decode = roles.index("decode") if "decode" in roles else len(roles)
        # NOTE: torch's default (one thread per core in every worker) oversubscribes the cores as
        # soon as two workers compute at once, and on 2 cores that is many times slower than one
        # thread each. 0 means: share the cores out.
        threads = s.torch_threads or max(1, (os.cpu_count() or 1) // max(1, n_workers))
        for i, role in enumerate(roles):
            name = f"{role}-{i if role == 'prefill' else i - first_decode}"
            self._spawn(name, role, "services.worker", grpc_ports[1 + i], metrics_ports[2 + i], {
                **common, "DOPD_ROLE": role, "DOPD_WORKER_ID": name, "DOPD_WORKER_PORT": str(grpc_ports[1 + i]),
                "DOPD_WORKER_METRICS_PORT": str(metrics_ports[2 + i]), "DOPD_KV_BLOCKS": str(s.kv_blocks),
                "DOPD_TORCH_THREADS": str(threads), **s.worker_env.get(name, {})})

    def wait_ready(self, timeout: float = 300.0, cancelled=None) -> None:
        """Until every service is healthy and the gateway sees every worker; raises on a dead child,
        and InterruptedError as soon as `cancelled()` (if given) is true."""
        import asyncio

        from services.client import cluster_ready

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancelled is not None and cancelled():
                raise InterruptedError("stopped while starting")
            for p in self.procs:
                if p.popen.poll() is not None:
                    log = p.log_path.read_text()
                    if p.popen.returncode == EXIT_MODEL_REFUSED:
                        raise ModelRefusedAtStart(p.name, refusal_line(log))
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}; log tail:\n{log[-3000:]}")
            if asyncio.run(cluster_ready(self.gateway_address, [p.address for p in self.procs],
                                         self.spec.prefill + self.spec.decode, self.spec.gateways)):
                return
            time.sleep(0.5)
        raise TimeoutError(f"cluster not ready after {timeout:.0f}s; logs in {self.spec.log_dir}")

    def stop(self, grace: float = 15.0) -> dict[str, int | None]:
        """SIGTERM everything (graceful drain), then SIGKILL what is left. Returns exit codes.
        Nothing is restarted after this."""
        self.supervisor.stop()
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait()
        if self.token_file is not None:
            self.token_file.unlink(missing_ok=True)
        return {p.name: p.popen.returncode for p in self.procs}
