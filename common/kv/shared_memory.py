"""KV pools in memory that another worker on the same host can map: the `shm` KV transport.

A CPU worker's pool lives in an anonymous memory file (memfd). A peer on the same host maps it
through `/proc/<pid>/fd/<fd>` and copies a migrating request's KV straight out of the source's
blocks into its own: one copy, no serialisation, no socket (gRPC moves ~350 MB/s here while the
source decodes; this moves several GB/s). The bytes are only ever *read* by the peer, never
written: a worker's own memory is written by itself alone, so no block it frees can be scribbled
on by a peer that is late.

There is no file to clean up: the memory goes when the worker and every peer mapping it are gone
(peers drop mappings of workers that no longer exist, services/kvtransfer/peer_pools.py).
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from common.pb import worker_pb2


def available() -> bool:
    """memfd and /proc: Linux."""
    return hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir()


@cache
def host_id() -> str:
    """Same value in every process that can reach this process's /proc/<pid>: the kernel's boot
    id and the pid namespace. Two containers (or pods) on one node share the boot id but not the
    pid namespace, and in each the worker may be pid 1: by boot id alone, a worker would map its
    own pool thinking it was the peer's."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _memfd_name(pool_id: str) -> str:
    return f"dopd-kv-{pool_id}"


@dataclass(frozen=True)
class SharedPoolHandle:
    """Where a worker's pool can be mapped from, by a process on the same host."""

    host_id: str
    pid: int
    fd: int
    pool_id: str  # this pool, not a later one behind a reused pid and fd
    shape: tuple[int, ...]
    dtype: str

    def to_pb(self) -> worker_pb2.SharedPool:
        return worker_pb2.SharedPool(host_id=self.host_id, pid=self.pid, fd=self.fd, pool_id=self.pool_id,
                                     shape=list(self.shape), dtype=self.dtype)

    @classmethod
    def from_pb(cls, pb: worker_pb2.SharedPool) -> SharedPoolHandle:
        return cls(pb.host_id, pb.pid, pb.fd, pb.pool_id, tuple(pb.shape), pb.dtype)


def allocate_shared(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, SharedPoolHandle]:
    """A zeroed tensor in a memfd, every page resident, and the handle peers map it by."""
    numel = math.prod(shape)
    pool_id = uuid.uuid4().hex
    fd = os.memfd_create(_memfd_name(pool_id), os.MFD_CLOEXEC)
    os.ftruncate(fd, numel * dtype.itemsize)
    tensor = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel, dtype=dtype).view(shape)
    tensor.zero_()  # fault every page in now, not during a transfer
    handle = SharedPoolHandle(host_id(), os.getpid(), fd, pool_id, tuple(shape), str(dtype).removeprefix("torch."))
    return tensor, handle
