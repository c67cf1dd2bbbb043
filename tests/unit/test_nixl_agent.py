"""The NIXL transport's core (services/kvtransfer/nixl_agent.py): the READ descriptors against a torch
oracle, and real NIXL reads (UCX) from a pool in another process, including one that dies."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch

from services.kvtransfer import nixl_agent
from services.kvtransfer.nixl_agent import NixlEndpoint, NixlError, NixlSource, read_descriptors

needs_nixl = pytest.mark.skipif(not nixl_agent.available(), reason="NIXL is not installed (the nixl extra)")

SHAPE = (2, 3, 9, 4, 2, 8)  # [2, layers, 8 blocks + null, block_size 4, heads, head_dim]


def apply(descs: tuple[np.ndarray, np.ndarray], src: torch.Tensor, dst: torch.Tensor) -> None:
    """What a READ of these rows does, by bytes."""
    src_bytes = src.view(-1).view(torch.uint8)
    dst_bytes = dst.view(-1).view(torch.uint8)
    for (r_addr, length), (l_addr, _) in zip(*descs, strict=True):
        r, d = int(r_addr) - src.data_ptr(), int(l_addr) - dst.data_ptr()
        dst_bytes[d:d + int(length)] = src_bytes[r:r + int(length)]


@pytest.mark.parametrize(("start", "end", "layers"), [(0, 12, (0, 3)), (1, 11, (0, 3)), (5, 6, (1, 2)), (3, 9, (2, 3))])
def test_read_descriptors_move_exactly_the_positions_and_layers_asked(start, end, layers):
    src = torch.randn(SHAPE)
    dst = torch.zeros(SHAPE)
    src_table, dst_table = [3, 0, 5], [7, 2, 1]
    descs = read_descriptors(src.data_ptr(), SHAPE, src_table, dst.data_ptr(), SHAPE, dst_table, 4, start, end,
                             *layers)
    apply(descs, src, dst)
    expected = torch.zeros(SHAPE)
    for p in range(start, end):
        for layer in range(*layers):
            expected[:, layer, dst_table[p // 4], p % 4] = src[:, layer, src_table[p // 4], p % 4]
    assert torch.equal(dst, expected)
    # Positions consecutive in both pools are one row per layer and side.
    runs = len({(src_table[p // 4], dst_table[p // 4]) for p in range(start, end)})
    assert len(descs[0]) == runs * 2 * (layers[1] - layers[0])


def test_read_descriptors_between_pools_of_different_sizes():
    src, dst = torch.randn(SHAPE), torch.zeros((2, 3, 3, 4, 2, 8))
    descs = read_descriptors(src.data_ptr(), SHAPE, [6, 7], dst.data_ptr(), tuple(dst.shape), [1, 0], 4, 0, 8, 0, 3)
    apply(descs, src, dst)
    assert torch.equal(dst[:, :, 1], src[:, :, 6]) and torch.equal(dst[:, :, 0], src[:, :, 7])


def _serve_pool(conn, seed: int) -> None:
    """Another process: a pool registered with its agent; progresses until told to stop."""
    torch.manual_seed(seed)
    pool = torch.randn(SHAPE)
    endpoint = NixlEndpoint("peer", pool)
    conn.send(endpoint.source())
    while not conn.poll(0.001):
        endpoint._agent.get_new_notifs()  # what `progressing` does on a worker's loop
    conn.recv()
    endpoint.close()


def _peer(seed: int):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_pool, args=(child, seed), daemon=True)
    proc.start()
    assert parent.poll(60), "the peer process did not start its agent"
    return proc, parent, parent.recv()


@needs_nixl
def test_a_real_nixl_read_from_another_process_and_a_peer_that_died():
    proc, conn, source = _peer(seed=3)
    try:
        torch.manual_seed(3)
        theirs = torch.randn(SHAPE)
        ours = torch.zeros(SHAPE)
        endpoint = NixlEndpoint("reader", ours)
        try:
            assert NixlSource.from_pb(source.to_pb()) == source
            remote, local = read_descriptors(source.address, source.shape, [3, 0, 5], ours.data_ptr(), SHAPE,
                                             [7, 2, 1], 4, 2, 10, 0, 3)
            assert endpoint.read(source, remote, local, timeout_s=20) == int(local[:, 1].sum())
            for p in range(2, 10):
                assert torch.equal(ours[:, :, [7, 2, 1][p // 4], p % 4], theirs[:, :, [3, 0, 5][p // 4], p % 4])
            # Metadata for another agent than the one named is refused, not trusted.
            with pytest.raises(NixlError, match="not 'someone-else'"):
                endpoint.read(NixlSource("someone-else", source.agent_metadata, source.address, source.shape,
                                         source.dtype, source.device_id, source.mem_type), remote, local, 5)
            # The peer dies: a read ends in NixlError within its deadline, never a hang.
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            started = time.monotonic()
            with pytest.raises(NixlError):
                for _ in range(50):  # a read in flight when the peer died, or one posted after
                    endpoint.read(source, remote, local, timeout_s=2)
            assert time.monotonic() - started < 30
        finally:
            endpoint.close()
    finally:
        if proc.is_alive():
            conn.send("stop")
            proc.join(10)


class _EndedCall:
    def __init__(self, code, details: str) -> None:
        self._code, self._details = code, details

    async def code(self):
        return self._code

    async def details(self):
        return self._details


@pytest.mark.parametrize(("code", "details", "refused"), [
    ("FAILED_PRECONDITION", "this worker does not read KV with NIXL", True),
    ("UNAVAILABLE", f"{nixl_agent.READ_FAILED} decode-1-abc: a NIXL read failed (ERR)", True),
    ("UNAVAILABLE", "the decode worker went away", False),
    ("OK", "", False),
])
async def test_a_staged_hand_off_that_the_receiver_could_not_read_stops_nixl_to_it(code, details, refused):
    """How a prefill worker learns that a decode worker advertising NIXL cannot read it: a
    refusal on `begin`, or a failed read; any other failure says nothing of the transport."""
    import asyncio
    from types import SimpleNamespace

    import grpc

    from services.kvtransfer.staged_sender import StagedSender

    store = SimpleNamespace(slots=lambda blocks, start, end: torch.arange(end))
    noted = []
    from services.kvtransfer import transports

    staging = SimpleNamespace(store=store, transport=transports.get("nixl"))
    staged = StagedSender(asyncio.get_running_loop(), staging, [0], 4, lambda: noted.append(1))
    await staged._note_refusal(_EndedCall(getattr(grpc.StatusCode, code), details))
    assert bool(noted) is refused


def test_what_each_kv_transport_setting_tries_and_reads():
    from services.kvtransfer import transports

    def names(setting):
        return [t.name for t in transports.preference(setting)]

    assert names("auto") == ["nixl", "shm", "grpc"]
    assert names("nixl") == ["nixl", "grpc"]  # gRPC bytes stay the fallback
    assert names("grpc") == ["grpc"]
    assert transports.wants("auto", "shm") and not transports.wants("nixl", "shm")
    with pytest.raises(ValueError, match="DOPD_KV_TRANSPORT"):
        transports.preference("rdma")
