"""What the role engines need from whatever runs the model (the `Runner` protocol), with no
model code attached: the hf, sim and fake runners implement it, and the engines import only this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from common.kv.wire import KVLayout
from common.types import SamplingParams

# (layer, k, v): k and v are [kv_heads, tokens, head_dim] of one layer for the whole packed batch.
LayerKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class KVStore(Protocol):
    """Where a worker keeps KV: the paged pool (PagedKVStore) or a pool that keeps no bytes
    (the sim engine's NullKVStore). Engines move KV in and out only through these calls."""

    layout: KVLayout
    num_blocks: int
    block_size: int

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor: ...

    def write_chunk(self, layer_start: int, slots: torch.Tensor, kv: torch.Tensor) -> None: ...

    def read_chunk(self, layer_start: int, layer_end: int, slots: torch.Tensor) -> torch.Tensor: ...


class Runner(Protocol):
    """Runs forward passes for the role engines, on one executor thread per worker."""

    store: KVStore

    def prefill_sample(self, prompts: list[list[int]], params: list[SamplingParams],
                       on_layer_kv: LayerKVHook | None) -> list[int]: ...

    def decode_sample(self, tokens: list[int], positions: list[int], block_tables: list[list[int]],
                      params: list[SamplingParams], token_indices: list[int]) -> list[int]: ...
