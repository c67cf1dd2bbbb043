"""`dopd up` supervises its processes as compose's `restart: unless-stopped`: a decode worker killed
with SIGKILL is restarted (same command, environment and ports), registers again, becomes serving
and gets requests from the gateway, while the rest keep serving; only SIGINT stops the cluster, with
exit code 0 and no child left. Plus `Cluster.supervise` on stand-in processes and a private
redis-server, on a given clock."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from common.pb import gateway_pb2, gateway_pb2_grpc
from services.client import generate, health
from services.launcher import Cluster, ClusterSpec, Proc, free_port, redis_answers, start_redis
from services.supervisor import RestartPolicy

ROOT = Path(__file__).resolve().parents[2]


# -- Cluster.supervise on stand-ins (no model), time given -------------------------------------


def sleeper(tmp_path: Path, name: str) -> Proc:
    log = tmp_path / f"{name}.log"
    argv = [sys.executable, "-c", "import time; time.sleep(120)"]
    with open(log, "w") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(name, "decode", "127.0.0.1:1", "127.0.0.1:2", log, popen, argv, dict(os.environ))


def test_supervise_restarts_with_backoff_and_its_own_redis_only(tmp_path):
    cluster = Cluster(ClusterSpec(log_dir=tmp_path), RestartPolicy(initial_backoff_s=0.5, max_backoff_s=30))
    cluster.procs = [sleeper(tmp_path, "decode-0"), sleeper(tmp_path, "decode-1")]
    cluster.redis, url = start_redis("127.0.0.1", tmp_path)  # as Cluster.start does when none answers
    foreign, foreign_url = start_redis("127.0.0.1", tmp_path)  # one the cluster did not start
    try:
        t = 1000.0
        assert cluster.supervise(t) == []
        old = cluster.proc("decode-0").popen.pid
        cluster.kill("decode-0")
        cluster.redis.kill()
        cluster.redis.wait()
        foreign.kill()
        foreign.wait()

        events = cluster.supervise(t + 10)
        assert sorted((e.kind, e.restart.name, e.restart.exit_code, e.restart.attempt, e.restart.backoff_s)
                      for e in events) == [("exited", "decode-0", -9, 1, 0.5), ("exited", "redis", -9, 1, 0.5)]
        assert "decode-0 exited (-9, SIGKILL) after 10.0 s up; restart 1 (attempt 1) in 0.5 s" in \
            [e.describe() for e in events]
        assert cluster.supervise(t + 10.4) == []
        events = cluster.supervise(t + 10.5)
        assert sorted((e.kind, e.restart.name) for e in events) == [("restarted", "decode-0"), ("restarted", "redis")]
        new = cluster.proc("decode-0").popen
        assert new.pid != old and new.poll() is None
        assert cluster.proc("decode-0").argv == [sys.executable, "-c", "import time; time.sleep(120)"]
        for _ in range(50):  # the same port: the same URL answers again
            if redis_answers(url):
                break
            time.sleep(0.1)
        assert redis_answers(url)
        assert not redis_answers(foreign_url), "a redis-server the cluster did not start was restarted"

        # Dies again at once: the backoff doubles; and the counts.
        cluster.kill("decode-0")
        (event,) = cluster.supervise(t + 11)
        assert (event.restart.attempt, event.restart.backoff_s, event.restart.restarts) == (2, 1.0, 2)
        assert cluster.supervise(t + 11.9) == []
        assert [e.kind for e in cluster.supervise(t + 12)] == ["restarted"]
        assert cluster.supervisor.restarts() == {"decode-0": 2, "redis": 1}

        # After stop nothing comes back.
        codes = cluster.stop(grace=2)
        assert set(codes) == {"decode-0", "decode-1"}
        assert cluster.supervise(t + 100) == []
        assert all(p.popen.poll() is not None for p in cluster.procs) and cluster.redis.poll() is not None
    finally:
        for p in cluster.procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()
        for proc in (cluster.redis, foreign):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- `dopd up` on real processes ------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def services_of(up_pid: int) -> dict[str, tuple[int, dict[str, str]]]:
    """dopd up's children by service name: (pid, environment)."""
    out = {}
    for pid in children(up_pid):
        env = environ(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if alive(pid) else []
        if "DOPD_WORKER_ID" in env:
            out[env["DOPD_WORKER_ID"]] = (pid, env)
        elif b"services.planner" in cmdline:
            out["planner"] = (pid, env)
        elif b"services.gateway" in cmdline:
            out["gateway"] = (pid, env)
    return out


class Output:
    """dopd up's stdout and stderr, read on a thread so the pipe never fills."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def find(self, pattern: str) -> re.Match | None:
        return next((m for m in map(re.compile(pattern).search, list(self.lines)) if m), None)

    def text(self) -> str:
        return "\n".join(self.lines)


async def until(predicate, timeout: float, what: str, output: Output):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out ({timeout:.0f} s) waiting for {what}; dopd up said:\n" \
                                             + output.text()[-4000:]
        await asyncio.sleep(0.2)


async def serving_in_topology(gateway: str, worker_id: str) -> bool:
    try:
        async with grpc.aio.insecure_channel(gateway) as ch:
            status = await gateway_pb2_grpc.GatewayStub(ch).GetStatus(gateway_pb2.GetStatusRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return any(w.worker_id == worker_id and w.serving for w in status.topology.workers)


def decode_steps(metrics_address: str) -> float:
    """dopd_decode_step_seconds_count on a worker's Prometheus endpoint (0 when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return 0.0
    m = re.search(r"^dopd_decode_step_seconds_count(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Load:
    """Clients sending short requests back to back; every outcome with its start and end time."""

    def __init__(self, gateway: str, clients: int = 2) -> None:
        self.gateway = gateway
        self.done: list[tuple[float, float, str]] = []  # (start, end, "" or the error)
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._client(i)) for i in range(clients)]

    async def _client(self, i: int) -> None:
        n = 0
        async with grpc.aio.insecure_channel(self.gateway) as ch:
            while not self.stop.is_set():
                n += 1
                start = time.monotonic()
                try:
                    out = await generate(ch, [100 + i, 200 + n % 50, 300], max_tokens=12, temperature=0.0,
                                         timeout=20)
                    error = "" if out.finish_reason in ("stop", "length") else f"finish {out.finish_reason}"
                except grpc.aio.AioRpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                self.done.append((start, time.monotonic(), error))
                await asyncio.sleep(0.05)  # leave the restarted worker some CPU to load with

    def ok_between(self, t0: float, t1: float) -> int:
        return sum(1 for _, end, err in self.done if not err and t0 <= end <= t1)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def test_dopd_up_restarts_a_killed_decode_worker(redis_url, redis_prefix, tmp_path):
    port = free_port()
    env = {**os.environ, "DOPD_REDIS_URL": redis_url, "DOPD_REDIS_PREFIX": redis_prefix + "supervision:",
           "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", "tiny-random", "--prefill", "1",
                           "--decode", "2", "--mode", "static", "--port", str(port), "--http-port", "0",
                           "--kv-blocks", "256", "--log-dir", str(tmp_path / "logs")],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(up)
    seen: set[int] = set()
    load = None
    try:
        await until(lambda: output.find(r"gateway ready at (\S+)") or up.poll() is not None, 240,
                    "gateway ready", output)
        assert up.poll() is None, output.text()
        gateway = output.find(r"gateway ready at (\S+)").group(1)
        procs = services_of(up.pid)
        assert set(procs) == {"planner", "gateway", "prefill-0", "decode-0", "decode-1"}, procs
        seen |= descendants(up.pid)
        victim, victim_env = procs["decode-0"]
        address = f"{victim_env['DOPD_HOST']}:{victim_env['DOPD_WORKER_PORT']}"
        metrics = f"{victim_env['DOPD_HOST']}:{victim_env['DOPD_WORKER_METRICS_PORT']}"

        load = Load(gateway)
        await until(lambda: load.ok_between(0, float("inf")) >= 3, 30, "the first requests", output)

        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        await until(lambda: output.find(r"decode-0 exited \(-9, SIGKILL\) .* restart 1 \(attempt 1\) in 0\.5 s"), 10,
                    "the exit reported", output)
        restarted = await until(lambda: output.find(r"decode-0 restarted \(pid (\d+)\)"), 10, "the restart", output)
        new_pid = int(restarted.group(1))
        assert new_pid != victim and services_of(up.pid)["decode-0"][0] == new_pid
        assert up.poll() is None, "dopd up stopped when a worker died"
        new_env = environ(new_pid)
        assert {k: new_env.get(k) for k in ("DOPD_WORKER_PORT", "DOPD_WORKER_METRICS_PORT", "DOPD_ROLE")} == \
            {k: victim_env[k] for k in ("DOPD_WORKER_PORT", "DOPD_WORKER_METRICS_PORT", "DOPD_ROLE")}
        seen |= descendants(up.pid)

        async def serving():
            return await health(address, timeout=1) == "SERVING" and await serving_in_topology(gateway, "decode-0")
        await until(serving, 120, "the restarted decode-0 serving in the gateway's topology", output)
        back_at = time.monotonic()
        assert load.ok_between(killed_at, back_at) > 0, "nothing was served while decode-0 was away"
        # The gateway routes to it again: the new process runs decode steps.
        await until(lambda: decode_steps(metrics) > 0, 20, "decode steps on the restarted decode-0", output)
        await until(lambda: load.ok_between(back_at, float("inf")) >= 5, 20, "requests after the restart", output)
        others = ("planner", "gateway", "prefill-0", "decode-1")
        now = services_of(up.pid)
        assert up.poll() is None and {n: now[n][0] for n in others} == {n: procs[n][0] for n in others}, \
            "another process was restarted"
        await load.finish()
        # Only requests in flight on decode-0 when it was killed may fail (the gateway may replay
        # them elsewhere); every one started after the kill was served.
        failed = [(start, end, err) for start, end, err in load.done if err]
        assert all(start < killed_at <= end for start, end, _ in failed), failed
        assert all(not err for start, _, err in load.done if start > killed_at), failed
        assert len(failed) <= 3, failed
        load = None
        seen |= descendants(up.pid)

        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0, output.text()[-4000:]
        output.thread.join(5)
        assert output.find(r"^stopped: planner=0, gateway=0, prefill-0=0, decode-0=0, decode-1=0$"), output.text()
        assert output.find(r"^restarts: decode-0=1$"), output.text()
        left = [pid for pid in seen if alive(pid)]
        assert not left, f"children left after dopd up stopped: {left}"
    finally:
        if load is not None:
            await load.finish()
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
