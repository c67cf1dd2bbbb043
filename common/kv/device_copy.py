"""KV between a GPU pool and the host, never blocking the event loop's thread.

Every KV transfer crosses the host: a prefill worker's layers leave its GPU for the wire, a decode
worker's chunks go from the wire into its pool. On CUDA both directions go through pinned host
buffers and run on side streams of their own (one per device and direction), so a copy neither
waits behind the model's kernels on the compute stream nor makes them wait:

- out (`start_to_host`, from the thread that computed the tensor): the side stream waits for the
  compute stream's work so far, copies into a pinned buffer (`non_blocking`) and records an event;
  whoever consumes the bytes waits for that event, on the loop with `await HostCopy.ready()` (the
  wait itself runs on a worker thread) or blocking with `HostCopy.wait()` on a worker thread.
- in (`on_side_stream`, on a worker thread: services/kvtransfer/receiver.py puts it there): the
  write runs with the side stream current, stages host bytes through a pinned buffer
  (`to_device`: a `non_blocking` copy) and waits for the stream before it returns, so the KV is
  in the pool before anyone is told it is.

On a CPU pool nothing here copies or changes threads: a host tensor is already where it goes,
and writes run inline, as they always have.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

_streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def pool_device(store) -> torch.device:
    """Where a KV store keeps its bytes (a store without memory, the sim engine's, counts as CPU)."""
    kv = getattr(store, "kv", None)
    return kv.device if isinstance(kv, torch.Tensor) else torch.device("cpu")


def side_stream(device: torch.device | str, purpose: str) -> torch.cuda.Stream:
    """The side stream of this CUDA device for `purpose` ("out" or "in"), created once."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _streams_lock:
        stream = _streams.get((device, purpose))
        if stream is None:
            stream = _streams[(device, purpose)] = torch.cuda.Stream(device)
        return stream


@contextlib.contextmanager
def _current(device: torch.device, purpose: str) -> Iterator[torch.cuda.Stream]:
    stream = side_stream(device, purpose)
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        yield stream


@dataclass
class HostCopy:
    """A tensor on its way into host memory: its bytes are there once `wait()` or `ready()`
    returns. `event` is None for a tensor that was already on the host."""

    tensor: torch.Tensor
    event: torch.cuda.Event | None = None

    def wait(self) -> torch.Tensor:
        """Blocking: for worker threads only."""
        if self.event is not None:
            self.event.synchronize()
        return self.tensor

    async def ready(self) -> torch.Tensor:
        """On the event loop: a copy still running is waited for on a worker thread."""
        if self.event is not None and not self.event.query():
            await asyncio.to_thread(self.event.synchronize)
        return self.tensor


def start_to_host(tensor: torch.Tensor) -> HostCopy:
    """Start copying `tensor` into pinned host memory on the device's "out" side stream, behind
    the work already queued on the calling thread's current stream (which produced it). A host
    tensor is returned as is: no copy."""
    if not tensor.is_cuda:
        return HostCopy(tensor)
    producer = torch.cuda.current_stream(tensor.device)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    with _current(tensor.device, "out") as stream:
        stream.wait_stream(producer)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    # The source was allocated on another stream: keep its memory from being reused before the
    # side stream has read it (the caller drops its reference at once).
    tensor.record_stream(stream)
    return HostCopy(host, event)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Blocking `start_to_host(...).wait()`: for worker threads only."""
    return start_to_host(tensor).wait()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`. Host to CUDA goes through a pinned buffer, `non_blocking` on the
    current stream: run it under `on_side_stream`, which waits for the stream before returning.
    Anything else moves as `.to` moves it (nothing at all for a CPU tensor going to the CPU)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.is_cuda:
        return tensor.to(device)
    pinned = tensor if tensor.is_pinned() else torch.empty(tensor.shape, dtype=tensor.dtype,
                                                           pin_memory=True).copy_(tensor)
    return pinned.to(device, non_blocking=True)


def on_side_stream(device: torch.device, fn: Callable[..., T], *args, purpose: str = "in") -> T:
    """Blocking, for a worker thread: `fn(*args)` with the device's side stream current, then wait
    until the stream has done it. On a CPU, just `fn(*args)`."""
    if not is_cuda(device):
        return fn(*args)
    with _current(torch.device(device), purpose) as stream:
        result = fn(*args)
    stream.synchronize()
    return result
