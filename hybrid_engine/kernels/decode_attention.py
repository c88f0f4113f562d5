"""Paged decode attention: one query token per sequence over its cached tokens (flash-decoding, split-K)."""
from __future__ import annotations

import torch

from ._triton import jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D]; caches [N, block_size, Hkv, D]; block_tables [B, max_blocks]; seq_lens [B] -> [B, Hq, D].

    Gathers every table entry (no host read of seq_lens) and masks positions >= seq_lens[b]; math in fp32.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    tables = block_tables.long().clamp(min=0)
    k = k_cache[tables].reshape(batch, -1, num_kv_heads, head_dim).float()
    v = v_cache[tables].reshape(batch, -1, num_kv_heads, head_dim).float()
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    masked = pos[None, :] >= seq_lens.long()[:, None]
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
