"""The `sim` engine: no weights. Forward passes take the time a latency profile gives, tokens are
deterministic pseudo-tokens, and prefill hands out per-layer K/V of the profiled model's real
size, so KV transfers carry the bytes the profiled model would through the same PushKV path.
Everything around it (engines, schedulers, block accounting, gateway, planner) is the real code.

`time_scale` runs the cluster that many times slower than the profile (sleeps are multiplied by
it); the benchmark divides measured latencies by it to report in profile time. It exists because
N simulated GPUs can emit tokens faster than one Python gateway on 2 cores can stream them.
"""

from __future__ import annotations

import time

import torch

from common.kv.block_pool import choose_block_size
from common.kv.kv_store import PagedKVStore, slots_for
from common.kv.layout import KVLayout, dtype_from_name
from common.modeling.base import DecodeInputs, LayerKVHook, PromptChunk
from common.modeling.registry import BuiltRunner, RunnerSpec, register_runner
from common.profile import LatencyProfile, load_profile
from common.types import SamplingParams

# Pseudo-tokens stay inside the SmolLM2 tokenizer's vocabulary, so the gateway can detokenize
# them, and above the special tokens, so none is ever EOS.
PSEUDO_TOKEN_LOW = 100
PSEUDO_TOKEN_HIGH = 49152


def pseudo_token(previous: int, position: int) -> int:
    return PSEUDO_TOKEN_LOW + (previous * 1_000_003 + position * 7919) % (PSEUDO_TOKEN_HIGH - PSEUDO_TOKEN_LOW)


def profile_layout(profile: LatencyProfile) -> KVLayout:
    m = profile.model
    return KVLayout(m.num_layers, m.num_kv_heads, m.head_dim, dtype_from_name(m.dtype))


class NullKVStore:
    """Block accounting without memory: a simulated GPU's KV pool holds no bytes here."""

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        return slots_for(block_table, start, end, self.block_size)

    def write_chunk(self, layer_start: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        pass  # the bytes crossed the wire and were checked; a simulated pool keeps nothing

    def read_chunk(self, layer_start: int, layer_end: int, slots: torch.Tensor) -> torch.Tensor:
        """Zeros of the real size: a migration moves the bytes the profiled model would."""
        return torch.zeros(layer_end - layer_start, 2, len(slots), self.layout.num_kv_heads, self.layout.head_dim,
                           dtype=self.layout.dtype)


# The scratch pool of a simulated GPU whose KV is read with NIXL: big enough that a transfer's
# blocks rarely fold onto each other (a Llama-3-8B block of 16 tokens is 2 MiB), small enough that
# 16 simulated workers fit on a laptop with room to spare.
SCRATCH_BYTES = 64 << 20


class ScratchKVStore(PagedKVStore):
    """A simulated GPU's pool that the `nixl` transport can read (its own pool registered with its
    NIXL agent, as a real worker's is): every block of the worker's `num_blocks` lives in one of
    a few real blocks (block % physical, `pool_blocks`), so a hand-off or a migration moves its
    real bytes at their real size, from registered memory into registered memory, in as many NIXL
    rows as a real pool would take, while the pool stays SCRATCH_BYTES. What the blocks hold means
    nothing (blocks alias each other): no simulated forward reads them. `num_blocks` (of the
    store) is the real blocks; the worker's BlockPool lends its own `num_blocks`."""

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int, scratch_bytes: int = SCRATCH_BYTES) -> None:
        physical = max(1, min(num_blocks, scratch_bytes // layout.bytes_for(block_size)))
        super().__init__(layout, physical, block_size, torch.device("cpu"))

    def pool_blocks(self, block_table: list[int]) -> list[int]:
        return [b % self.num_blocks for b in block_table]


def _sim_store(layout: KVLayout, num_blocks: int, block_size: int, nixl_kv: bool):
    """No bytes kept (NullKVStore) unless this worker's KV may go by NIXL (ScratchKVStore)."""
    if nixl_kv:
        return ScratchKVStore(layout, num_blocks, block_size)
    return NullKVStore(layout, num_blocks, block_size)


class SimRunner:
    def __init__(self, profile: LatencyProfile, num_blocks: int, block_size: int, time_scale: float = 1.0,
                 nixl_kv: bool = False) -> None:
        self.profile = profile
        self.layout = profile_layout(profile)
        self.store = _sim_store(self.layout, num_blocks, block_size, nixl_kv)
        self.time_scale = time_scale

    def prefill_sample(self, prompts: list[list[int]], params: list[SamplingParams],
                       on_layer_kv: LayerKVHook | None) -> list[int]:
        total = sum(len(p) for p in prompts)
        per_layer = self.profile.prefill_time(total) * self.time_scale / self.layout.num_layers
        kv = None
        if on_layer_kv is not None:  # one zero tensor of the real size, handed out for every layer
            kv = torch.zeros(self.layout.num_kv_heads, total, self.layout.head_dim, dtype=self.layout.dtype)
        start = time.perf_counter()
        for layer in range(self.layout.num_layers):
            _sleep_until(start + per_layer * (layer + 1))
            if kv is not None:
                on_layer_kv(layer, kv, kv)
        return [pseudo_token(p[-1], len(p)) for p in prompts]

    def decode_sample(self, tokens: list[int], positions: list[int], block_tables: list[list[int]],
                      params: list[SamplingParams], token_indices: list[int]) -> list[int]:
        mean_context = sum(positions) / len(positions) + 1
        _sleep_until(time.perf_counter() + self.profile.decode_step_time(len(tokens), mean_context) * self.time_scale)
        return [pseudo_token(t, p + 1) for t, p in zip(tokens, positions, strict=True)]

    def mixed_sample(self, chunks: list[PromptChunk], decode: DecodeInputs | None) -> tuple[list[int | None],
                                                                                               list[int]]:
        """One forward for the chunks and the decode step together, timed by
        profile.mixed_step_time (as `dopd simulate` times it)."""
        n = len(decode.tokens) if decode is not None else 0
        context = sum(decode.positions) / n + 1 if n else 0.0
        seconds = self.profile.mixed_step_time(n, context, sum(len(c.tokens) for c in chunks))
        _sleep_until(time.perf_counter() + seconds * self.time_scale)
        firsts = [pseudo_token(c.tokens[-1], c.start + len(c.tokens)) if c.params is not None else None
                  for c in chunks]
        tokens = [pseudo_token(t, p + 1) for t, p in zip(decode.tokens, decode.positions, strict=True)] if n else []
        return firsts, tokens


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


@register_runner("sim")
def build_sim_runner(spec: RunnerSpec) -> BuiltRunner:
    profile = load_profile(spec.model_arg)
    # A simulated GPU keeps the default block size (as `dopd simulate` does): its pool holds no bytes.
    block_size = choose_block_size(spec.block_size, False)
    return BuiltRunner(SimRunner(profile, spec.kv_blocks, block_size, spec.time_scale, spec.nixl_kv),
                       PSEUDO_TOKEN_HIGH,
                       f"sim ({profile.name}, time scale {spec.time_scale:g})")
