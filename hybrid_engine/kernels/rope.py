"""Rotary position embedding (neox / HF rotate_half style) applied to q and k in place."""
from __future__ import annotations

import torch

from ._triton import jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    xf = x[..., :rot].float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by `positions` [T].

    `cos_sin_cache` [max_pos, rot] holds cat(cos[:rot/2], sin[:rot/2]) per position (vLLM convention); the first
    `rot` channels of each head are rotated (rot == D for the Llama family). Math in fp32. Returns (q, k).
    """
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot = cos.shape[-1] * 2
    q[..., :rot] = _rotate(q, cos, sin)
    k[..., :rot] = _rotate(k, cos, sin)
    return q, k
