"""Paged KV cache: one block pool shared by all layers (which sequence holds which block: engine/block_manager.py)."""
from __future__ import annotations

import logging
import math

import torch

from ..errors import HybridEngineError
from ..models.llama import LlamaModel

logger = logging.getLogger(__name__)


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
        self.num_blocks = num_blocks
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
    """GPU: a fraction of the free memory (capped at room for max_num_seqs full-length requests). CPU: room for
    max_num_seqs full-length requests within CPU_KV_BUDGET bytes, and at least one."""
    per_seq = math.ceil((max_model_len + 1) / block_size)
    needed = per_seq * max_num_seqs
    per_block = PagedKVCache.bytes_per_block(model, block_size, dtype)
    if device.type != "cuda":
        return max(per_seq, min(needed, CPU_KV_BUDGET // per_block))
    free, total = torch.cuda.mem_get_info(device)
    budget = free - (1 - utilization) * total
    by_memory = int(budget // per_block)
    if by_memory < per_seq:
        raise HybridEngineError(f"not enough GPU memory for one {max_model_len}-token request: {by_memory} blocks fit, "
                                f"{per_seq} needed; lower max_model_len or raise gpu_memory_utilization")
    return min(by_memory, needed)


CPU_KV_BUDGET = 1 << 30  # blocks grow as sequences grow and preemption makes room: the CPU cache need not be full size
