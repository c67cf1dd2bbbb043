"""An in-process KV transport and other fakes for unit tests of the role engines (no gRPC).

`InProcSender` is a PrefillSender (services/kvtransfer/sender.py) that writes a prompt's KV into a
DecodeEngine of the same process, through the real wire format: layers -> ChunkBuilder ->
chunk_message -> parse_chunk -> DecodeEngine.write_kv, then kv_complete, which is what
services/kvtransfer/receiver.py does with a PushKV stream. The gRPC path itself is covered by the
integration tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from common.errors import ServiceError, Unavailable
from common.kv.block_pool import BlockPool
from common.modeling.fake_runner import FakeRunner
from common.modeling.registry import RunnerSpec, build_runner
from common.pb import worker_pb2
from common.types import SamplingParams
from services.decode.engine import DecodeEngine
from services.decode.scheduler import DecodeScheduler, DecodeSeq, SeqState
from services.kvtransfer import wire
from services.kvtransfer.wire import ChunkBuilder

# Fake layout: 32 bytes per (token, layer). One layer per chunk at least, and a layer of more than
# 3 tokens is split by tokens, so both of ChunkBuilder's paths carry KV in these tests.
CHUNK_MIN_BYTES = 1
CHUNK_MAX_BYTES = 96


class InProcSender:
    """A KV push into `engine`'s reservation for `request_id`.

    Opening it is the receiver's `begin` (expect_kv: the reservation must exist, its KV timer
    stops). Layers come from the forward thread and reach the loop thread in order
    (call_soon_threadsafe); `finish` is queued behind them, so the end never overtakes a layer. A
    failure on the receiving side fails the hand-off with Unavailable, as a broken gRPC push does;
    a cancel fails a reservation still waiting for its KV, as the receiver does when the stream
    breaks off.
    """

    def __init__(self, engine: DecodeEngine, request_id: str, num_tokens: int, min_bytes: int = CHUNK_MIN_BYTES,
                 max_bytes: int = CHUNK_MAX_BYTES) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine = engine
        self.request_id = request_id
        self.num_tokens = num_tokens
        self.layout = engine.runner.store.layout
        self._builder = ChunkBuilder(self.layout, num_tokens, min_bytes, max_bytes)
        self._written = torch.zeros(self.layout.num_layers, num_tokens, dtype=torch.bool)
        self._done: asyncio.Future[int] = self._loop.create_future()
        self.seq: DecodeSeq | None = None
        self.bytes = 0
        self.chunks = 0
        self.cancelled = False
        self.done_at: float | None = None
        try:
            self.seq = engine.expect_kv(request_id, num_tokens)
        except ServiceError as exc:
            self._break(exc)

    # -- PrefillSender ------------------------------------------------------------------------
    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """From the forward thread: k, v are this request's [kv_heads, tokens, head_dim] of `layer`."""
        self._loop.call_soon_threadsafe(self._on_layer, layer, k, v)

    def finish(self, first_token_id: int) -> None:
        self._loop.call_soon_threadsafe(self._on_finish, first_token_id)

    def cancel(self) -> None:
        if self._done.done():
            return
        self.cancelled = True
        self._fail_reservation(Unavailable(f"KV push for request {self.request_id!r} broke off"))
        self._done.cancel()

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    # -- the receiving side, on the loop thread -----------------------------------------------
    def _on_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._done.done():
            return
        kv = torch.stack([k, v]).transpose(1, 2)  # [2, tokens, heads, head_dim], as KVSender builds it
        self._write(self._builder.add_layer(layer, kv))

    def _on_finish(self, first_token_id: int) -> None:
        if self._done.done():
            return
        self._write(self._builder.flush())
        if self._done.done():
            return
        if not bool(self._written.all()):
            self._break(wire.WireError(f"{int((~self._written).sum())} (layer, token) cells never arrived"))
            return
        try:
            self.engine.kv_complete(self.request_id, first_token_id)
        except ServiceError as exc:
            self._break(exc)
            return
        self.done_at = time.perf_counter()
        self._done.set_result(self.bytes)

    def _write(self, chunks: list[wire.KVChunk]) -> None:
        try:
            for chunk in chunks:
                message = wire.chunk_message(chunk)
                parsed = wire.parse_chunk(message.chunk, self.layout, self.num_tokens)
                self.engine.write_kv(self.seq, parsed)
                self._written[parsed.layer_start:parsed.layer_end, parsed.token_start:parsed.token_end] = True
                self.bytes += len(message.chunk.data)
                self.chunks += 1
        except (wire.WireError, ServiceError) as exc:
            self._break(exc)

    def _break(self, exc: Exception) -> None:
        self._fail_reservation(exc if isinstance(exc, ServiceError) else Unavailable(str(exc)))
        if not self._done.done():
            self._done.set_exception(Unavailable(f"in-process KV push for {self.request_id!r} failed: {exc}"))

    def _fail_reservation(self, error: ServiceError) -> None:
        seq = self.seq
        if seq is not None and self.engine.scheduler.seqs.get(seq.request_id) is seq \
                and seq.state is SeqState.WAITING_KV:
            self.engine.fail(seq.request_id, error)


class InProcTransport:
    """`open_sender` for a PrefillEngine: decode addresses name DecodeEngines of this process."""

    def __init__(self, engines: dict[str, DecodeEngine]) -> None:
        self.engines = engines
        self.senders: dict[str, InProcSender] = {}

    def open_sender(self, address: str, request_id: str, num_tokens: int, timeout: float) -> InProcSender:
        sender = InProcSender(self.engines[address], request_id, num_tokens)
        self.senders[request_id] = sender
        return sender


async def push_prompt(engine: DecodeEngine, request_id: str, prompt: list[int],
                      params: SamplingParams | None = None) -> int:
    """A prefill worker's part for one prompt, without its engine: the fake runner's prefill, its
    KV pushed into `engine`'s reservation; returns the first token."""
    sender = InProcSender(engine, request_id, len(prompt))
    [first] = FakeRunner(1, 1).prefill_sample([prompt], [params or SamplingParams()], sender.put_layer)
    sender.finish(first)
    await sender.wait()
    return first


def write_messages(engine: DecodeEngine, seq: DecodeSeq, messages: list[worker_pb2.KVPush], num_tokens: int) -> int:
    """Write PushKV chunk messages (e.g. read_messages' output) into `seq`'s blocks, as the
    receiver does; `num_tokens` is what the transfer's begin announced. Returns the bytes."""
    layout = engine.runner.store.layout
    for message in messages:
        engine.write_kv(seq, wire.parse_chunk(message.chunk, layout, num_tokens))
    return sum(len(m.chunk.data) for m in messages)


class GatedRunner:
    """A runner whose forward passes wait at a gate, so that a test can hold one in flight."""

    def __init__(self, inner: FakeRunner) -> None:
        self.inner = inner
        self.store = inner.store
        self._gate = threading.Event()
        self._gate.set()
        self._entered = threading.Event()

    def close(self) -> None:
        self._entered.clear()
        self._gate.clear()

    def open(self) -> None:
        self._gate.set()

    async def wait_entered(self, timeout: float = 5.0) -> None:
        """Until a forward pass is blocked at the (closed) gate."""
        deadline = time.monotonic() + timeout
        while not self._entered.is_set():
            assert time.monotonic() < deadline, "no forward pass started"
            await asyncio.sleep(0.001)

    def _pass(self) -> None:
        self._entered.set()
        assert self._gate.wait(5.0), "gate never opened"

    def prefill_sample(self, *args):
        self._pass()
        return self.inner.prefill_sample(*args)

    def decode_sample(self, *args):
        self._pass()
        return self.inner.decode_sample(*args)

    def mixed_sample(self, *args):
        self._pass()
        return self.inner.mixed_sample(*args)


def fake_runner(kv_blocks: int, block_size: int) -> FakeRunner:
    return build_runner(RunnerSpec(model="fake:", kv_blocks=kv_blocks, block_size=block_size)).runner


@contextlib.asynccontextmanager
async def running_decode(kv_blocks: int = 64, block_size: int = 4, max_batch_size: int = 8,
                         kv_timeout_s: float = 5.0, gated: bool = False, start: bool = True,
                         step_token_budget: int = 2048, waiting_limit: int = 1024):
    """A DecodeEngine over its own fake runner, pool and one-thread model executor."""
    runner = fake_runner(kv_blocks, block_size)
    model = GatedRunner(runner) if gated else runner
    executor = ThreadPoolExecutor(max_workers=1)
    engine = DecodeEngine(model, DecodeScheduler(BlockPool(kv_blocks, block_size), max_batch_size), executor,
                          kv_timeout_s, step_token_budget, waiting_limit)
    if start:
        engine.start()
    try:
        yield engine
    finally:
        if gated:
            model.open()
        await engine.stop()
        executor.shutdown(wait=True)


def assert_decode_empty(engine: DecodeEngine) -> None:
    """The leak check: every block back in the pool, no request left in the scheduler."""
    sched = engine.scheduler
    assert sched.pool.num_used == 0 and sched.pool.num_free == sched.pool.num_blocks
    assert sched.seqs == {} and not sched.has_work()
