"""The `fake` engine: no weights and no sleeping, for unit tests of the engines and fast tests of
KV movement. Model name "fake:" (anything after the colon is ignored).

It keeps a real paged pool (a tiny layout) and its tokens depend on the KV bytes: prefill writes
each position's K/V as a function of (token, position, layer); every decode step reads the K and
V of every layer at every position of the request back out of its blocks and folds them into the
next token. So a request
whose KV was lost, misplaced or moved wrongly produces other tokens than an undisturbed run, and
a test that compares outputs checks the KV too.
"""

from __future__ import annotations

import torch

from common.kv.block_pool import choose_block_size
from common.kv.kv_store import PagedKVStore
from common.kv.layout import KVLayout
from common.modeling.base import DecodeInputs, LayerKVHook, PromptChunk, mixed_one_after_the_other
from common.modeling.registry import BuiltRunner, RunnerSpec, register_runner
from common.types import SamplingParams

FAKE_LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
FAKE_VOCAB = 49152
_TOKEN_LOW = 100  # clear of special tokens (EOS is never produced)


def kv_value(token: int, position: int, layer: int) -> float:
    # Exactly representable in float32 for the token ids and positions used here.
    return float((token * 7 + position * 13 + layer * 5) % 4096)


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, shared_kv: bool = False) -> None:
        self.store = PagedKVStore(FAKE_LAYOUT, num_blocks, block_size, torch.device("cpu"), shared=shared_kv)
        self.prefills = 0
        self.decode_steps = 0

    def _kv_row(self, tokens: list[int], positions: list[int], layer: int) -> torch.Tensor:
        values = torch.tensor([kv_value(t, p, layer) for t, p in zip(tokens, positions, strict=True)])
        return values.view(1, -1, 1).expand(FAKE_LAYOUT.num_kv_heads, -1, FAKE_LAYOUT.head_dim).contiguous()

    def prefill_sample(self, prompts: list[list[int]], params: list[SamplingParams],
                       on_layer_kv: LayerKVHook | None) -> list[int]:
        self.prefills += 1
        tokens = [t for p in prompts for t in p]
        positions = [i for p in prompts for i in range(len(p))]
        for layer in range(FAKE_LAYOUT.num_layers):
            kv = self._kv_row(tokens, positions, layer)
            if on_layer_kv is not None:
                on_layer_kv(layer, kv, kv)
        return [_fold(sum(kv_value(t, i, 0) for i, t in enumerate(p)), len(p)) for p in prompts]

    def decode_sample(self, tokens: list[int], positions: list[int], block_tables: list[list[int]],
                      params: list[SamplingParams], token_indices: list[int]) -> list[int]:
        self.decode_steps += 1
        out = []
        for token, pos, table in zip(tokens, positions, block_tables, strict=True):
            for layer in range(FAKE_LAYOUT.num_layers):
                kv = self._kv_row([token], [pos], layer).transpose(0, 1)  # [1 token, heads, head_dim]
                self.store.write_tokens(layer, self.store.slots(table, pos, pos + 1), kv, kv)
            # Every position's K and V of every layer, as the pool holds them now (the new token's
            # included), weighted by position and layer so that misplaced KV changes the sum too.
            slots = self.store.slots(table, 0, pos + 1)
            weights = torch.arange(1, pos + 2, dtype=torch.float64).view(-1, 1, 1)
            checksum = sum(float(((self.store.flat_k(layer)[slots].double() + 2 * self.store.flat_v(layer)[slots])
                                  * weights).sum()) * (layer + 1) for layer in range(FAKE_LAYOUT.num_layers))
            out.append(_fold(checksum, pos + 1))
        return out


    def prefill_chunk_sample(self, chunk: PromptChunk) -> int | None:
        """Write the chunk's K/V into its blocks; on the last chunk, the first token from the whole
        prompt's layer-0 K as the pool holds it (prefill_sample's token when every chunk landed)."""
        self.prefills += 1
        positions = list(range(chunk.start, chunk.start + len(chunk.tokens)))
        slots = self.store.slots(chunk.block_table, chunk.start, positions[-1] + 1)
        for layer in range(FAKE_LAYOUT.num_layers):
            kv = self._kv_row(chunk.tokens, positions, layer).transpose(0, 1)  # [tokens, heads, head_dim]
            self.store.write_tokens(layer, slots, kv, kv)
        if chunk.params is None:
            return None
        end = positions[-1] + 1
        checksum = float(self.store.flat_k(0)[self.store.slots(chunk.block_table, 0, end)][:, 0, 0].sum())
        return _fold(checksum, end)

    def mixed_sample(self, chunks: list[PromptChunk], decode: DecodeInputs | None) -> tuple[list[int | None],
                                                                                               list[int]]:
        return mixed_one_after_the_other(self, chunks, decode)


def _fold(checksum: float, length: int) -> int:
    return _TOKEN_LOW + (int(checksum) * 31 + length * 17) % (FAKE_VOCAB - _TOKEN_LOW)


@register_runner("fake")
def build_fake_runner(spec: RunnerSpec) -> BuiltRunner:
    return BuiltRunner(FakeRunner(spec.kv_blocks, choose_block_size(spec.block_size, False), spec.shared_kv),
                       FAKE_VOCAB, "fake (no model)")
