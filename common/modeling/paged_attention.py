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

The attention features a layer asks for arrive as keywords from its module, and every path honours
them as transformers' own kernels do, so that the served tokens are the model's:

- `sliding_window=W` (Mistral, Gemma2/3, Cohere2, Phi-3, Qwen2's upper layers; per layer where
  the model mixes sliding and global layers): a query at position q sees keys k with
  q - W < k <= q (transformers' `sliding_window_overlay`; flash-attn's `window_size=(W - 1, 0)`).
  Decode and chunks read only the window's positions from the pool. Blocks wholly behind every
  layer's window are not freed: a request keeps what it reserved (its KV is also what a
  migration or a replay would need, and models that mix global layers need all of it anyway).
- `softcap=C` (Gemma2): scores become C * tanh(scores / C) before the mask and the softmax.
  Torch SDPA cannot do it, so those layers run the eager arithmetic of transformers' Gemma2
  (`_softcapped_attention`); flash-attn takes `softcap` itself.
- Anything else that changes the arithmetic (attention sinks' `s_aux`) raises
  `UnsupportedAttention`: the worker refuses the model at load (common/modeling/support.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from common.kv.kv_store import PagedKVStore

ATTENTION_NAME = "dopd_paged"


class UnsupportedAttention(RuntimeError):
    """A layer asked for an attention feature these paths do not implement (`feature` names it)."""

    def __init__(self, feature: str) -> None:
        super().__init__(f"the paged attention does not implement {feature}")
        self.feature = feature


def layer_features(kwargs: dict) -> tuple[int | None, float | None]:
    """The (sliding window, soft-cap) a layer's attention call asks for; refuses what we lack."""
    if kwargs.get("s_aux") is not None:
        raise UnsupportedAttention("attention sinks")
    return kwargs.get("sliding_window") or None, kwargs.get("softcap") or None


def window_mask(q_start: int, q_len: int, k_start: int, k_len: int, window: int | None, device) -> torch.Tensor:
    """[1, 1, q_len, k_len] bool, True where query position q_start + i may see key position
    k_start + j: causal, and within the window when there is one."""
    q = torch.arange(q_start, q_start + q_len).unsqueeze(1)
    k = torch.arange(k_start, k_start + k_len).unsqueeze(0)
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    return mask.view(1, 1, q_len, k_len).to(device)


def _attend(module, query, key, value, mask, scaling, softcap) -> torch.Tensor:
    """Attention of query [b, heads, q, dim] over key/value [b, kv_heads, k, dim] -> [b, q, heads, dim].
    `mask` is bool [b or 1, 1, q, k] (True: attend), or None: causal when q > 1 (then q == k)."""
    if softcap is None:
        out, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)
        return out
    return _softcapped_attention(query, key, value, mask, scaling, softcap)


def _softcapped_attention(query, key, value, mask, scaling, softcap) -> torch.Tensor:
    # transformers' eager attention for Gemma2, step for step: scores, soft-cap, mask, softmax in fp32.
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and query.shape[2] > 1:
        mask = window_mask(0, query.shape[2], 0, key.shape[2], None, query.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def _flash_window(window: int | None) -> tuple[int, int]:
    return (window - 1, 0) if window is not None else (-1, -1)


@dataclass
class PrefillBatch:
    seq_lens: list[int]
    cu_seqlens: torch.Tensor  # [n + 1] int32, offsets of each prompt in the packed sequence
    # (layer, k, v) with k, v: [kv_heads, total_tokens, head_dim]; called from the forward thread.
    on_layer_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None
    use_flash: bool = False
    # (prompt length, window) -> its sliding-window mask, made once a forward, not once a layer.
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, n: int, window: int | None, device) -> torch.Tensor | None:
        """A prompt of n tokens: None (plain causal) unless the window cuts into it."""
        if window is None or n <= window:
            return None
        key = (n, window)
        if key not in self._masks:
            self._masks[key] = window_mask(0, n, 0, n, window, device)
        return self._masks[key]


@dataclass
class ContextView:
    """What a decode step's SDPA path reads for one window (None: whole contexts): each request's
    positions [start, context_len), gathered from the pool through its block table."""

    gather_slots: torch.Tensor  # [batch, longest] padded, or [sum of lengths] ragged
    attn_mask: torch.Tensor | None  # [batch, 1, 1, longest] bool; None when no padding
    ragged_bounds: list[int] | None  # ragged: request i's are gather_slots[bounds[i]:bounds[i + 1]]


def context_view(tables: torch.Tensor, context_lens: list[int], block_size: int, null_slot: int,
                 window: int | None, device) -> ContextView:
    """The slots a decode step reads: `tables` [batch, max_blocks] int64 on the host, each
    request's last `window` positions (all with None), padded or ragged as `ragged_decode` picks."""
    starts = [max(0, n - window) for n in context_lens] if window is not None else [0] * len(context_lens)
    lens = [n - s for n, s in zip(context_lens, starts, strict=True)]
    longest = max(lens)
    offsets = torch.arange(longest).unsqueeze(0)
    valid = offsets < torch.tensor(lens).unsqueeze(1)
    positions = torch.where(valid, torch.tensor(starts).unsqueeze(1) + offsets, 0)
    slots = tables.gather(1, positions // block_size) * block_size + positions % block_size
    if ragged_decode(lens):
        return ContextView(slots[valid].to(device), None, list(itertools.accumulate(lens, initial=0)))
    mask = valid[:, None, None, :].to(device) if min(lens) != longest else None
    return ContextView(torch.where(valid, slots, null_slot).to(device), mask, None)


@dataclass
class DecodeBatch:
    store: PagedKVStore
    slot_mapping: torch.Tensor  # [batch] slot of each request's new token
    context_lens: torch.Tensor  # [batch] int32, tokens in context after this step's token
    block_tables: torch.Tensor  # [batch, max_blocks] int32 (padded with the null block)
    use_flash: bool = False
    # SDPA path: the host-side tables and lengths the context views are made from (no device sync).
    host_tables: torch.Tensor | None = None  # [batch, max_blocks] int64
    host_context_lens: list[int] | None = None
    _views: dict = field(default_factory=dict, repr=False)

    def view(self, window: int | None) -> ContextView:
        """The positions a layer of this window reads, made once a step for each window (every
        layer after the first of a window finds it here: nothing is recomputed per layer)."""
        view = self._views.get(window)
        if view is None:
            reaches = window is None or max(self.host_context_lens) > window
            if not reaches:  # no request's context reaches past the window: the whole context
                view = self.view(None)
            else:
                view = context_view(self.host_tables, self.host_context_lens, self.store.block_size,
                                    self.store.null_slot, window, self.slot_mapping.device)
            self._views[window] = view
        return view


# Go ragged when padding would make the batch read this much more KV than it holds: the per-call
# cost of the ragged loop is then well paid (measured as in the module docstring).
RAGGED_PADDING_FACTOR = 1.25


def ragged_decode(context_lens: list[int]) -> bool:
    """Whether a decode step on the SDPA path should read its contexts ragged rather than padded."""
    return len(context_lens) * max(context_lens) > RAGGED_PADDING_FACTOR * sum(context_lens)


def _prefill_attention(module, query, key, value, scaling, batch: PrefillBatch, window, softcap):
    # query: [1, heads, total, dim]; key/value: [1, kv_heads, total, dim]
    if batch.on_layer_kv is not None:
        batch.on_layer_kv(module.layer_idx, key[0], value[0])
    if batch.use_flash:
        from flash_attn import flash_attn_varlen_func

        max_len = max(batch.seq_lens)
        out = flash_attn_varlen_func(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            batch.cu_seqlens, batch.cu_seqlens, max_len, max_len, softmax_scale=scaling, causal=True,
            window_size=_flash_window(window), softcap=softcap or 0.0)
        return out.unsqueeze(0), None
    outputs = []
    bounds = list(itertools.accumulate(batch.seq_lens, initial=0))  # host-side: no device sync per layer
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        outputs.append(_attend(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                               batch.mask(end - start, window, query.device), scaling, softcap))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), None


@dataclass
class ChunkBatch:
    store: PagedKVStore
    start: int  # the chunk's first position
    slots: torch.Tensor  # [chunk] where its positions' K/V go
    context_slots: torch.Tensor  # [start + chunk] slots of positions 0 .. start + chunk - 1
    _keys: dict = field(default_factory=dict, repr=False)

    def keys(self, window: int | None) -> tuple[int, torch.Tensor | None]:
        """(the first key position a layer of this window reads, its mask): None for a first
        chunk that no window cuts into (plain causal over the chunk)."""
        found = self._keys.get(window)
        if found is None:
            n = len(self.slots)
            end = self.start + n
            cut = window if window is not None and end > window else None  # None: no query reaches past it
            first = max(0, self.start - cut + 1) if cut is not None else 0
            plain = self.start == 0 and cut is None
            mask = None if plain else window_mask(self.start, n, first, end - first, cut, self.slots.device)
            found = self._keys[window] = (first, mask)
        return found


def _chunk_attention(module, query, key, value, scaling, batch: ChunkBatch, window, softcap):
    # query: [1, heads, chunk, dim]; key/value: [1, kv_heads, chunk, dim]
    store = batch.store
    layer = module.layer_idx
    store.write_tokens(layer, batch.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    first, mask = batch.keys(window)
    if batch.start == 0:  # nothing before it: self-attention over the chunk, as a prefill
        return _attend(module, query, key, value, mask, scaling, softcap), None
    slots = batch.context_slots[first:]
    k = store.flat_k(layer)[slots].transpose(0, 1).unsqueeze(0)
    v = store.flat_v(layer)[slots].transpose(0, 1).unsqueeze(0)
    return _attend(module, query, k, v, mask, scaling, softcap), None


def _decode_attention(module, query, key, value, scaling, batch: DecodeBatch, window, softcap):
    # query: [batch, heads, 1, dim]; key/value: [batch, kv_heads, 1, dim]
    layer = module.layer_idx
    store = batch.store
    store.write_tokens(layer, batch.slot_mapping, key[:, :, 0], value[:, :, 0])
    if batch.use_flash:
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(
            query.transpose(1, 2), store.k[layer], store.v[layer], cache_seqlens=batch.context_lens,
            block_table=batch.block_tables, softmax_scale=scaling, causal=True,
            window_size=_flash_window(window), softcap=softcap or 0.0)
        return out, None
    view = batch.view(window)
    if view.ragged_bounds is not None:
        return _ragged_decode_attention(module, query, scaling, store, view, softcap), None
    bsz, longest = view.gather_slots.shape
    k = store.flat_k(layer)[view.gather_slots.view(-1)].view(bsz, longest, -1, key.shape[-1])
    v = store.flat_v(layer)[view.gather_slots.view(-1)].view(bsz, longest, -1, value.shape[-1])
    return _attend(module, query, k.transpose(1, 2), v.transpose(1, 2), view.attn_mask, scaling, softcap), None


def _ragged_decode_attention(module, query, scaling, store: PagedKVStore, view: ContextView,
                             softcap) -> torch.Tensor:
    # One unmasked call per request on its own context: [batch, 1, heads, dim] out.
    layer = module.layer_idx
    k_all = store.flat_k(layer)[view.gather_slots]  # [sum of contexts, kv_heads, dim]
    v_all = store.flat_v(layer)[view.gather_slots]
    bounds = view.ragged_bounds
    outputs = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        outputs.append(_attend(module, query[i:i + 1], k_all[start:end].transpose(0, 1).unsqueeze(0),
                               v_all[start:end].transpose(0, 1).unsqueeze(0), None, scaling, softcap))
    return torch.cat(outputs, dim=0)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    batch = kwargs.get("dopd_batch")
    window, softcap = layer_features(kwargs)
    if isinstance(batch, PrefillBatch):
        return _prefill_attention(module, query, key, value, scaling, batch, window, softcap)
    if isinstance(batch, DecodeBatch):
        return _decode_attention(module, query, key, value, scaling, batch, window, softcap)
    if isinstance(batch, ChunkBatch):
        return _chunk_attention(module, query, key, value, scaling, batch, window, softcap)
    # The model's attention layer did not pass the forward's keywords on to the attention function.
    raise UnsupportedAttention("attention layers that do not pass the forward's keywords on (no dopd_batch)")


def _no_mask(*args, **kwargs):
    # Masks are implied by the batch description (packed causal segments, block tables).
    return None


def register() -> str:
    """Register the paged attention function (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME
