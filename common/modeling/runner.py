"""Runs the model's forward passes for the role engines: packed prefill and paged batched decode.

Called from one executor thread per worker (the model is not re-entrant); everything it reads
about requests comes in as plain lists, so the engines own all scheduling state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from common.kv.block_pool import FLASH_PAGE_MULTIPLE, choose_block_size, flash_pages
from common.kv.kv_store import PagedKVStore
from common.kv.layout import KVLayout, dtype_from_name
from common.modeling import paged_attention, support
from common.modeling.base import DecodeInputs, LayerKVHook, PromptChunk, Runner, mixed_one_after_the_other
from common.modeling.loader import LoadedModel, load_model
from common.modeling.paged_attention import ChunkBatch, DecodeBatch, PrefillBatch
from common.modeling.registry import BuiltRunner, RunnerSpec, register_runner
from common.sampling import sample_batch
from common.types import SamplingParams

__all__ = ["FLASH_PAGE_MULTIPLE", "LayerKVHook", "ModelRunner", "Runner", "kv_layout"]

log = logging.getLogger(__name__)


def kv_layout(loaded: LoadedModel) -> KVLayout:
    config = loaded.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVLayout(config.num_hidden_layers, kv_heads(config), head_dim, loaded.dtype)


def kv_heads(config) -> int:
    """KV heads a layer keeps, under the names configs give them: GQA's num_key_value_heads,
    Falcon's num_kv_heads (or one, multi-query), else one per attention head (GPT-NeoX)."""
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1  # Falcon's first architecture: one KV head, whatever num_kv_heads says
    for name in ("num_key_value_heads", "num_kv_heads"):
        if getattr(config, name, None):
            return getattr(config, name)
    return config.num_attention_heads



class ModelRunner:
    """The engines call `prefill_sample` and `decode_sample`; SimRunner offers the same two."""

    def __init__(self, loaded: LoadedModel, store: PagedKVStore) -> None:
        self.model = loaded.model
        self.store = store
        self.device = loaded.device
        self.use_flash = loaded.attention == "flash_attention_2"
        # flash-attn's paged kernel takes blocks of a multiple of 256 tokens only (the auto block
        # size on flash-attn); with other blocks, decode gathers through the block tables and
        # runs SDPA like the CPU does.
        self.use_flash_decode = self.use_flash and flash_pages(store.block_size)
        if self.use_flash and not self.use_flash_decode:
            log.warning("KV blocks of %d tokens: flash-attn's paged kernel takes multiples of %d only, so decode "
                        "gathers the context and runs SDPA (unset DOPD_BLOCK_SIZE, or set a multiple of %d, to "
                        "read blocks in place)", store.block_size, FLASH_PAGE_MULTIPLE, FLASH_PAGE_MULTIPLE)
        self.model.set_attn_implementation(paged_attention.register())

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]],
                on_layer_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None) -> torch.Tensor:
        """Run prompts packed into one sequence; return the logits of each prompt's last token."""
        seq_lens = [len(p) for p in prompts]
        input_ids = torch.tensor([t for p in prompts for t in p], device=self.device).unsqueeze(0)
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(self.device).unsqueeze(0)
        cu = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)
        batch = PrefillBatch(seq_lens, cu, on_layer_kv, self.use_flash)
        out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False,
                         logits_to_keep=(cu[1:] - 1).long(), dopd_batch=batch)
        return out.logits[0].float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One step: token i sits at position positions[i] of its request; return [batch, vocab] logits."""
        bs = self.store.block_size
        context_lens = [p + 1 for p in positions]
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [self.store.null_block] * (max_blocks - len(t)) for t in block_tables],
                              dtype=torch.int64)
        pos = torch.tensor(positions, dtype=torch.int64)
        slot_mapping = tables.gather(1, (pos // bs).unsqueeze(1)).squeeze(1) * bs + pos % bs
        # SDPA reads each layer's context through the block tables: DecodeBatch.view makes what a
        # layer of each window reads, once a step, from these host-side tables.
        batch = DecodeBatch(
            store=self.store, slot_mapping=slot_mapping.to(self.device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
            block_tables=tables.to(torch.int32).to(self.device), use_flash=self.use_flash_decode,
            host_tables=tables, host_context_lens=context_lens)
        out = self.model(input_ids=torch.tensor(tokens, device=self.device).unsqueeze(1),
                         position_ids=pos.to(self.device).unsqueeze(1), use_cache=False, dopd_batch=batch)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def prefill_chunk(self, chunk: PromptChunk) -> torch.Tensor:
        """One chunk of a prompt whose KV stays here, its K/V written into the pool; the logits of
        its last token ([vocab])."""
        n = len(chunk.tokens)
        context_slots = self.store.slots(chunk.block_table, 0, chunk.start + n).to(self.device)
        batch = ChunkBatch(self.store, chunk.start, context_slots[chunk.start:], context_slots)
        positions = torch.arange(chunk.start, chunk.start + n, device=self.device).unsqueeze(0)
        out = self.model(input_ids=torch.tensor(chunk.tokens, device=self.device).unsqueeze(0),
                         position_ids=positions, use_cache=False, logits_to_keep=1, dopd_batch=batch)
        return out.logits[0, -1].float()

    def prefill_chunk_sample(self, chunk: PromptChunk) -> int | None:
        logits = self.prefill_chunk(chunk)
        return None if chunk.params is None else sample_batch(logits.unsqueeze(0), [chunk.params], [0])[0]

    def mixed_sample(self, chunks: list[PromptChunk], decode: DecodeInputs | None) -> tuple[list[int | None],
                                                                                               list[int]]:
        # No fused mixed-batch kernel here: the chunks' forwards, then the decode step's.
        return mixed_one_after_the_other(self, chunks, decode)

    def prefill_sample(self, prompts: list[list[int]], params: list[SamplingParams],
                       on_layer_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None) -> list[int]:
        """Prefill and sample each prompt's first token (token index 0 of its completion)."""
        return sample_batch(self.prefill(prompts, on_layer_kv), params, [0] * len(prompts))

    def decode_sample(self, tokens: list[int], positions: list[int], block_tables: list[list[int]],
                      params: list[SamplingParams], token_indices: list[int]) -> list[int]:
        return sample_batch(self.decode(tokens, positions, block_tables), params, token_indices)


@register_runner("hf")
def build_hf_runner(spec: RunnerSpec) -> BuiltRunner:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=False) as progress:
        task = progress.add_task(f"loading {spec.model}", total=3)
        loaded = load_model(spec.model, spec.device, dtype_from_name(spec.dtype))
        support.refuse_unsupported(spec.model, loaded.config, loaded.model)
        progress.update(task, advance=1, description="allocating the KV pool")
        block_size = choose_block_size(spec.block_size, loaded.attention == "flash_attention_2")
        runner = ModelRunner(loaded, PagedKVStore(kv_layout(loaded), spec.kv_blocks, block_size, loaded.device,
                                                  shared=spec.shared_kv))
        progress.update(task, advance=1, description="checking the paged paths against the model's own forward")
        error = support.check_exact(spec.model, runner, loaded.attention)
        progress.update(task, advance=1, description=f"{spec.model} ready")
    log.info("%s (%s): paged paths within %.1e of the model's own forward", spec.model, loaded.config.model_type,
             error)
    decode = "flash_attn_with_kvcache on the blocks" if runner.use_flash_decode else "sdpa"
    prefill = "flash_attention_2" if runner.use_flash else "sdpa"  # the paged paths' kernels, not the reference's
    return BuiltRunner(runner, loaded.config.vocab_size, f"{prefill}, decode {decode}")
