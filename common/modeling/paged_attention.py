"""Paged attention plugged into Hugging Face models through transformers' AttentionInterface.

The model code stays Hugging Face's: we register an attention function under the name
`dopd_paged` and set it as the model's attention implementation. Every attention layer then
calls `paged_attention(...)` with its query and this step's key/value (RoPE applied), plus the
`dopd_batch` keyword we pass to `model(...)`, which says what this forward pass is:

- PrefillBatch: several prompts packed into one sequence (varlen). Each prompt attends causally
  to itself only. Each layer's K/V is handed to `on_layer_kv` as soon as it is computed, which
  is what lets the prefill worker stream KV layer by layer while later layers still run.
- DecodeBatch: one new token for each running request. Its K/V is written into the paged pool,
  then attention reads the request's context through its block table.
- ChunkBatch: one chunk of a prompt prefilled on the worker that keeps its KV (chunked prefill):
  its K/V is written into the pool, and its queries attend to the prompt's earlier positions
  (read from the pool) and causally to the chunk itself. SDPA on every device.

Kernels, chosen at run time: with flash-attn on CUDA, `flash_attn_varlen_func` for prefill and
`flash_attn_with_kvcache(block_table=...)` for decode (it reads blocks in place). Otherwise torch
SDPA through transformers' own `sdpa_attention_forward`, so the arithmetic is the same as
`model.generate()`'s. For decode the context is gathered through the block tables (an index read,
reused by no step after it), in one of two shapes that `ragged_decode` picks per step:

- padded: one [batch, max_context] batch and a mask, one SDPA call per layer. Each request costs
  as much as the longest, which is fine when the contexts are alike.
- ragged: the requests' contexts packed end to end with no padding, then one SDPA call per
  request on its slice. Each call has a fixed cost, but a batch of chat turns no longer pays for
  the one long document among them. On 1 CPU thread (SmolLM2), 14 requests at 200 tokens and 2 at
  2,000 take 232 ms a step ragged against 615 ms padded; 16 alike at 512 take 254 against 232
  (benchmarks/bench_decode_ragged.py, docs/results/bench_decode_ragged.txt).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from common.kv.kv_store import PagedKVStore

ATTENTION_NAME = "dopd_paged"


@dataclass
class PrefillBatch:
    seq_lens: list[int]
    cu_seqlens: torch.Tensor  # [n + 1] int32, offsets of each prompt in the packed sequence
    # (layer, k, v) with k, v: [kv_heads, total_tokens, head_dim]; called from the forward thread.
    on_layer_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None
    use_flash: bool = False


@dataclass
class DecodeBatch:
    store: PagedKVStore
    slot_mapping: torch.Tensor  # [batch] slot of each request's new token
    context_lens: torch.Tensor  # [batch] int32, tokens in context after this step's token
    block_tables: torch.Tensor  # [batch, max_blocks] int32 (padded with 0)
    # SDPA path: slots to read, [batch, max_context] padded or [sum of contexts] ragged.
    gather_slots: torch.Tensor | None
    attn_mask: torch.Tensor | None  # [batch, 1, 1, max_context] bool; None when no padding
    use_flash: bool = False
    # Ragged: request i's context is gather_slots[bounds[i]:bounds[i + 1]] (host ints: no sync per layer).
    ragged_bounds: list[int] | None = None


# Go ragged when padding would make the batch read this much more KV than it holds: the per-call
# cost of the ragged loop is then well paid (measured as in the module docstring).
RAGGED_PADDING_FACTOR = 1.25


def ragged_decode(context_lens: list[int]) -> bool:
    """Whether a decode step on the SDPA path should read its contexts ragged rather than padded."""
    return len(context_lens) * max(context_lens) > RAGGED_PADDING_FACTOR * sum(context_lens)


def _prefill_attention(module, query, key, value, scaling, batch: PrefillBatch):
    # query: [1, heads, total, dim]; key/value: [1, kv_heads, total, dim]
    if batch.on_layer_kv is not None:
        batch.on_layer_kv(module.layer_idx, key[0], value[0])
    if batch.use_flash:
        from flash_attn import flash_attn_varlen_func

        max_len = max(batch.seq_lens)
        out = flash_attn_varlen_func(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            batch.cu_seqlens, batch.cu_seqlens, max_len, max_len, softmax_scale=scaling, causal=True)
        return out.unsqueeze(0), None
    outputs = []
    bounds = list(itertools.accumulate(batch.seq_lens, initial=0))  # host-side: no device sync per layer
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        out, _ = sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
            scaling=scaling)
        outputs.append(out)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), None


@dataclass
class ChunkBatch:
    store: PagedKVStore
    start: int  # the chunk's first position
    slots: torch.Tensor  # [chunk] where its positions' K/V go
    context_slots: torch.Tensor  # [start + chunk] slots of positions 0 .. start + chunk - 1
    attn_mask: torch.Tensor | None  # [1, 1, chunk, start + chunk] bool; None for a first chunk (causal)


def _chunk_attention(module, query, key, value, scaling, batch: ChunkBatch):
    # query: [1, heads, chunk, dim]; key/value: [1, kv_heads, chunk, dim]
    store = batch.store
    layer = module.layer_idx
    store.write_tokens(layer, batch.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    if batch.start == 0:  # nothing before it: plain causal self-attention, as a prefill
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling)
    k = store.flat_k(layer)[batch.context_slots].transpose(0, 1).unsqueeze(0)
    v = store.flat_v(layer)[batch.context_slots].transpose(0, 1).unsqueeze(0)
    return sdpa_attention_forward(module, query, k, v, batch.attn_mask, scaling=scaling)


def chunk_mask(start: int, n: int, device) -> torch.Tensor:
    """[1, 1, n, start + n]: every earlier position, and the chunk's own causally."""
    mask = torch.ones(n, start + n, dtype=torch.bool)
    mask[:, start:] = torch.ones(n, n, dtype=torch.bool).tril()
    return mask.view(1, 1, n, start + n).to(device)


def _decode_attention(module, query, key, value, scaling, batch: DecodeBatch):
    # query: [batch, heads, 1, dim]; key/value: [batch, kv_heads, 1, dim]
    layer = module.layer_idx
    store = batch.store
    store.write_tokens(layer, batch.slot_mapping, key[:, :, 0], value[:, :, 0])
    if batch.use_flash:
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(
            query.transpose(1, 2), store.k[layer], store.v[layer], cache_seqlens=batch.context_lens,
            block_table=batch.block_tables, softmax_scale=scaling, causal=True)
        return out, None
    if batch.ragged_bounds is not None:
        return _ragged_decode_attention(module, query, scaling, batch), None
    bsz, max_ctx = batch.gather_slots.shape
    k = store.flat_k(layer)[batch.gather_slots.view(-1)].view(bsz, max_ctx, -1, key.shape[-1])
    v = store.flat_v(layer)[batch.gather_slots.view(-1)].view(bsz, max_ctx, -1, value.shape[-1])
    return sdpa_attention_forward(
        module, query, k.transpose(1, 2), v.transpose(1, 2), batch.attn_mask, scaling=scaling)


def _ragged_decode_attention(module, query, scaling, batch: DecodeBatch) -> torch.Tensor:
    # One unmasked SDPA call per request on its own context: [batch, 1, heads, dim] out.
    layer = module.layer_idx
    k_all = batch.store.flat_k(layer)[batch.gather_slots]  # [sum of contexts, kv_heads, dim]
    v_all = batch.store.flat_v(layer)[batch.gather_slots]
    bounds = batch.ragged_bounds
    outputs = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        out, _ = sdpa_attention_forward(
            module, query[i:i + 1], k_all[start:end].transpose(0, 1).unsqueeze(0),
            v_all[start:end].transpose(0, 1).unsqueeze(0), None, scaling=scaling)
        outputs.append(out)
    return torch.cat(outputs, dim=0)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    batch = kwargs.get("dopd_batch")
    if isinstance(batch, PrefillBatch):
        return _prefill_attention(module, query, key, value, scaling, batch)
    if isinstance(batch, DecodeBatch):
        return _decode_attention(module, query, key, value, scaling, batch)
    if isinstance(batch, ChunkBatch):
        return _chunk_attention(module, query, key, value, scaling, batch)
    raise RuntimeError(f"{ATTENTION_NAME} attention needs a dopd_batch keyword (PrefillBatch, DecodeBatch or "
                       "ChunkBatch)")


def _no_mask(*args, **kwargs):
    # Masks are implied by the batch description (packed causal segments, block tables).
    return None


def register() -> str:
    """Register the paged attention function (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME
