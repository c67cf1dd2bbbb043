"""A copy into a reservation's blocks on another thread, that the reservation waits for: the one
way every transport writes a peer's KV into this worker's pool."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

Reservation = Any  # the sink's own (services/kvtransfer/receiver.KVSink)


async def guarded(sink, seq: Reservation, executor: Executor | None, fn, *args):
    """Run a copy into `seq`'s blocks on `executor`: until it has ended (not merely until its
    awaiting coroutine was cancelled, the client gone), a release of `seq` waits and its blocks
    are lent to no one else."""
    sink.copying(seq)
    copy = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    copy.add_done_callback(lambda _: sink.copied(seq))
    return await settled(copy)


async def settled(copy: asyncio.Future):
    """The result of a copy into the pool running on another thread. Only the receiving coroutine
    ends a reservation that is still receiving its KV, and only once no copy into its blocks runs:
    a push cancelled mid-copy waits for the copy before it frees them."""
    cancelled = False
    while True:
        try:
            copied = await asyncio.shield(copy)
            break
        except asyncio.CancelledError:
            if copy.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return copied
