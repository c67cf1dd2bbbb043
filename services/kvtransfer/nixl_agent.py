"""KV bytes through NIXL (the transfer library Dynamo, vLLM and SGLang move KV with; UCX backend):
the `nixl` transport.

The same shape as the shm transport (common/kv/shared_memory.py): the receiver reads a request's
KV straight out of the sender's pool into its own blocks, on `ready` notices that come over the
PushKV control stream, and a worker only ever writes its own memory. What differs is how the
bytes move: a NIXL READ between registered memory regions, which UCX carries between processes
on one host (shared memory, CMA), between hosts (TCP, RDMA) and from GPU memory (VRAM) with no
host copy, where a memfd mapping serves CPU pools on one host only.

- One agent per worker (`NixlEndpoint`), its KV pool registered once, at start-up.
- `begin.shared.nixl` (`NixlSource`) carries the sender's agent metadata, loaded once per peer
  agent (agent names carry a per-process nonce: a restarted peer is a new agent), and where its
  pool is: address, shape, dtype, device.
- A READ is posted and polled to completion off the event loop (a thread of the receiver's),
  within a deadline: a peer that dies mid-read ends in an error, never a hang. A read past its
  deadline is cancelled (or waited for, a while longer) before the error is raised: the caller
  keeps the blocks it reads into out of use until then.
- No NIXL progress thread: it polls without pause (in a scratch probe here, the idle source
  process of three 64 MiB reads used 0.59 CPU-s with it, 0.06 with this pumping). UCX still
  needs the side that is read from to progress (connection wire-up), so a sender progresses its
  agent every millisecond while a push of its is open (`hold_progress`), and not at all otherwise.
- The agent is made with NIXL_THREAD_SYNC_STRICT: the loop thread (progress) and the kv-io
  thread (reads) both call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from common.pb import worker_pb2

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.001  # how often a sender that is being read from progresses its agent
MAX_PEERS = 64  # remote agents kept loaded; the least recently used goes first
POLL_PAUSE_S = 0.0001  # between two polls of a READ in flight (a busy poll would take a core)


@cache
def _api():
    """NIXL's Python API: the build for torch's CUDA major first (nixl-cu13 or nixl-cu12; either
    moves host memory), then the `nixl` meta-package; None when none imports."""
    import importlib

    cuda = (torch.version.cuda or "").split(".")[0]
    names = [f"nixl_cu{cuda}"] if cuda else []
    names += [n for n in ("nixl_cu12", "nixl_cu13", "nixl") if n not in names]
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "nixl_agent"):
            return module
    return None


def available() -> bool:
    """NIXL is installed (the `nixl` extra)."""
    return _api() is not None


class NixlError(OSError):
    """A NIXL transfer that failed, or did not finish within its deadline."""


# How a receiver's error for a failed NIXL read begins (UNAVAILABLE): the sender then stops
# offering NIXL to that worker (a pair whose agents load but cannot connect, say).
READ_FAILED = "reading KV with NIXL from"


@dataclass(frozen=True)
class NixlSource:
    """Where a peer's pool is, for a READ: its agent and its registered tensor."""

    agent_name: str
    agent_metadata: bytes
    address: int
    shape: tuple[int, ...]  # [2, layers, blocks + 1, block_size, heads, head_dim]
    dtype: str
    device_id: int
    mem_type: str  # DRAM or VRAM

    def to_pb(self) -> worker_pb2.NixlPool:
        return worker_pb2.NixlPool(agent_name=self.agent_name, agent_metadata=self.agent_metadata,
                                   address=self.address, shape=list(self.shape), dtype=self.dtype,
                                   device_id=self.device_id, mem_type=self.mem_type)

    @classmethod
    def from_pb(cls, pb: worker_pb2.NixlPool) -> NixlSource:
        return cls(pb.agent_name, pb.agent_metadata, pb.address, tuple(pb.shape), pb.dtype, pb.device_id, pb.mem_type)


def _mem_type(tensor: torch.Tensor) -> str:
    return "VRAM" if tensor.is_cuda else "DRAM"


def _device_id(tensor: torch.Tensor) -> int:
    return tensor.get_device() if tensor.is_cuda else 0


def read_descriptors(src_base: int, src_shape: tuple[int, ...], src_table: list[int], dst_base: int,
                     dst_shape: tuple[int, ...], dst_table: list[int], itemsize: int, start: int, end: int,
                     layer_start: int, layer_end: int) -> tuple[np.ndarray, np.ndarray]:
    """(remote, local) byte ranges, as NIXL's Nx2 (address, length) rows, of positions [start,
    end) of layers [layer_start, layer_end), K and V, from a pool laid out as `src_shape` with
    block table `src_table` into one laid out as `dst_shape` with `dst_table` (both [2, layers,
    blocks + 1, block_size, heads, head_dim], the same block size). Positions contiguous in both
    pools make one row per layer and side."""
    _, layers, src_blocks, block_size, heads, head_dim = src_shape
    dst_blocks = dst_shape[2]
    row = heads * head_dim * itemsize  # one position of one layer and side
    positions = np.arange(start, end, dtype=np.int64)
    src_slots = np.asarray(src_table, dtype=np.int64)[positions // block_size] * block_size + positions % block_size
    dst_slots = np.asarray(dst_table, dtype=np.int64)[positions // block_size] * block_size + positions % block_size
    # Runs of positions that are consecutive in both pools.
    breaks = np.flatnonzero((np.diff(src_slots) != 1) | (np.diff(dst_slots) != 1)) + 1
    run_starts = np.concatenate(([0], breaks))
    run_lengths = np.diff(np.concatenate((run_starts, [len(positions)])))
    planes = np.array([(side * layers + layer) for side in range(2) for layer in range(layer_start, layer_end)],
                      dtype=np.int64)
    src_off = (planes[:, None] * src_blocks * block_size + src_slots[run_starts][None, :]) * row
    dst_off = (planes[:, None] * dst_blocks * block_size + dst_slots[run_starts][None, :]) * row
    lengths = np.broadcast_to(run_lengths[None, :] * row, src_off.shape).ravel()
    remote = np.stack([src_base + src_off.ravel(), lengths], axis=1)
    local = np.stack([dst_base + dst_off.ravel(), lengths], axis=1)
    return remote, local


class NixlEndpoint:
    """This worker's NIXL agent and its registered KV pool."""

    def __init__(self, worker_id: str, pool: torch.Tensor) -> None:
        api = _api()
        if api is None:
            raise NixlError("NIXL is not installed (pip install '.[nixl]')")
        if not pool.is_contiguous():
            raise ValueError("a NIXL-registered KV pool must be contiguous")
        self.name = f"{worker_id}-{uuid.uuid4().hex[:12]}"
        self._agent = api.nixl_agent(self.name, api.nixl_agent_config(
            enable_prog_thread=False, backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        if "UCX" not in self._agent.backends:
            raise NixlError("NIXL has no UCX backend here")
        self.pool = pool
        self._registered = self._agent.register_memory(pool)
        self._metadata = self._agent.get_agent_metadata()
        self._peers: OrderedDict[str, None] = OrderedDict()
        self._peers_lock = threading.Lock()
        self._progressing = 0
        self._progress_task: asyncio.Task | None = None

    def source(self) -> NixlSource:
        return NixlSource(self.name, self._metadata, self.pool.data_ptr(), tuple(self.pool.shape),
                          str(self.pool.dtype).removeprefix("torch."), _device_id(self.pool), _mem_type(self.pool))

    # -- the side read from ------------------------------------------------------------------
    def hold_progress(self) -> None:
        """From the loop: a push whose receiver reads from us is open; until as many
        `release_progress`, this agent progresses every PROGRESS_EVERY_S."""
        self._progressing += 1
        if self._progress_task is None or self._progress_task.done():
            self._progress_task = asyncio.get_running_loop().create_task(self._progress_loop(),
                                                                         name="nixl-progress")

    def release_progress(self) -> None:
        self._progressing -= 1

    async def _progress_loop(self) -> None:
        while self._progressing > 0:
            self._agent.get_new_notifs()  # drives UCX's progress; notifications are not used
            await asyncio.sleep(PROGRESS_EVERY_S)

    # -- the reading side --------------------------------------------------------------------
    def connect(self, source: NixlSource) -> None:
        """Load the peer's metadata now (a receiver does it on `begin`, before it reserves
        anything): NixlError when it cannot."""
        try:
            self._peer(source)
        except NixlError:
            raise
        except Exception as exc:  # noqa: BLE001 - NIXL's bindings raise their own
            raise NixlError(f"cannot load NIXL agent {source.agent_name}: {type(exc).__name__}: {exc}") from None

    def _peer(self, source: NixlSource) -> str:
        with self._peers_lock:  # the loop (connect) and the read thread both get here
            return self._load_peer(source)

    def _load_peer(self, source: NixlSource) -> str:
        if source.agent_name in self._peers:
            self._peers.move_to_end(source.agent_name)
            return source.agent_name
        loaded = self._agent.add_remote_agent(source.agent_metadata)
        name = loaded.decode() if isinstance(loaded, bytes) else loaded
        if name != source.agent_name:
            if name not in self._peers:  # loaded just now for nothing (a known one stays)
                self._agent.remove_remote_agent(name)
            raise NixlError(f"the NIXL metadata sent is for agent {name!r}, not {source.agent_name!r}")
        self._peers[name] = None
        while len(self._peers) > MAX_PEERS:
            old, _ = self._peers.popitem(last=False)
            self._agent.remove_remote_agent(old)
        return name

    def read(self, source: NixlSource, remote: np.ndarray, local: np.ndarray, timeout_s: float) -> int:
        """Blocking (a worker thread, never the loop): READ `remote` rows of the source's memory
        into `local` rows of ours; returns the bytes read. NixlError when it fails or is not done
        within `timeout_s`."""
        if len(remote) == 0:
            return 0
        try:
            self._read(source, remote, local, timeout_s)
        except NixlError:
            raise
        except Exception as exc:  # noqa: BLE001 - NIXL's bindings raise their own (a peer gone, ...)
            raise NixlError(f"a NIXL read from {source.agent_name} failed: {type(exc).__name__}: {exc}") from None
        return int(local[:, 1].sum())

    def _read(self, source: NixlSource, remote: np.ndarray, local: np.ndarray, timeout_s: float) -> None:
        peer = self._peer(source)
        device = np.uint64(source.device_id)
        remote_descs = self._agent.get_xfer_descs(_rows(remote, device), source.mem_type)
        local_descs = self._agent.get_xfer_descs(_rows(local, np.uint64(_device_id(self.pool))),
                                                 _mem_type(self.pool))
        handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, peer)
        state = self._agent.transfer(handle)
        deadline = time.monotonic() + timeout_s
        while state == "PROC" and time.monotonic() < deadline:
            time.sleep(POLL_PAUSE_S)
            state = self._agent.check_xfer_state(handle)
        if state == "PROC":
            # Past its deadline. Its bytes may still land in our blocks, so this call does not
            # return (and the caller keeps the blocks out of use, services/kvtransfer/copying.guarded) until NIXL
            # has cancelled it, or it ended, or another `timeout_s` has gone by.
            state = self._cancel(handle, time.monotonic() + timeout_s)
            raise NixlError(f"a NIXL read from {source.agent_name} was not done within {timeout_s:.1f} s"
                            + ("" if state != "PROC" else "; it could not be cancelled either"))
        with contextlib.suppress(Exception):
            self._agent.release_xfer_handle(handle)
        if state != "DONE":
            raise NixlError(f"a NIXL read from {source.agent_name} failed ({state})")

    def _cancel(self, handle, until: float) -> str:
        """Release a transfer in flight (NIXL cancels it), or wait for it to end; its last state."""
        state = "PROC"
        while time.monotonic() < until:
            try:
                self._agent.release_xfer_handle(handle)
                return "CANCELLED"
            except Exception:  # noqa: BLE001 - still in flight: NIXL cannot cancel it yet
                pass
            time.sleep(POLL_PAUSE_S * 10)
            try:
                state = self._agent.check_xfer_state(handle)
            except Exception:  # noqa: BLE001 - it ended in an error
                return "ERR"
            if state != "PROC":
                return state
        log.error("a NIXL read past its deadline could neither be cancelled nor ended: its blocks may still be "
                  "written")
        return state

    def forget(self, agent_name: str) -> None:
        """Drop a peer agent (its worker is gone)."""
        with self._peers_lock:
            if agent_name in self._peers:
                del self._peers[agent_name]
                with contextlib.suppress(Exception):
                    self._agent.remove_remote_agent(agent_name)

    def close(self) -> None:
        """After the reads have ended (the caller's executor drained)."""
        self._progressing = 0
        if self._progress_task is not None:
            self._progress_task.cancel()
        for name in list(self._peers):
            self.forget(name)
        with contextlib.suppress(Exception):
            self._agent.deregister_memory(self._registered)


def _rows(address_length: np.ndarray, device: np.uint64) -> np.ndarray:
    """Nx2 (address, length) as NIXL's Nx3 (address, length, device id)."""
    out = np.empty((len(address_length), 3), dtype=np.uint64)
    out[:, :2] = address_length
    out[:, 2] = device
    return out
