"""What the role engines need from whatever runs the model (the `Runner` protocol), with no
model code attached: the hf, sim and fake runners implement it, and the engines import only this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from common.kv.layout import KVLayout
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


@dataclass(frozen=True)
class PromptChunk:
    """Part of a prompt prefilled on the worker that keeps its KV (chunked prefill): positions
    start .. start + len(tokens) - 1, written into `block_table`'s blocks. `params` is set on the
    prompt's last chunk, whose forward samples the first token."""

    tokens: list[int]
    start: int
    block_table: list[int]
    params: SamplingParams | None


@dataclass(frozen=True)
class DecodeInputs:
    """One decode step's inputs, as `decode_sample` takes them."""

    tokens: list[int]
    positions: list[int]
    block_tables: list[list[int]]
    params: list[SamplingParams]
    token_indices: list[int]


class Runner(Protocol):
    """Runs forward passes for the role engines, on one executor thread per worker."""

    store: KVStore

    def prefill_sample(self, prompts: list[list[int]], params: list[SamplingParams],
                       on_layer_kv: LayerKVHook | None) -> list[int]: ...

    def decode_sample(self, tokens: list[int], positions: list[int], block_tables: list[list[int]],
                      params: list[SamplingParams], token_indices: list[int]) -> list[int]: ...

    def mixed_sample(self, chunks: list[PromptChunk], decode: DecodeInputs | None) -> tuple[list[int | None],
                                                                                               list[int]]:
        """One step of a worker that prefills its own prompts: the chunks (each one's first token,
        or None where it is not its prompt's last chunk) and the decode step (its tokens)."""
        ...


def mixed_one_after_the_other(runner, chunks: list[PromptChunk],
                              decode: DecodeInputs | None) -> tuple[list[int | None], list[int]]:
    """`mixed_sample` as forwards run back to back: each chunk (`runner.prefill_chunk_sample`),
    then the decode step. What a runner without a fused mixed-batch kernel does."""
    firsts = [runner.prefill_chunk_sample(c) for c in chunks]
    tokens = runner.decode_sample(decode.tokens, decode.positions, decode.block_tables, decode.params,
                                  decode.token_indices) if decode is not None else []
    return firsts, tokens
