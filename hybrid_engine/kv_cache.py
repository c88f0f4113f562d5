"""Paged KV cache: one block pool shared by all layers, per-request block tables, flat slot mapping."""
from __future__ import annotations

import logging
import math
from collections import deque

import torch

from .errors import HybridEngineError
from .models.llama import LlamaModel

logger = logging.getLogger(__name__)


class BlockAllocator:
    """Hands out block ids; every id is either free or owned by exactly one request."""

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


class PagedKVCache:
    """K and V tensors of shape [layers, num_blocks, block_size, kv_heads, head_dim], bound to the model's layers."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, max_model_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        a = model.args
        shape = (a.num_layers, num_blocks + 1, block_size, a.num_kv_heads, a.head_dim)
        self.scratch_block = num_blocks  # never handed out: warm-up runs of graph steps write here
        # zeros, not empty: a reference backend may multiply masked garbage by 0, and NaN * 0 = NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.max_blocks_per_seq = self.blocks_for(max_model_len + 1)  # +1: the discarded look-ahead step
        self.allocator = BlockAllocator(num_blocks)
        for i, layer in enumerate(model.layers):
            layer.k_cache, layer.v_cache = self.k[i], self.v[i]
        logger.info("KV cache: %d blocks x %d tokens, %.1f MiB", num_blocks, block_size, self.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    @staticmethod
    def bytes_per_block(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
        a = model.args
        return 2 * a.num_layers * block_size * a.num_kv_heads * a.head_dim * dtype.itemsize


def num_blocks_for(model: LlamaModel, block_size: int, max_model_len: int, max_num_seqs: int,
                   dtype: torch.dtype, device: torch.device, utilization: float) -> int:
    """CPU: room for max_num_seqs full-length requests. GPU: a fraction of the free memory (capped at 8x that)."""
    per_seq = math.ceil((max_model_len + 1) / block_size)
    needed = per_seq * max_num_seqs
    if device.type != "cuda":
        return needed
    free, total = torch.cuda.mem_get_info(device)
    budget = free - (1 - utilization) * total
    by_memory = int(budget // PagedKVCache.bytes_per_block(model, block_size, dtype))
    if by_memory < per_seq:
        raise HybridEngineError(f"not enough GPU memory for one {max_model_len}-token request: {by_memory} blocks fit, "
                                f"{per_seq} needed; lower max_model_len or raise gpu_memory_utilization")
    return min(by_memory, 8 * needed)
