"""The KV wire format: how a request's KV travels from a prefill worker to a decode worker.

A transfer is one `KVPush` stream: `begin` (what is coming), `chunk`s, `end` (the first token).
A chunk holds layers [layer_start, layer_end) x tokens [token_start, token_end) as raw bytes in
C order, shape [layers, 2 (k, v), tokens, num_kv_heads, head_dim]. Layers are coalesced until a
chunk reaches `min_bytes` and a layer larger than `max_bytes` is split by tokens, so chunks stay
in the size range where gRPC streams fastest (256 KiB - 1 MiB) while layers still leave as soon
as they are computed.

This module is the only place that writes or reads that format.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from common.kv.layout import KVLayout
from common.pb import worker_pb2 as pb


class WireError(ValueError):
    """A KV message that does not fit the receiving side: malformed or for another layout."""


@dataclass(frozen=True)
class KVChunk:
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    kv: torch.Tensor  # [layers, 2, tokens, heads, head_dim]


def begin_message(request_id: str, num_tokens: int, layout: KVLayout) -> pb.KVPush:
    return pb.KVPush(begin=pb.KVPush.Begin(
        request_id=request_id, num_tokens=num_tokens, num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype_name))


def end_message(first_token_id: int) -> pb.KVPush:
    return pb.KVPush(end=pb.KVPush.End(first_token_id=first_token_id))


def chunk_message(chunk: KVChunk) -> pb.KVPush:
    message = pb.KVPush()
    # Fields set in place: building a Chunk and passing it to KVPush(chunk=...) copies its bytes again.
    part = message.chunk
    part.layer_start, part.layer_end = chunk.layer_start, chunk.layer_end
    part.token_start, part.token_end = chunk.token_start, chunk.token_end
    part.data = chunk.kv.contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return message


class ChunkBuilder:
    """Turns a request's KV, handed in one layer at a time in order, into wire chunks."""

    def __init__(self, layout: KVLayout, num_tokens: int, min_bytes: int, max_bytes: int) -> None:
        self.layout = layout
        self.num_tokens = num_tokens
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self._pending: list[torch.Tensor] = []
        self._pending_start = 0
        self._next_layer = 0

    def add_layer(self, layer: int, kv: torch.Tensor) -> list[KVChunk]:
        """`kv` is [2, tokens, heads, head_dim] of layer `layer`; returns the chunks now ready."""
        if layer != self._next_layer:
            raise ValueError(f"layer {layer} added, expected {self._next_layer}")
        self._next_layer += 1
        layer_bytes = self.num_tokens * self.layout.bytes_per_token_layer
        pending_bytes = len(self._pending) * layer_bytes
        out: list[KVChunk] = []
        if layer_bytes > self.max_bytes:
            out += self.flush()
            step = max(1, self.max_bytes // self.layout.bytes_per_token_layer)
            for start in range(0, self.num_tokens, step):
                end = min(self.num_tokens, start + step)
                out.append(KVChunk(layer, layer + 1, start, end, kv[:, start:end].unsqueeze(0)))
            self._pending_start = layer + 1
            return out
        if pending_bytes + layer_bytes > self.max_bytes:
            out += self.flush()
        if not self._pending:
            self._pending_start = layer
        self._pending.append(kv)
        if (len(self._pending)) * layer_bytes >= self.min_bytes:
            out += self.flush()
        return out

    def flush(self) -> list[KVChunk]:
        if not self._pending:
            return []
        start = self._pending_start
        end = start + len(self._pending)
        chunk = KVChunk(start, end, 0, self.num_tokens, torch.stack(self._pending))
        self._pending = []
        self._pending_start = end
        return [chunk]


def parse_begin(begin: pb.KVPush.Begin, layout: KVLayout) -> int:
    """Check a transfer's header against the receiving pool's layout; return its token count."""
    theirs = (begin.num_layers, begin.num_kv_heads, begin.head_dim, begin.dtype)
    ours = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype_name)
    if theirs != ours:
        raise WireError(f"KV layout (layers, kv heads, head dim, dtype) {theirs} does not match this worker's {ours}")
    if begin.num_tokens < 1:
        raise WireError(f"KV transfer of {begin.num_tokens} tokens")
    return begin.num_tokens


def parse_chunk(chunk: pb.KVPush.Chunk, layout: KVLayout, num_tokens: int) -> KVChunk:
    """Validate a chunk's ranges and size and view its bytes as a tensor (no copy)."""
    if not (0 <= chunk.layer_start < chunk.layer_end <= layout.num_layers):
        raise WireError(f"KV chunk layers [{chunk.layer_start}, {chunk.layer_end}) outside [0, {layout.num_layers})")
    if not (0 <= chunk.token_start < chunk.token_end <= num_tokens):
        raise WireError(f"KV chunk tokens [{chunk.token_start}, {chunk.token_end}) outside [0, {num_tokens})")
    shape = (chunk.layer_end - chunk.layer_start, 2, chunk.token_end - chunk.token_start,
             layout.num_kv_heads, layout.head_dim)
    expected = shape[0] * shape[2] * layout.bytes_per_token_layer
    data = chunk.data  # each read of a bytes field makes a new copy of it: read it once
    if len(data) != expected:
        raise WireError(f"KV chunk of shape {list(shape)} must hold {expected} bytes, got {len(data)}")
    with warnings.catch_warnings():
        # The protobuf bytes are read-only; the tensor is only read (copied into the pool).
        warnings.simplefilter("ignore", UserWarning)
        kv = torch.frombuffer(data, dtype=torch.uint8).view(layout.dtype).view(shape)
    return KVChunk(chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end, kv)
