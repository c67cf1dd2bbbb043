"""Fuzzing (hypothesis) of the KV wire's receiving side: what a peer worker sends in a PushKV
stream (services/kvtransfer/wire.py, services/kvtransfer/receiver.py).

- parse_begin: a valid begin with its fields mutated (layout, token count, request id, dtype
  names) parses to its token count exactly when it matches the pool's layout and announces at
  least one token, and raises WireError otherwise.
- parse_chunk: valid chunks (ChunkBuilder over random KV) with mutated layer and token ranges and
  truncated, extended or garbled bytes either parse to a tensor whose ranges lie inside the
  transfer and whose shape and size match them (and which writes into a buffer of the transfer's
  shape), or raise WireError; an unmutated chunk parses to the bytes that were sent.
- random bytes as a KVPush: protobuf's DecodeError, or a message whose parts only raise WireError.
- receive_kv on a real DecodeEngine (fake runner, in process): random PushKV streams (valid ones,
  and ones with a wrong or missing begin, an unknown request, wrong layouts and token counts,
  migrations with bad sizes or tokens, dropped, duplicated, garbled and out-of-range chunks,
  stray ready/begin messages, missing or bad ends) either complete the reservation with every
  cell of its KV as sent, or raise a domain error (common/errors.ServiceError) after failing it.
  Never another exception, never a byte written outside the request's blocks, and after the
  request is released every block is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from common.convert import sampling_to_pb
from common.errors import ServiceError
from common.kv.block_pool import kv_tokens_for
from common.kv.kv_store import PagedKVStore
from common.kv.layout import KVLayout, dtype_from_name
from common.modeling.fake_runner import FAKE_LAYOUT, FAKE_VOCAB
from common.pb import worker_pb2 as pb
from common.types import SamplingParams
from services.decode.engine import ErrorEvent
from services.decode.scheduler import SeqState
from services.kvtransfer.peer_pools import PeerPools
from services.kvtransfer.receiver import receive_kv
from services.kvtransfer.transports import SharedReads
from services.kvtransfer.wire import (
    ChunkBuilder,
    KVChunk,
    WireError,
    begin_message,
    chunk_message,
    end_message,
    parse_begin,
    parse_chunk,
)
from tests.unit.inproc_kv import assert_decode_empty, running_decode

# database=None: no .hypothesis directory left behind; a failure prints how to reproduce it.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # protobuf strings are UTF-8
LAYOUTS = st.builds(KVLayout, num_layers=st.integers(1, 4), num_kv_heads=st.integers(1, 3),
                    head_dim=st.sampled_from([1, 2, 4, 8]), dtype=st.sampled_from(DTYPES))


def wire(msg: pb.KVPush) -> pb.KVPush:
    return pb.KVPush.FromString(msg.SerializeToString())


def near(value: int) -> st.SearchStrategy[int]:
    """An int close to `value` (the interesting edges) or anywhere in int32."""
    return st.one_of(st.integers(value - 2, value + 2), st.integers(-3, 3), INT32)


def random_kv(layout: KVLayout, num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.num_layers, 2, num_tokens, layout.num_kv_heads, layout.head_dim,
                       generator=g).to(layout.dtype)


def build_chunks(layout: KVLayout, kv: torch.Tensor, min_bytes: int, max_bytes: int) -> list[KVChunk]:
    builder = ChunkBuilder(layout, kv.shape[2], min_bytes, max_bytes)
    chunks: list[KVChunk] = []
    for layer in range(layout.num_layers):
        chunks += builder.add_layer(layer, kv[layer])
    return chunks + builder.flush()


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, to compare without NaN != NaN (garbled bytes make NaNs)."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


# -- parse_begin ---------------------------------------------------------------------------------

@FUZZ
@given(layout=LAYOUTS, num_tokens=st.integers(1, 4096), data=st.data())
def test_parse_begin_matches_its_layout_or_raises_wire_error(layout, num_tokens, data):
    msg = begin_message("req", num_tokens, layout)
    begin = msg.begin
    for name, strategy in [("request_id", TEXT), ("num_tokens", near(num_tokens)),
                           ("num_layers", near(layout.num_layers)), ("num_kv_heads", near(layout.num_kv_heads)),
                           ("head_dim", near(layout.head_dim)),
                           ("dtype", st.sampled_from(["float32", "float16", "bfloat16", "int8", "Float32"]) | TEXT)]:
        if data.draw(st.booleans(), label=f"mutate {name}"):
            setattr(begin, name, data.draw(strategy, label=name))
    begin = wire(msg).begin
    matches = (begin.num_layers, begin.num_kv_heads, begin.head_dim, begin.dtype) == (
        layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype_name)
    try:
        got = parse_begin(begin, layout)
    except WireError as exc:
        assert str(exc)
        assert not (matches and begin.num_tokens >= 1), f"a matching begin was refused: {exc}"
        return
    assert matches and got == begin.num_tokens >= 1


# -- parse_chunk ---------------------------------------------------------------------------------

def mutate_chunk(data, msg: pb.KVPush, layout: KVLayout) -> bool:
    """Mutate some of a chunk message's fields in place; whether anything was drawn to change.
    "fit" gives the bytes the (mutated) ranges call for, random: such a chunk is well formed."""
    chunk = msg.chunk
    if data.draw(st.integers(0, 3), label="leave it as it is") == 0:
        return False
    changed = False
    for name in ("layer_start", "layer_end", "token_start", "token_end"):
        if data.draw(st.integers(0, 2), label=f"mutate {name}") == 0:
            setattr(chunk, name, data.draw(near(getattr(chunk, name)), label=name))
            changed = True
    how = data.draw(st.sampled_from(["keep", "keep", "fit", "fit", "truncate", "extend", "garble", "empty", "random"]),
                    label="bytes")
    payload = chunk.data
    size = (chunk.layer_end - chunk.layer_start) * (chunk.token_end - chunk.token_start) * layout.bytes_per_token_layer
    if how == "fit" and 0 < size <= 1 << 16:
        chunk.data = random.Random(data.draw(st.integers(0, 2**16), label="fill")).randbytes(size)
    elif how == "truncate" and payload:
        chunk.data = payload[:data.draw(st.integers(0, len(payload) - 1), label="cut at")]
    elif how == "extend":
        chunk.data = payload + data.draw(st.binary(min_size=1, max_size=64), label="tail")
    elif how == "garble" and payload:
        at = data.draw(st.integers(0, len(payload) - 1), label="garble at")
        chunk.data = payload[:at] + bytes([payload[at] ^ 0xFF]) + payload[at + 1:]
    elif how == "empty":
        chunk.data = b""
    elif how == "random":
        chunk.data = data.draw(st.binary(max_size=512), label="random bytes")
    return changed or how != "keep"


@FUZZ
@given(layout=LAYOUTS, num_tokens=st.integers(1, 24), seed=st.integers(0, 2**16),
       min_bytes=st.integers(1, 2048), extra=st.integers(0, 4096), data=st.data())
def test_parse_chunk_stays_in_range_or_raises_wire_error(layout, num_tokens, seed, min_bytes, extra, data):
    kv = random_kv(layout, num_tokens, seed)
    chunks = build_chunks(layout, kv, min_bytes, min_bytes + extra)
    i = data.draw(st.integers(0, len(chunks) - 1), label="chunk")
    msg = chunk_message(chunks[i])
    mutated = mutate_chunk(data, msg, layout)
    msg = wire(msg)
    c = msg.chunk
    try:
        parsed = parse_chunk(c, layout, num_tokens)
    except WireError as exc:
        event("chunk refused")
        assert str(exc) and mutated, f"an unmutated chunk was refused: {exc}"
        return
    event("chunk parsed" + (" (mutated)" if mutated else ""))
    assert 0 <= parsed.layer_start < parsed.layer_end <= layout.num_layers
    assert 0 <= parsed.token_start < parsed.token_end <= num_tokens
    assert (parsed.layer_start, parsed.layer_end, parsed.token_start, parsed.token_end) == (
        c.layer_start, c.layer_end, c.token_start, c.token_end)
    shape = (parsed.layer_end - parsed.layer_start, 2, parsed.token_end - parsed.token_start,
             layout.num_kv_heads, layout.head_dim)
    assert tuple(parsed.kv.shape) == shape and parsed.kv.dtype == layout.dtype
    assert parsed.kv.nbytes == len(c.data)
    # It writes into a buffer of the transfer's shape, and nowhere else.
    out = torch.zeros(layout.num_layers, 2, num_tokens, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
    out[parsed.layer_start:parsed.layer_end, :, parsed.token_start:parsed.token_end] = parsed.kv
    outside = torch.ones(layout.num_layers, num_tokens, dtype=torch.bool)
    outside[parsed.layer_start:parsed.layer_end, parsed.token_start:parsed.token_end] = False
    assert not raw(out.transpose(1, 2)[outside]).any()
    if not mutated:
        src = chunks[i]
        expected = kv[src.layer_start:src.layer_end, :, src.token_start:src.token_end]
        assert torch.equal(raw(parsed.kv), raw(expected))


@FUZZ
@given(blob=st.binary(max_size=256), layout=LAYOUTS, num_tokens=st.integers(1, 64))
def test_random_bytes_are_a_decode_error_or_parse_or_raise_wire_error(blob, layout, num_tokens):
    try:
        msg = pb.KVPush.FromString(blob)
    except DecodeError:
        event("not a KVPush")
        return
    part = msg.WhichOneof("part")
    event(f"a KVPush with {part}")
    try:
        if part == "begin":
            assert parse_begin(msg.begin, layout) >= 1
        elif part == "chunk":
            parsed = parse_chunk(msg.chunk, layout, num_tokens)
            assert parsed.kv.nbytes == len(msg.chunk.data)
    except WireError:
        pass


@given(name=st.sampled_from(["float32", "float16", "bfloat16"]) | TEXT)
@settings(FUZZ, max_examples=100)
def test_dtype_names_are_known_or_a_value_error(name):
    try:
        dtype = dtype_from_name(name)
    except ValueError as exc:
        assert repr(name) in str(exc)
        return
    assert str(dtype) == f"torch.{name}"


# -- receive_kv on a real decode engine ------------------------------------------------------------

BLOCKS, BLOCK_SIZE = 24, 4
RID, MID = "r", "m"  # the reservation pushed into; a migrated request's id
EOS = 2


async def stream(messages: list[pb.KVPush]):
    for message in messages:
        await asyncio.sleep(0)
        yield wire(message)


def begin_for(data, prompt_len: int) -> tuple[pb.KVPush, str, int, int | None]:
    """A begin message (valid or not), the request it is for, the tokens it announces, and (a
    migration) the completion tokens the end will carry."""
    layout = FAKE_LAYOUT
    kind = data.draw(st.sampled_from(["handoff"] * 4 + ["adopt"] * 3 + ["unknown", "tokens", "layout", "adopt-dup",
                                                                         "shared"]), label="begin")
    event(f"begin: {kind}")
    if kind in ("adopt", "adopt-dup"):
        p_len = data.draw(st.integers(1, 10), label="adopt prompt_len")
        if data.draw(st.integers(0, 5), label="bad prompt_len") == 0:
            p_len = data.draw(st.integers(-(2**31), 0), label="adopt prompt_len")
        max_tokens = data.draw(st.integers(2, 6), label="adopt max_tokens")
        if data.draw(st.integers(0, 5), label="bad max_tokens") == 0:
            max_tokens = data.draw(st.integers(-(2**31), 1), label="adopt max_tokens")
        num_tokens = kv_tokens_for(p_len, max_tokens)
        if data.draw(st.integers(0, 4), label="adopt wrong size") == 0:
            num_tokens = data.draw(near(num_tokens), label="adopt num_tokens")
        msg = begin_message(MID if kind == "adopt" else RID, num_tokens, layout)
        msg.begin.adopt.prompt_len = p_len
        msg.begin.adopt.sampling.CopyFrom(sampling_to_pb(SamplingParams(max_tokens=max_tokens, seed=1)))
        n_done = data.draw(st.integers(0, max(0, max_tokens)), label="tokens so far")
        return msg, msg.begin.request_id, num_tokens, n_done
    rid, num_tokens, layout_sent = RID, prompt_len, layout
    if kind == "unknown":
        rid = data.draw(TEXT.filter(lambda s: s != RID), label="unknown id")
    elif kind == "tokens":
        num_tokens = data.draw(near(prompt_len).filter(lambda n: n != prompt_len), label="num_tokens")
    elif kind == "layout":
        field = data.draw(st.sampled_from(["num_layers", "num_kv_heads", "head_dim", "dtype"]), label="field")
        value = data.draw(st.sampled_from(["float16", "bfloat16", "", "x"]) if field == "dtype"
                          else near(getattr(layout, field)).filter(lambda v, f=field: v != getattr(layout, f)),
                          label=field)
        layout_sent = dataclasses.replace(layout, dtype=torch.float16) if field == "dtype" else layout
        msg = begin_message(rid, num_tokens, layout_sent)
        setattr(msg.begin, field, value)
        return msg, rid, num_tokens, None
    msg = begin_message(rid, num_tokens, layout_sent)
    if kind == "shared":
        msg.begin.shared.pool.host_id = data.draw(TEXT, label="host")
        msg.begin.shared.block_table.extend(data.draw(st.lists(st.integers(-2, 40), max_size=4), label="table"))
    return msg, rid, num_tokens, None


def body_for(data, num_tokens: int, n_sent: int, seed: int) -> list[pb.KVPush]:
    """Chunks covering positions [0, n_sent) of the announced transfer, then perturbed."""
    n_sent = max(0, min(n_sent, num_tokens, 64))
    msgs: list[pb.KVPush] = []
    if n_sent:
        min_bytes = data.draw(st.integers(1, 512), label="min bytes")
        chunks = build_chunks(FAKE_LAYOUT, random_kv(FAKE_LAYOUT, n_sent, seed), min_bytes,
                              min_bytes + data.draw(st.integers(0, 512), label="extra bytes"))
        msgs = [chunk_message(c) for c in chunks]
    for _ in range(data.draw(st.sampled_from([0, 0, 0, 0, 1, 2, 3]), label="perturbations")):
        what = data.draw(st.sampled_from(["drop", "duplicate", "mutate", "swap", "ready", "begin", "empty"]),
                         label="perturb")
        event(f"perturb: {what}")
        i = data.draw(st.integers(0, len(msgs)), label="at")
        if what == "drop" and i < len(msgs):
            del msgs[i]
        elif what == "duplicate" and i < len(msgs):
            msgs.insert(i, msgs[i])
        elif what == "mutate" and i < len(msgs):
            msgs[i] = pb.KVPush.FromString(msgs[i].SerializeToString())
            mutate_chunk(data, msgs[i], FAKE_LAYOUT)
        elif what == "swap" and i + 1 < len(msgs):
            msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
        elif what == "ready":
            msgs.insert(i, pb.KVPush(ready=pb.KVPush.Ready(token_start=data.draw(near(0), label="ready start"),
                                                           token_end=data.draw(near(n_sent), label="ready end"))))
        elif what == "begin":
            msgs.insert(i, begin_message(RID, num_tokens, FAKE_LAYOUT))
        elif what == "empty":
            msgs.insert(i, pb.KVPush())
    return msgs


def end_for(data, migrated_tokens: int | None, prompt_len: int) -> list[pb.KVPush]:
    how = data.draw(st.sampled_from(["end"] * 5 + ["bad token", "none"]), label="end")
    if how == "none":
        return []
    if migrated_tokens is None:
        token = data.draw(st.integers(3, 900) | st.just(EOS), label="first token") if how == "end" else \
            data.draw(st.sampled_from([-1, -(2**31), FAKE_VOCAB, 2**31 - 1]), label="bad first token")
        return [end_message(token)]
    tokens = data.draw(st.lists(st.integers(3, 900), min_size=migrated_tokens, max_size=migrated_tokens),
                       label="tokens")
    if how == "bad token" and tokens:
        tokens[-1] = data.draw(st.sampled_from([-1, FAKE_VOCAB]), label="bad token")
    kv_tokens = prompt_len + len(tokens) - 1
    if data.draw(st.integers(0, 4), label="wrong kv_tokens") == 0:
        kv_tokens = data.draw(near(kv_tokens), label="kv_tokens")
    return [pb.KVPush(end=pb.KVPush.End(tokens=tokens, kv_tokens=kv_tokens))]


def reference_kv(messages: list[pb.KVPush], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the transfer's chunks write, applied in order as the receiver does (last write wins),
    and which (layer, position) cells they cover. Only chunks that parse; the receiver stops at
    the first that does not."""
    out = torch.zeros(FAKE_LAYOUT.num_layers, 2, max(num_tokens, 0), FAKE_LAYOUT.num_kv_heads,
                      FAKE_LAYOUT.head_dim, dtype=FAKE_LAYOUT.dtype)
    covered = torch.zeros(FAKE_LAYOUT.num_layers, max(num_tokens, 0), dtype=torch.bool)
    for message in messages:
        if message.WhichOneof("part") != "chunk":
            continue
        c = parse_chunk(message.chunk, FAKE_LAYOUT, num_tokens)
        out[c.layer_start:c.layer_end, :, c.token_start:c.token_end] = c.kv
        covered[c.layer_start:c.layer_end, c.token_start:c.token_end] = True
    return out, covered


def assert_written_only_in(store: PagedKVStore, blocks: set[int]) -> None:
    """Every block of the pool (the null block too) but `blocks` is still zero, as it started."""
    others = [b for b in range(store.num_blocks + 1) if b not in blocks]
    assert not raw(store.kv[:, :, others]).any(), "a byte landed outside the blocks of the requests pushed into"


@FUZZ
@given(prompt_len=st.integers(1, 12), max_tokens=st.integers(1, 6), eos=st.booleans(),
       may_adopt=st.sampled_from([True, True, True, False]),
       seed=st.integers(0, 2**16), data=st.data())
def test_receive_kv_completes_the_reservation_or_fails_it_with_a_domain_error(
        prompt_len, max_tokens, eos, may_adopt, seed, data):
    first, rid, num_tokens, migrated = begin_for(data, prompt_len)
    is_adopt = first.begin.HasField("adopt")
    adopt_len = first.begin.adopt.prompt_len
    n_sent = (adopt_len + max(migrated, 1) - 1) if is_adopt else num_tokens
    if data.draw(st.integers(0, 7), label="send fewer positions") == 0:
        n_sent = data.draw(st.integers(0, max(0, n_sent)), label="positions sent")
    body = body_for(data, num_tokens, n_sent, seed)
    messages = [first, *body, *end_for(data, migrated if is_adopt else None, adopt_len)]
    if data.draw(st.integers(0, 9), label="begin not first") == 0:
        messages = messages[1:] + messages[:1]
        if messages[0].WhichOneof("part") == "begin":  # a perturbation's begin leads now: the push is its
            lead = messages[0].begin
            rid, num_tokens, is_adopt = lead.request_id, lead.num_tokens, lead.HasField("adopt")
    stop = frozenset([EOS]) if eos else frozenset()
    run(_receive_one(messages, prompt_len, SamplingParams(max_tokens=max_tokens, stop_token_ids=stop),
                     may_adopt, rid, num_tokens, is_adopt))


def run(coro):
    """asyncio.run on a loop of its own that never becomes the thread's current loop (the session's
    loop, which the async tests share, is left alone)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _receive_one(messages, prompt_len, params, may_adopt, rid, num_tokens, is_adopt):
    async with running_decode(kv_blocks=BLOCKS, block_size=BLOCK_SIZE, start=False) as engine:
        store = engine.runner.store
        queue = engine.reserve(RID, prompt_len, params)
        reserved = engine.scheduler.seqs[RID]
        r_table = list(reserved.block_table)
        adopted: list[list[int]] = []  # the block tables of requests the push reserved (migrations)
        adopt = engine.adopt

        def recording_adopt(*args):
            seq = adopt(*args)
            adopted.append(list(seq.block_table))
            return seq

        engine.adopt = recording_adopt
        try:
            received = await receive_kv(stream(messages), engine, store.layout, FAKE_VOCAB, may_adopt)
        except ServiceError as exc:
            event(f"refused: {type(exc).__name__}")
            assert str(exc)
            # Whatever it was for, the push left no request half-received: a reservation it named
            # is failed (its stream told), one it did not name is untouched.
            seq = engine.scheduler.seqs.get(RID)
            if seq is None:
                assert isinstance(queue.get_nowait(), ErrorEvent)
            else:
                assert seq is reserved and seq.state is SeqState.WAITING_KV
            assert MID not in engine.scheduler.seqs, "a failed migration left its reservation behind"
        else:
            event("received" + (" (migration)" if is_adopt else ""))
            seq = engine.scheduler.seqs.get(rid)
            if is_adopt:
                assert rid == MID and seq is not None and seq.state is SeqState.READY
                table, positions = list(seq.block_table), seq.prompt_len + len(seq.tokens) - 1
            else:
                assert rid == RID and (seq is None or seq.state is SeqState.READY)
                assert reserved.state in (SeqState.READY, SeqState.FINISHED) and len(reserved.tokens) == 1
                table, positions = r_table, prompt_len
            # Every promised cell arrived, and the pool holds exactly what the chunks said.
            expected, covered = reference_kv(messages, num_tokens)
            assert covered[:, :positions].all()
            assert received == sum(len(m.chunk.data) for m in messages if m.WhichOneof("part") == "chunk")
            for layer in range(store.layout.num_layers):
                got = store.read_chunk(layer, layer + 1, store.slots(table, 0, positions))
                assert torch.equal(raw(got), raw(expected[layer:layer + 1, :, :positions]))
        # Nothing was written outside the blocks of the requests pushed into (the pool started zeroed).
        assert_written_only_in(store, {*r_table, *(b for table in adopted for b in table)})
        engine.release(RID)
        engine.release(MID)
        assert_decode_empty(engine)


# -- receive_kv reading a peer's shared pool (the shm transport) -------------------------------------

SOURCE_BLOCKS = 8


@pytest.fixture(scope="module")
def shared_source():
    """A peer's pool in shared memory (this process's own memfd), full of random KV, and the
    executor the receiver copies on."""
    source = PagedKVStore(FAKE_LAYOUT, num_blocks=SOURCE_BLOCKS, block_size=BLOCK_SIZE, device=torch.device("cpu"),
                          shared=True)
    if source.shared_handle is None:
        pytest.skip("no memfd here")
    source.kv.copy_(torch.randn(source.kv.shape, generator=torch.Generator().manual_seed(5)))
    executor = ThreadPoolExecutor(max_workers=1)
    yield source, executor
    executor.shutdown(wait=True)


@settings(FUZZ, max_examples=120)
@given(prompt_len=st.integers(1, 12), data=st.data())
def test_receive_kv_from_a_shared_pool_copies_in_range_or_fails_with_a_domain_error(shared_source, prompt_len, data):
    source, executor = shared_source
    handle = source.shared_handle
    what = data.draw(st.sampled_from(["valid"] * 6 + ["host", "pool id", "shape", "dtype"]), label="handle")
    event(f"shared handle: {what}")
    if what == "host":
        handle = dataclasses.replace(handle, host_id=data.draw(TEXT, label="host"))
    elif what == "pool id":
        handle = dataclasses.replace(handle, pool_id=data.draw(TEXT, label="pool id"))
    elif what == "shape":
        shape = list(handle.shape)
        shape[data.draw(st.integers(0, 5), label="dim")] += data.draw(st.sampled_from([-1, 1, 100]), label="by")
        handle = dataclasses.replace(handle, shape=tuple(shape))
    elif what == "dtype":
        handle = dataclasses.replace(handle, dtype=data.draw(st.sampled_from(["float16", "bfloat16", "int8", ""])))
    needed = -(-prompt_len // BLOCK_SIZE)
    table = data.draw(st.lists(st.integers(0, SOURCE_BLOCKS - 1), min_size=needed, max_size=needed), label="table")
    if data.draw(st.integers(0, 4), label="bad table") == 0:
        table = data.draw(st.lists(st.integers(-2, SOURCE_BLOCKS - 1) | st.sampled_from([SOURCE_BLOCKS, 10**6]),
                                   max_size=needed + 1), label="table")
    begin = _shared_begin(RID, prompt_len, handle, table)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, prompt_len - 1), max_size=3), label="cuts")) if prompt_len > 1
                  else set())
    bounds = [0, *cuts, prompt_len]
    readies = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    for _ in range(data.draw(st.sampled_from([0, 0, 0, 1, 2]), label="bad readies")):
        readies.insert(data.draw(st.integers(0, len(readies)), label="at"),
                       (data.draw(near(0), label="start"), data.draw(near(prompt_len), label="end")))
    if data.draw(st.integers(0, 5), label="drop one") == 0 and readies:
        del readies[data.draw(st.integers(0, len(readies) - 1), label="dropped")]
    first = data.draw(st.integers(3, 900), label="first token")
    if data.draw(st.integers(0, 7), label="bad first token") == 0:
        first = data.draw(st.sampled_from([-1, FAKE_VOCAB]), label="first token")
    messages = [begin, *(pb.KVPush(ready=pb.KVPush.Ready(token_start=a, token_end=b)) for a, b in readies),
                end_message(first)]
    run(_receive_shared(messages, prompt_len, source, SharedReads(PeerPools(), executor), table))


async def _receive_shared(messages, prompt_len, source, shared, table):
    async with running_decode(kv_blocks=BLOCKS, block_size=BLOCK_SIZE, start=False) as engine:
        store = engine.runner.store
        queue = engine.reserve(RID, prompt_len, SamplingParams(max_tokens=3))
        reserved = engine.scheduler.seqs[RID]
        r_table = list(reserved.block_table)
        try:
            await receive_kv(stream(messages), engine, store.layout, FAKE_VOCAB, True, shared)
        except ServiceError as exc:
            event(f"refused: {type(exc).__name__}")
            assert str(exc)
            seq = engine.scheduler.seqs.get(RID)
            if seq is None:
                assert isinstance(queue.get_nowait(), ErrorEvent)
            else:
                assert seq is reserved and seq.state is SeqState.WAITING_KV
        else:
            event("received")
            assert reserved.state is SeqState.READY
            for layer in range(store.layout.num_layers):
                ours = store.read_chunk(layer, layer + 1, store.slots(r_table, 0, prompt_len))
                theirs = source.read_chunk(layer, layer + 1, source.slots(table, 0, prompt_len))
                assert torch.equal(raw(ours), raw(theirs)), "the KV is not the source's"
        assert_written_only_in(store, set(r_table))
        engine.release(RID)
        assert_decode_empty(engine)


# -- specific cases found by the fuzzing ----------------------------------------------------------

class Pipe:
    """An async iterator of KVPush messages fed by hand, to interleave two pushes."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, *messages: pb.KVPush) -> None:
        for m in messages:
            self.queue.put_nowait(wire(m))

    def __aiter__(self):
        return self

    async def __anext__(self):
        m = await self.queue.get()
        if m is None:
            raise StopAsyncIteration
        return m


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_second_push_for_the_same_reservation_gets_a_domain_error():
    async with running_decode(kv_blocks=BLOCKS, block_size=BLOCK_SIZE, start=False) as engine:
        prompt_len = 5
        engine.reserve(RID, prompt_len, SamplingParams(max_tokens=4))
        kv = random_kv(FAKE_LAYOUT, prompt_len, 0)
        chunks = [chunk_message(c) for c in build_chunks(FAKE_LAYOUT, kv, 1, 1 << 20)]
        a, b = Pipe(), Pipe()
        push_a = asyncio.create_task(receive_kv(a, engine, FAKE_LAYOUT, FAKE_VOCAB, True))
        push_b = asyncio.create_task(receive_kv(b, engine, FAKE_LAYOUT, FAKE_VOCAB, True))
        a.send(begin_message(RID, prompt_len, FAKE_LAYOUT), *chunks)
        b.send(begin_message(RID, prompt_len, FAKE_LAYOUT), *chunks)
        await settle()
        a.send(end_message(7))
        assert await push_a > 0
        b.send(end_message(7))
        outcome = (await asyncio.gather(push_b, return_exceptions=True))[0]
        assert engine.scheduler.seqs[RID].state is SeqState.READY
        engine.release(RID)
        assert_decode_empty(engine)
        assert isinstance(outcome, ServiceError), f"the second push ended with {outcome!r}, not a domain error"


def _shared_begin(request_id: str, num_tokens: int, handle, block_table: list[int]) -> pb.KVPush:
    msg = begin_message(request_id, num_tokens, FAKE_LAYOUT)
    msg.begin.shared.pool.CopyFrom(handle.to_pb())
    msg.begin.shared.block_table.extend(block_table)
    return msg


async def test_a_shared_source_that_lies_about_its_size_is_refused_and_leaks_nothing():
    source = PagedKVStore(FAKE_LAYOUT, num_blocks=4, block_size=BLOCK_SIZE, device=torch.device("cpu"), shared=True)
    if source.shared_handle is None:
        pytest.skip("no memfd here")
    shared = SharedReads(PeerPools(), ThreadPoolExecutor(max_workers=1))
    try:
        async with running_decode(kv_blocks=BLOCKS, block_size=BLOCK_SIZE, start=False) as engine:
            # A legitimate migration out of the source's pool maps it (and PeerPools keeps it).
            honest = _shared_begin(MID, kv_tokens_for(3, 4), source.shared_handle, [0, 1])
            honest.begin.adopt.prompt_len = 3
            honest.begin.adopt.sampling.CopyFrom(sampling_to_pb(SamplingParams(max_tokens=4)))
            msgs = [honest, pb.KVPush(ready=pb.KVPush.Ready(token_start=0, token_end=3)),
                    pb.KVPush(end=pb.KVPush.End(tokens=[5], kv_tokens=3))]
            await receive_kv(stream(msgs), engine, FAKE_LAYOUT, FAKE_VOCAB, True, shared)
            engine.release(MID)
            assert_decode_empty(engine)
            # The same pool, claimed 100 times larger, with a block past its end.
            shape = list(source.shared_handle.shape)
            shape[2] = 400
            liar = dataclasses.replace(source.shared_handle, shape=tuple(shape))
            lying = _shared_begin(MID, kv_tokens_for(3, 4), liar, [300, 301])
            lying.begin.adopt.prompt_len = 3
            lying.begin.adopt.sampling.CopyFrom(sampling_to_pb(SamplingParams(max_tokens=4)))
            msgs = [lying, pb.KVPush(ready=pb.KVPush.Ready(token_start=0, token_end=3)),
                    pb.KVPush(end=pb.KVPush.End(tokens=[5], kv_tokens=3))]
            outcome = (await asyncio.gather(receive_kv(stream(msgs), engine, FAKE_LAYOUT, FAKE_VOCAB, True, shared),
                                            return_exceptions=True))[0]
            left = MID in engine.scheduler.seqs
            engine.release(MID)
            assert isinstance(outcome, ServiceError) and not left, (
                f"a lying shared source ended the push with {outcome!r}; its reservation left behind: {left}")
    finally:
        shared.executor.shutdown(wait=True)
        with contextlib.suppress(Exception):
            del source
