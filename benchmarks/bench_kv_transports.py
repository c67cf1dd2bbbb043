"""KV transports side by side, in one run: gRPC (PushKV chunks), shm (a mapped peer pool) and NIXL
(UCX reads of a registered peer pool), between two processes on this host.

    python benchmarks/bench_kv_transports.py [--sizes 1,16,256] [--repeats 5] [--handoffs 5]
                                             [--switch-trials 2] [--skip-system] [--out FILE]

1. Raw throughput and CPU at 1, 16 and 256 MiB of KV, laid out as SmolLM2's pool (30 layers,
   3 KV heads x 64, float32, 16-token blocks; a request's blocks scattered over the pool):
   - grpc: a client stream of 1 MiB messages (the default DOPD_KV_CHUNK_MAX_BYTES), read out of
     the sender's pool and written into the receiver's, as KVSender and receive_kv do;
   - shm:  the receiver maps the sender's memfd pool and copies the positions
     (PagedKVStore.copy_from_peer, what a migration's `ready` does);
   - nixl: the receiver READs the positions with NIXL (services/kvtransfer/nixl_agent.py: one row per
     run of positions, layer and side), the sender progressing its agent every millisecond.
   Each process measures its own CPU time (user + system) over the transfers: CPU-s per GB.
2. The real services (smollm2, 1 prefill + 1 decode): the hand-off of a 1,000-token prompt,
   from the prefill workers' dopd_kv_handoff_seconds (prefill done -> the decode worker holds
   every layer), for grpc and nixl (shm carries migrations only).
3. The decode -> decode migration of 16 running requests: benchmarks/bench_role_switch.py with
   each transport.

Goal (the KV-transports issue): NIXL >= 1.5x gRPC's throughput on loopback and <= half its CPU per GB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.kv import shared_memory  # noqa: E402
from common.kv.kv_store import PagedKVStore, slots_for  # noqa: E402
from services.kvtransfer import nixl_agent  # noqa: E402
from services.kvtransfer.wire import KVLayout  # noqa: E402

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float32)  # SmolLM2-135M
BLOCK = 16
CHUNK = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def tokens_for(mib: int) -> int:
    return max(1, (mib << 20) // LAYOUT.bytes_for(1))


def pool_blocks(tokens: int) -> int:
    return 2 * (-(-tokens // BLOCK)) + 8  # room for a scattered block table


def scattered_table(tokens: int, num_blocks: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.permutation(num_blocks)[: -(-tokens // BLOCK)].tolist()


# -- the sending process ----------------------------------------------------------------------

def quiet_nixl() -> None:
    logging.getLogger("nixl").setLevel(logging.WARNING)  # its agents log their creation at INFO


def sender_main(conn, transport: str, tokens: int, repeats: int) -> None:
    quiet_nixl()
    torch.set_num_threads(1)
    store = PagedKVStore(LAYOUT, pool_blocks(tokens), BLOCK, torch.device("cpu"), shared=transport == "shm")
    store.kv.normal_()
    table = scattered_table(tokens, store.num_blocks, seed=1)
    if transport == "grpc":
        asyncio.run(_grpc_send(conn, store, table, tokens, repeats))
        return
    endpoint = nixl_agent.NixlEndpoint("bench-src", store.kv) if transport == "nixl" else None
    conn.send({"table": table, "shm": store.shared_handle, "nixl": endpoint.source() if endpoint else None})
    c0 = cpu_s()
    while not conn.poll(0.001):  # what `NixlEndpoint.progressing` does on a worker's loop
        if endpoint is not None:
            endpoint._agent.get_new_notifs()
    conn.recv()
    conn.send(cpu_s() - c0)
    if endpoint is not None:
        endpoint.close()


async def _grpc_send(conn, store: PagedKVStore, table: list[int], tokens: int, repeats: int) -> None:
    import grpc

    address = conn.recv()
    rows_per_chunk = max(1, CHUNK // LAYOUT.bytes_per_token_layer)
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                           ("grpc.max_send_message_length", 64 << 20)]) as ch:
        push = ch.stream_unary("/bench.Sink/Push")

        async def messages():
            for layer in range(LAYOUT.num_layers):  # layer by layer, as a prefill hand-off
                for start in range(0, tokens, rows_per_chunk):
                    end = min(tokens, start + rows_per_chunk)
                    chunk = store.read_chunk(layer, layer + 1, slots_for(table, start, end, BLOCK))
                    yield chunk.numpy().tobytes()

        await push(messages(), timeout=600)  # warm-up: the connection, the pages
        conn.send("ready")
        c0 = cpu_s()
        for _ in range(repeats):
            await push(messages(), timeout=600)
        conn.send(cpu_s() - c0)


# -- the receiving process (this one) ---------------------------------------------------------

def _receiver_store(tokens: int) -> tuple[PagedKVStore, list[int]]:
    store = PagedKVStore(LAYOUT, pool_blocks(tokens), BLOCK, torch.device("cpu"))
    return store, scattered_table(tokens, store.num_blocks, seed=2)


async def _grpc_receive(tokens: int, repeats: int, conn) -> tuple[list[float], float]:
    import grpc

    store, table = _receiver_store(tokens)
    rows_per_chunk = max(1, CHUNK // LAYOUT.bytes_per_token_layer)
    times: list[float] = []

    async def sink(request_iterator, context):
        t0 = time.perf_counter()
        layer, start = 0, 0
        async for message in request_iterator:
            end = min(tokens, start + rows_per_chunk)
            kv = torch.frombuffer(bytearray(message), dtype=LAYOUT.dtype).view(1, 2, end - start, LAYOUT.num_kv_heads,
                                                                               LAYOUT.head_dim)
            store.write_chunk(layer, slots_for(table, start, end, BLOCK), kv)
            start = end
            if start >= tokens:
                layer, start = layer + 1, 0
        times.append(time.perf_counter() - t0)
        return b""

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(sink)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(f"127.0.0.1:{port}")
    await asyncio.to_thread(conn.recv)  # "ready": the warm-up is done
    times.clear()
    c0 = cpu_s()
    sender_cpu = await asyncio.to_thread(conn.recv)
    receiver_cpu = cpu_s() - c0
    await server.stop(None)
    return times, receiver_cpu, sender_cpu


def raw(transport: str, mib: int, repeats: int) -> dict:
    torch.set_num_threads(1)  # both sides: a worker's KV copies run on one kv-io thread
    tokens = tokens_for(mib)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=sender_main, args=(child, transport, tokens, repeats), daemon=True)
    proc.start()
    try:
        if transport == "grpc":
            times, receiver_cpu, sender_cpu = asyncio.run(_grpc_receive(tokens, repeats, parent))
        else:
            times, receiver_cpu, sender_cpu = _read_peer(transport, tokens, repeats, parent)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    moved = LAYOUT.bytes_for(tokens)
    gb = moved * repeats / 1e9
    return {"transport": transport, "mib": mib, "bytes": moved, "seconds_median": statistics.median(times),
            "mb_per_s": moved / statistics.median(times) / 1e6, "sender_cpu_s_per_gb": sender_cpu / gb,
            "receiver_cpu_s_per_gb": receiver_cpu / gb, "cpu_s_per_gb": (sender_cpu + receiver_cpu) / gb}


def _read_peer(transport: str, tokens: int, repeats: int, conn) -> tuple[list[float], float, float]:
    torch.set_num_threads(1)
    peer = conn.recv()
    store, table = _receiver_store(tokens)
    times = []
    if transport == "shm":
        pools = shared_memory.PeerPools()
        theirs = pools.open(peer["shm"])

        def once():
            store.copy_from_peer(theirs, slots_for(peer["table"], 0, tokens, BLOCK), store.slots(table, 0, tokens))
    else:
        endpoint = nixl_agent.NixlEndpoint("bench-dst", store.kv)
        source = peer["nixl"]
        remote, local = nixl_agent.read_descriptors(source.address, source.shape, peer["table"],
                                                        store.kv.data_ptr(), tuple(store.kv.shape), table,
                                                        store.kv.element_size(), 0, tokens, 0, LAYOUT.num_layers)

        def once():
            endpoint.read(source, remote, local, timeout_s=120)
    once()  # warm-up: the connection or the mapping, the pages
    c0 = cpu_s()
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    receiver_cpu = cpu_s() - c0
    conn.send("stop")
    sender_cpu = conn.recv()
    # The sender's figure covers the warm-up too (it cannot tell them apart): scale it to the repeats.
    sender_cpu *= repeats / (repeats + 1)
    return times, receiver_cpu, sender_cpu


# -- the real services ------------------------------------------------------------------------

def handoffs(transport: str, n: int) -> dict:
    """n 1,000-token prompts, one at a time, through a smollm2 1P+1D cluster: the prefill worker's
    mean dopd_kv_handoff_seconds and the bytes by transport."""
    from prometheus_client.parser import text_string_to_metric_families

    from services.client import generate
    from services.launcher import Cluster, ClusterSpec, free_port

    spec = ClusterSpec(model="smollm2", prefill=1, decode=1, port=free_port(), http_port=0,
                       log_dir=Path(tempfile.mkdtemp(prefix=f"dopd-bench-kv-{transport}-")), kv_blocks=512,
                       planner="off", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                       extra_env={"DOPD_KV_TRANSPORT": transport})
    cluster = Cluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(600)

        async def run():
            import grpc
            rng = np.random.default_rng(5)
            async with grpc.aio.insecure_channel(cluster.gateway_address) as ch:
                for _ in range(n + 1):  # the first warms the connection up
                    await generate(ch, rng.integers(100, 40000, 1000).tolist(), max_tokens=1, temperature=0.0)

        asyncio.run(run())

        def scrape(name):
            proc = next(p for p in cluster.procs if p.name == name)
            body = urllib.request.urlopen(f"http://{proc.metrics_address}/metrics", timeout=5).read().decode()
            return {s.name + json.dumps(s.labels, sort_keys=True): s.value
                    for f in text_string_to_metric_families(body) for s in f.samples}

        prefill = scrape("prefill-0")
        total = prefill['dopd_kv_handoff_seconds_sum{}']
        count = prefill['dopd_kv_handoff_seconds_count{}']
        sent = {t: prefill.get(f'dopd_kv_transfer_bytes_total{{"direction": "sent", "transport": "{t}"}}', 0.0)
                for t in ("grpc", "nixl")}
        return {"transport": transport, "handoffs": int(count), "mean_handoff_ms": total / count * 1e3,
                "bytes_sent": sent}
    finally:
        cluster.stop()


def migration(transport: str, trials: int) -> dict:
    out = Path(tempfile.mkdtemp()) / f"switch-{transport}.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_role_switch.py"), "--model", "smollm2",
                    "--trials", str(trials), "--transport", transport, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return {"transport": transport, **json.loads(out.read_text())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,16,256", help="MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--handoffs", type=int, default=5)
    p.add_argument("--switch-trials", type=int, default=2)
    p.add_argument("--skip-system", action="store_true", help="only the raw transfers")
    p.add_argument("--out")
    args = p.parse_args()
    quiet_nixl()
    if not nixl_agent.available():
        print("NIXL is not installed (pip install '.[nixl]')", file=sys.stderr)
        return 2
    doc = {"raw": [], "handoff": [], "migration": []}
    print("1. raw KV between two processes (SmolLM2 layout, scattered 16-token blocks), median of "
          f"{args.repeats}:")
    print(f"   {'transport':9} {'size':>8} {'MB/s':>8} {'CPU-s/GB sender':>16} {'receiver':>9} {'both':>6}")
    for mib in [int(x) for x in args.sizes.split(",")]:
        for transport in ("grpc", "shm", "nixl"):
            r = raw(transport, mib, args.repeats)
            doc["raw"].append(r)
            print(f"   {transport:9} {mib:>5} MiB {r['mb_per_s']:8.0f} {r['sender_cpu_s_per_gb']:16.2f} "
                  f"{r['receiver_cpu_s_per_gb']:9.2f} {r['cpu_s_per_gb']:6.2f}", flush=True)
    for mib in sorted({r["mib"] for r in doc["raw"]}):
        by = {r["transport"]: r for r in doc["raw"] if r["mib"] == mib}
        speed = by["nixl"]["mb_per_s"] / by["grpc"]["mb_per_s"]
        cpu = by["nixl"]["cpu_s_per_gb"] / by["grpc"]["cpu_s_per_gb"]
        print(f"   {mib} MiB: nixl/grpc throughput {speed:.2f}x (goal >= 1.5x: {'met' if speed >= 1.5 else 'NOT met'}),"
              f" CPU per GB {cpu:.2f}x (goal <= 0.5x: {'met' if cpu <= 0.5 else 'NOT met'})")
    if not args.skip_system:
        print("\n2. hand-off of a 1,000-token prompt, smollm2 1P+1D (prefill done -> every layer on the decode "
              "worker):")
        for transport in ("grpc", "nixl"):
            r = handoffs(transport, args.handoffs)
            doc["handoff"].append(r)
            print(f"   {transport:5} mean {r['mean_handoff_ms']:7.1f} ms over {r['handoffs']} hand-offs; "
                  f"bytes sent by transport {r['bytes_sent']}", flush=True)
        print(f"\n3. decode -> decode migration of 16 running requests (bench_role_switch.py, smollm2, "
              f"{args.switch_trials} trials):")
        for transport in ("grpc", "shm", "nixl"):
            r = migration(transport, args.switch_trials)
            doc["migration"].append(r)
            figs = {f["name"]: f for f in r.get("figures", [])}
            summary = ", ".join(f"{k}: {v['value']:.1f} {v.get('unit', '')}".strip() for k, v in figs.items()
                                if any(w in k for w in ("decode -> prefill p50", "migration rate", "KV migrated")))
            print(f"   {transport:5} {summary}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
