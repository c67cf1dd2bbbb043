"""A pool of fixed-size KV blocks: which blocks are free, which are lent out. Pure, no tensors.

Invariant: every block id in [0, num_blocks) is either in the free list or owned by exactly one
request; `num_free + num_used == num_blocks` always. Freeing a block that is already free is a
bug in the caller and raises, so leaks and double frees surface in tests rather than as
corrupted KV.
"""

from __future__ import annotations

DEFAULT_BLOCK_SIZE = 16
# flash-attn's paged decode kernel (`flash_attn_with_kvcache(block_table=...)`) takes pages of a
# multiple of this many tokens only ("Paged KV cache block size must be divisible by 256").
FLASH_PAGE_MULTIPLE = 256


def flash_pages(block_size: int) -> bool:
    """Whether flash-attn's paged kernel can read blocks of this size in place."""
    return block_size % FLASH_PAGE_MULTIPLE == 0


def choose_block_size(requested: int, flash_attention: bool) -> int:
    """Tokens per KV block. `requested` when set; 0 means auto: FLASH_PAGE_MULTIPLE where decode runs
    flash-attn (CUDA, flash-attn importable, fp16/bf16), so that its kernel reads the pool in place,
    else DEFAULT_BLOCK_SIZE. An explicit size that flash-attn cannot page is kept: decode then
    gathers through the block tables and runs SDPA (the runner logs a warning)."""
    if requested < 0:
        raise ValueError(f"block_size must be positive, or 0 for auto; got {requested}")
    if requested:
        return requested
    return FLASH_PAGE_MULTIPLE if flash_attention else DEFAULT_BLOCK_SIZE


def kv_tokens_for(prompt_len: int, max_tokens: int) -> int:
    """KV a request needs at most: its prompt and every completion token but the last (whose
    KV is never computed)."""
    return prompt_len + max_tokens - 1


class OutOfBlocks(Exception):
    """Not enough free blocks for a reservation."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the block freed last is lent first. Its memory is resident and warm (a CPU pool
        # is allocated lazily, and first-touching a page costs ~3 ms/MB on these machines).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise OutOfBlocks(f"need {num_blocks} KV blocks, {len(self._free)} of {self.num_blocks} free")
        blocks = [self._free.pop() for _ in range(num_blocks)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give `blocks` back, all or none: a block not lent (or named twice) changes nothing."""
        bad = next((b for b in blocks if b not in self._used), None)
        if bad is not None or len(set(blocks)) != len(blocks):
            raise ValueError(f"block {bad if bad is not None else 'listed twice'} freed but not in use")
        for block in reversed(blocks):  # the next request gets them in the same order
            self._used.remove(block)
            self._free.append(block)

