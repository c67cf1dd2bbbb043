"""A pool of fixed-size KV blocks: which blocks are free, which are lent out. Pure, no tensors.

Invariant: every block id in [0, num_blocks) is either in the free list or owned by exactly one
request; `num_free + num_used == num_blocks` always. Freeing a block that is already free is a
bug in the caller and raises, so leaks and double frees surface in tests rather than as
corrupted KV.
"""

from __future__ import annotations


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
        for block in reversed(blocks):  # the next request gets them in the same order
            if block not in self._used:
                raise ValueError(f"block {block} freed but not in use")
            self._used.remove(block)
            self._free.append(block)

