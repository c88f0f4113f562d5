"""Causal self-attention over one prompt (batch 1, no earlier cache), GQA, optionally a padded bucket."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          valid_len: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], causal, through torch SDPA.

    `valid_len` needs no special handling: with a causal mask, real queries (rows < valid_len) only see real keys;
    padded rows see padded keys, which are finite, so their (ignored) output is finite.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)
