"""KV-cache block bookkeeping: which block ids are free, which sequence holds which, growth as sequences grow."""
from __future__ import annotations

import math
from collections import deque

from ..errors import HybridEngineError


class BlockAllocator:
    """Hands out block ids; every id is either free or owned by exactly one sequence."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise HybridEngineError(f"KV cache full: {n} blocks wanted, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        if not self._used.issuperset(blocks) or len(set(blocks)) != len(blocks):
            bad = sorted({b for b in blocks if b not in self._used or blocks.count(b) > 1})
            raise HybridEngineError(f"blocks {bad[:5]} freed twice or never allocated")
        self._used.difference_update(blocks)
        self._free.extend(blocks)


class BlockManager:
    """Grows each sequence's block table as its KV grows (blocks are never reserved up front)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks `table` lacks to hold `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Append blocks to `table` (in place) until it holds `num_tokens` positions; returns the new ids."""
        new = self.allocator.allocate(self.missing(table, num_tokens))
        table.extend(new)
        return new

    def release(self, table: list[int]) -> None:
        """Free every block of `table` and empty it."""
        if table:
            self.allocator.free(table)
            table.clear()
