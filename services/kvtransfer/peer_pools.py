"""The receiving side of the `shm` transport: peers' KV pools on this host, mapped
(common/kv/shared_memory.py allocates them)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from common.kv.layout import dtype_from_name
from common.kv.shared_memory import SharedPoolHandle, _memfd_name, host_id


class PeerPools:
    """The pools of peers on this host, mapped once each (read-only use). A mapping keeps its
    worker's memory alive, so those of workers that are gone are dropped on the next open."""

    def __init__(self) -> None:
        self._mapped: dict[str, tuple[SharedPoolHandle, torch.Tensor]] = {}

    def open(self, handle: SharedPoolHandle) -> torch.Tensor:
        """The peer's pool; raises OSError with the reason when it cannot be mapped from here."""
        hit = self._mapped.get(handle.pool_id)
        if hit is not None:
            return hit[1]
        if not handle.host_id or handle.host_id != host_id():
            raise OSError("the KV's worker is on another host")
        for pool_id, (old, _) in list(self._mapped.items()):
            if not Path(f"/proc/{old.pid}").exists():
                del self._mapped[pool_id]
        try:
            dtype = dtype_from_name(handle.dtype)
        except ValueError as exc:
            raise OSError(str(exc)) from None
        numel = math.prod(handle.shape)
        path = f"/proc/{handle.pid}/fd/{handle.fd}"
        # The memfd's name carries the pool id: this is that pool, not whatever a reused pid and
        # fd (or another namespace's pid) points at now.
        if not os.readlink(path).startswith(f"/memfd:{_memfd_name(handle.pool_id)}"):
            raise OSError(f"{path} is not the KV pool {handle.pool_id}")
        if os.stat(path).st_size != numel * dtype.itemsize:
            raise OSError(f"{path} is not a KV pool of shape {list(handle.shape)}")
        tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(handle.shape)
        self._mapped[handle.pool_id] = (handle, tensor)
        return tensor

