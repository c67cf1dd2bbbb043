"""The KV tensors of one worker: a paged pool that block tables index into.

Layout per layer: k[layer] and v[layer] are [num_blocks, block_size, num_kv_heads, head_dim],
the layout flash-attn's paged kernel (`flash_attn_with_kvcache(block_table=...)`) reads. A token
at position p of a request lives in slot `block_table[p // block_size] * block_size + p % block_size`
of the flat view [num_blocks * block_size, heads, head_dim]. Which blocks are free is BlockPool's
business; this class only holds and moves bytes.

One extra block past the last (`null_block`) is kept at zero and never lent: padded reads point
there, so a masked-out position never feeds uninitialised memory (possibly NaN) into attention.
"""

from __future__ import annotations

import logging

import torch

from common.kv import device_copy, shared_memory
from common.kv.layout import KVLayout
from common.kv.shared_memory import SharedPoolHandle

log = logging.getLogger(__name__)


def slots_for(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat slots of token positions [start, end) of a request with this block table."""
    positions = torch.arange(start, end)
    return torch.tensor(block_table)[positions // block_size] * block_size + positions % block_size


class PagedKVStore:
    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int, device: torch.device,
                 shared: bool = False) -> None:
        """`shared` (CPU only): the pool lives in memory that peers on this host can map, and
        `shared_handle` says where (common/kv/shared_memory.py)."""
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.null_block = num_blocks
        # k and v are the two halves of one tensor: [2, layers, blocks + 1, block_size, heads, head_dim].
        # Zeroed, so that every page is resident from the start (a GPU engine allocates its pool
        # up front too): a CPU pool left to fault its pages in as blocks are first written costs
        # ~3 ms/MB on these machines, which made a migration's writes 10x slower than the copy.
        shape = (2, layout.num_layers, num_blocks + 1, block_size, layout.num_kv_heads, layout.head_dim)
        self.shared_handle: SharedPoolHandle | None = None
        self.kv: torch.Tensor | None = None
        if shared and torch.device(device).type == "cpu" and shared_memory.available():
            try:
                self.kv, self.shared_handle = shared_memory.allocate_shared(shape, layout.dtype)
            except OSError as exc:  # no memfd here: peers get the KV over gRPC
                log.warning("KV pool not shared (%s): migrations from this worker send bytes", exc)
        if self.kv is None:
            self.kv = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]

    @property
    def null_slot(self) -> int:
        return self.null_block * self.block_size

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        return slots_for(self.pool_blocks(block_table), start, end, self.block_size)

    def pool_blocks(self, block_table: list[int]) -> list[int]:
        """Where a block table's blocks are in `kv`, for a peer that reads or copies them (the
        nixl and shm transports): here, where they are numbered. The sim engine's scratch pool
        (common/modeling/sim_runner.py) folds many blocks onto few."""
        return block_table

    def flat_k(self, layer: int) -> torch.Tensor:
        return self.k[layer].view(-1, self.layout.num_kv_heads, self.layout.head_dim)

    def flat_v(self, layer: int) -> torch.Tensor:
        return self.v[layer].view(-1, self.layout.num_kv_heads, self.layout.head_dim)

    def write_tokens(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v ([tokens, heads, head_dim]) of one layer into `slots` ([tokens])."""
        self.flat_k(layer)[slots] = k
        self.flat_v(layer)[slots] = v

    def write_chunk(self, layer_start: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write a wire chunk ([layers, 2, tokens, heads, head_dim]) for the tokens at `slots`."""
        num_layers = kv.shape[0]
        shape = (num_layers, -1, self.layout.num_kv_heads, self.layout.head_dim)
        # A GPU pool: through a pinned buffer, non_blocking on the current stream (the receiver runs
        # this under device_copy.on_side_stream, on its kv-io thread); a CPU pool: no copy.
        kv, slots = device_copy.to_device(kv, self.k.device), device_copy.to_device(slots, self.k.device)
        self.k[layer_start:layer_start + num_layers].view(shape)[:, slots] = kv[:, 0]
        self.v[layer_start:layer_start + num_layers].view(shape)[:, slots] = kv[:, 1]

    def read_chunk(self, layer_start: int, layer_end: int, slots: torch.Tensor) -> torch.Tensor:
        """A copy of layers [layer_start, layer_end) at `slots`, as a wire chunk's tensor
        ([layers, 2, tokens, heads, head_dim]) on this pool's device. One gather per layer and
        side, straight into the result (no intermediate copies: migration reads a lot)."""
        slots = device_copy.to_device(slots, self.k.device)
        out = torch.empty(layer_end - layer_start, 2, len(slots), self.layout.num_kv_heads, self.layout.head_dim,
                          dtype=self.layout.dtype, device=self.k.device)
        for i, layer in enumerate(range(layer_start, layer_end)):
            torch.index_select(self.flat_k(layer), 0, slots, out=out[i, 0])
            torch.index_select(self.flat_v(layer), 0, slots, out=out[i, 1])
        return out

    def copy_from_peer(self, peer_kv: torch.Tensor, peer_slots: torch.Tensor, slots: torch.Tensor,
                       layers: range | None = None) -> int:
        """Copy K and V of `layers` (None: every layer) at a peer pool's `peer_slots` (a mapped
        `kv` tensor of the same layout) into ours at `slots`; returns the bytes copied. One gather
        and one scatter per layer and side, no intermediate beyond the gathered rows."""
        rows = (-1, self.layout.num_kv_heads, self.layout.head_dim)
        layers = range(self.layout.num_layers) if layers is None else layers
        slots = device_copy.to_device(slots, self.kv.device)  # a GPU pool takes a CPU peer's rows through the host
        for side in range(2):
            for layer in layers:
                theirs = peer_kv[side, layer].view(rows).index_select(0, peer_slots)
                self.kv[side, layer].view(rows).index_copy_(0, slots, device_copy.to_device(theirs, self.kv.device))
        return len(layers) * len(slots) * self.layout.bytes_per_token_layer
