import random

import pytest
import torch

from common.kv.layout import KVLayout, dtype_from_name
from common.pb import worker_pb2 as pb
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

L, H, D = 6, 2, 8


def random_kv(num_tokens: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, num_tokens, H, D, generator=g).to(dtype)


def over_the_wire(msg: pb.KVPush) -> pb.KVPush:
    return pb.KVPush.FromString(msg.SerializeToString())


def transfer(kv: torch.Tensor, layout: KVLayout, min_bytes: int, max_bytes: int) -> list[pb.KVPush]:
    """Sender side: begin, the chunks the builder makes layer by layer, end (all serialized and parsed back)."""
    builder = ChunkBuilder(layout, kv.shape[2], min_bytes, max_bytes)
    chunks: list[KVChunk] = []
    for layer in range(layout.num_layers):
        chunks += builder.add_layer(layer, kv[layer])
    chunks += builder.flush()
    msgs = [begin_message("req", kv.shape[2], layout)] + [chunk_message(c) for c in chunks] + [end_message(42)]
    return [over_the_wire(m) for m in msgs]


def receive(msgs: list[pb.KVPush], layout: KVLayout) -> torch.Tensor:
    num_tokens = parse_begin(msgs[0].begin, layout)
    out = torch.zeros(layout.num_layers, 2, num_tokens, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
    covered = torch.zeros(layout.num_layers, num_tokens, dtype=torch.int32)
    for msg in msgs[1:-1]:
        c = parse_chunk(msg.chunk, layout, num_tokens)
        out[c.layer_start:c.layer_end, :, c.token_start:c.token_end] = c.kv
        covered[c.layer_start:c.layer_end, c.token_start:c.token_end] += 1
    assert torch.all(covered == 1), "every (layer, token) must arrive exactly once"
    assert msgs[-1].end.first_token_id == 42
    return out


SIZES = [(1, 1), (0, 10**9), (1 << 10, 1 << 12), (3000, 7000), (1 << 12, 1 << 13), (100, 200), (1 << 14, 1 << 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("min_bytes, max_bytes", SIZES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_round_trip_identity(dtype, min_bytes, max_bytes, num_tokens):
    layout = KVLayout(L, H, D, dtype)
    kv = random_kv(num_tokens, dtype, seed=num_tokens)
    msgs = transfer(kv, layout, min_bytes, max_bytes)
    assert torch.equal(receive(msgs, layout), kv)

    layer_bytes = num_tokens * layout.bytes_per_token_layer
    sizes = [len(m.chunk.data) for m in msgs[1:-1]]
    assert sum(sizes) == layout.bytes_for(num_tokens)
    if layout.bytes_per_token_layer <= max_bytes:
        assert all(s <= max_bytes for s in sizes)
    if layer_bytes < min_bytes and max_bytes >= 2 * min_bytes:
        assert all(s >= min_bytes for s in sizes[:-1])
    if layer_bytes > max_bytes:  # split by tokens: one layer per chunk
        assert all(m.chunk.layer_end - m.chunk.layer_start == 1 for m in msgs[1:-1])
    layer_starts = [m.chunk.layer_start for m in msgs[1:-1]]
    assert layer_starts == sorted(layer_starts)


def ranges(msgs: list[pb.KVPush]) -> list[tuple[int, int, int, int]]:
    return [(m.chunk.layer_start, m.chunk.layer_end, m.chunk.token_start, m.chunk.token_end) for m in msgs[1:-1]]


def test_small_layers_are_coalesced():
    layout = KVLayout(L, H, D, torch.float32)  # 7 tokens: 896 bytes a layer
    msgs = transfer(random_kv(7, torch.float32, 1), layout, min_bytes=1024, max_bytes=4096)
    assert ranges(msgs) == [(0, 2, 0, 7), (2, 4, 0, 7), (4, 6, 0, 7)]


def test_large_layers_are_split_by_tokens():
    layout = KVLayout(L, H, D, torch.float32)  # 128 bytes a token-layer: 2 tokens fit in 300 bytes
    msgs = transfer(random_kv(7, torch.float32, 1), layout, min_bytes=100, max_bytes=300)
    assert ranges(msgs) == [(layer, layer + 1, t, min(7, t + 2)) for layer in range(L) for t in range(0, 7, 2)]


def test_random_shapes_round_trip():
    rng = random.Random(3)
    for i in range(30):
        layout = KVLayout(rng.randint(1, 5), rng.randint(1, 3), rng.choice([2, 4, 8]),
                          rng.choice([torch.float32, torch.bfloat16, torch.float16]))
        num_tokens = rng.randint(1, 40)
        kv = torch.randn(layout.num_layers, 2, num_tokens, layout.num_kv_heads, layout.head_dim,
                         generator=torch.Generator().manual_seed(i)).to(layout.dtype)
        min_bytes = rng.randint(1, 4096)
        max_bytes = min_bytes + rng.randint(0, 8192)
        assert torch.equal(receive(transfer(kv, layout, min_bytes, max_bytes), layout), kv)


def test_layers_out_of_order_raise():
    layout = KVLayout(L, H, D, torch.float32)
    kv = random_kv(4, torch.float32, 0)
    builder = ChunkBuilder(layout, 4, 1 << 20, 1 << 21)
    with pytest.raises(ValueError, match="expected 0"):
        builder.add_layer(1, kv[1])
    builder.add_layer(0, kv[0])
    with pytest.raises(ValueError, match="expected 1"):
        builder.add_layer(0, kv[0])
    with pytest.raises(ValueError, match="expected 1"):
        builder.add_layer(2, kv[2])


def begin(layout: KVLayout, num_tokens: int = 4) -> pb.KVPush.Begin:
    return over_the_wire(begin_message("r", num_tokens, layout)).begin


def test_parse_begin_accepts_own_layout():
    layout = KVLayout(L, H, D, torch.bfloat16)
    assert parse_begin(begin(layout, 9), layout) == 9


@pytest.mark.parametrize("theirs", [KVLayout(L + 1, H, D, torch.float16), KVLayout(L, H + 1, D, torch.float16),
                                    KVLayout(L, H, D * 2, torch.float16), KVLayout(L, H, D, torch.bfloat16)])
def test_parse_begin_rejects_layout_mismatch(theirs):
    with pytest.raises(WireError, match="does not match"):
        parse_begin(begin(theirs), KVLayout(L, H, D, torch.float16))


def test_parse_begin_rejects_zero_tokens():
    layout = KVLayout(L, H, D, torch.float16)
    with pytest.raises(WireError):
        parse_begin(begin(layout, 0), layout)


def chunk(layers: tuple[int, int], tokens: tuple[int, int], nbytes: int) -> pb.KVPush.Chunk:
    return pb.KVPush.Chunk(layer_start=layers[0], layer_end=layers[1], token_start=tokens[0], token_end=tokens[1],
                           data=bytes(nbytes))


@pytest.mark.parametrize("layers, tokens, match", [
    ((0, L + 1), (0, 4), "layers"), ((3, 3), (0, 4), "layers"), ((4, 2), (0, 4), "layers"),
    ((L, L + 1), (0, 4), "layers"), ((0, 1), (0, 5), "tokens"), ((0, 1), (2, 2), "tokens"),
    ((0, 1), (4, 5), "tokens"), ((0, 1), (3, 1), "tokens"),
])
def test_parse_chunk_rejects_out_of_range(layers, tokens, match):
    layout = KVLayout(L, H, D, torch.float32)
    nbytes = max(0, layers[1] - layers[0]) * max(0, tokens[1] - tokens[0]) * layout.bytes_per_token_layer
    with pytest.raises(WireError, match=match):
        parse_chunk(chunk(layers, tokens, nbytes), layout, num_tokens=4)


@pytest.mark.parametrize("delta", [-1, 1, -2])
def test_parse_chunk_rejects_wrong_byte_length(delta):
    layout = KVLayout(L, H, D, torch.bfloat16)
    right = 2 * 3 * layout.bytes_per_token_layer
    assert parse_chunk(chunk((1, 3), (0, 3), right), layout, 4).kv.shape == (2, 2, 3, H, D)
    with pytest.raises(WireError, match="bytes"):
        parse_chunk(chunk((1, 3), (0, 3), right + delta), layout, 4)


def test_dtype_from_name():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert dtype_from_name(KVLayout(1, 1, 1, dtype).dtype_name) is dtype
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_from_name("int8")
