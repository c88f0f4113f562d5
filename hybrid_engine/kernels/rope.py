"""Rotary position embedding (neox / HF rotate_half style) applied to q and k in place."""
from __future__ import annotations

import torch

from ._triton import jit, next_pow2

tl = None  # triton.language, bound on first launch (see _triton.py)


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


def _rope_kernel(Q, K, POS, CACHE, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache, num_q_heads,
                 num_kv_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(CACHE + pos * stride_cache + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CACHE + pos * stride_cache + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    heads = tl.arange(0, BLOCK_H)
    # q heads
    mask = (heads[:, None] < num_q_heads) & col_mask[None, :]
    ptr = Q + token * stride_qt + heads[:, None] * stride_qh + cols[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(Q.dtype.element_ty), mask=mask)
    # k heads
    mask = (heads[:, None] < num_kv_heads) & col_mask[None, :]
    ptr = K + token * stride_kt + heads[:, None] * stride_kh + cols[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(K.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(K.dtype.element_ty), mask=mask)


def rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Triton version of `rope_ref`: in place, one program per token for all of its q and k heads."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        return rope_ref(q, k, positions, cos_sin_cache)
    tokens, num_q_heads, _ = q.shape
    half = cos_sin_cache.shape[-1] // 2
    block_h = next_pow2(max(num_q_heads, k.shape[1]))
    if tokens > 0:
        jit(_rope_kernel)[(tokens,)](
            q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), num_q_heads, k.shape[1], HALF=half, BLOCK_H=block_h,
            BLOCK_HALF=next_pow2(half), num_warps=4 if block_h * half >= 1024 else 1)
    return q, k
