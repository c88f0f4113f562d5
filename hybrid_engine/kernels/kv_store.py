"""Write the new tokens' k/v into the paged KV cache at their flat slots (slot -1 = padding, write nothing)."""
from __future__ import annotations

import torch

from ._triton import jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot = block * block_size + offset."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)
