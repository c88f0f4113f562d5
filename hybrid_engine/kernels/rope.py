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


def rope_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
    """`rope_ref` then `store_kv_ref` of the roped k: returns (q, k), both rotated in place."""
    from .kv_store import store_kv_ref

    q, k = rope_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def _rope_store_kernel(Q, K, V, POS, CACHE, K_CACHE, V_CACHE, SLOTS, stride_qt, stride_qh, stride_kt, stride_kh,
                       stride_vt, stride_vh, stride_cache, stride_cb, stride_co, stride_ch, num_q_heads,
                       num_kv_heads, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(POS + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(CACHE + pos * stride_cache + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CACHE + pos * stride_cache + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # q heads: rotate in place
    mask = (heads[:, None] < num_q_heads) & col_mask[None, :]
    ptr = Q + token * stride_qt + heads[:, None] * stride_qh + cols[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(Q.dtype.element_ty), mask=mask)
    # k heads: rotate in place and write to the cache slot (slot < 0: padding, no cache write)
    slot = tl.load(SLOTS + token).to(tl.int64)
    kv_heads = heads[:, None] < num_kv_heads
    mask = kv_heads & col_mask[None, :]
    ptr = K + token * stride_kt + heads[:, None] * stride_kh + cols[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    k1 = (x1 * cos - x2 * sin).to(K.dtype.element_ty)
    k2 = (x2 * cos + x1 * sin).to(K.dtype.element_ty)
    tl.store(ptr, k1, mask=mask)
    tl.store(ptr + HALF, k2, mask=mask)
    cache_row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + heads[:, None] * stride_ch
    slot_ok = (tl.zeros([BLOCK_H, 1], tl.int64) + slot) >= 0
    cmask = mask & slot_ok
    tl.store(K_CACHE + cache_row + cols[None, :], k1.to(K_CACHE.dtype.element_ty), mask=cmask)
    tl.store(K_CACHE + cache_row + HALF + cols[None, :], k2.to(K_CACHE.dtype.element_ty), mask=cmask)
    if HALF * 2 < HEAD_DIM:  # partial rotary: the unrotated tail of k goes to the cache unchanged
        tail = 2 * HALF + tl.arange(0, BLOCK_D)
        tmask = kv_heads & (tail < HEAD_DIM)[None, :]
        kt = tl.load(K + token * stride_kt + heads[:, None] * stride_kh + tail[None, :], mask=tmask)
        tl.store(K_CACHE + cache_row + tail[None, :], kt.to(K_CACHE.dtype.element_ty), mask=tmask & slot_ok)
    dims = tl.arange(0, BLOCK_D)
    vmask = kv_heads & (dims < HEAD_DIM)[None, :]
    vv = tl.load(V + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=vmask)
    tl.store(V_CACHE + cache_row + dims[None, :], vv.to(V_CACHE.dtype.element_ty), mask=vmask & slot_ok)


def rope_store_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
    """Fused `rope_store_kv_ref`: q and k rotated in place, roped k and v written to their cache slots (-1: none).
    Grid: tokens x head groups (a decode token spreads over several SMs)."""
    if (q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1
            or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride()):
        return rope_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = cos_sin_cache.shape[-1] // 2
    max_heads = max(num_q_heads, num_kv_heads)
    block_h = min(next_pow2(max_heads), 4 if tokens <= 4 else 16)
    if tokens > 0:
        jit(_rope_store_kernel)[(tokens, -(-max_heads // block_h))](
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), num_q_heads, num_kv_heads, HALF=half, HEAD_DIM=head_dim,
            BLOCK_SIZE=k_cache.shape[1], BLOCK_H=block_h, BLOCK_HALF=next_pow2(half),
            BLOCK_D=next_pow2(head_dim), num_warps=1 if block_h * head_dim <= 512 else 4)
    return q, k
