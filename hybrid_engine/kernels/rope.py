"""Rotary position embedding (neox / HF rotate_half style) applied to q and k in place."""
from __future__ import annotations

import torch

from ._triton import jit_helpers, launch, next_pow2, pdl_enter

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


def _rotate_half(ptr, mask, cos, sin, HALF: tl.constexpr):
    """Load the two rotary halves at ptr and ptr + HALF and rotate them: (x1 cos - x2 sin, x2 cos + x1 sin), fp32."""
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def _rope_in_place(ptr, mask, cos, sin, HALF: tl.constexpr):
    """Rotate the halves at ptr in place; returns them as stored (in the tensor's dtype)."""
    a, b = _rotate_half(ptr, mask, cos, sin, HALF)
    a = a.to(ptr.dtype.element_ty)
    b = b.to(ptr.dtype.element_ty)
    tl.store(ptr, a, mask=mask)
    tl.store(ptr + HALF, b, mask=mask)
    return a, b


_HELPERS = ("_rotate_half", "_rope_in_place")


def _rope_kernel(Q, K, POS, CACHE, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache, num_q_heads,
                 num_kv_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 PDL: tl.constexpr = 0):
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(CACHE + pos * stride_cache + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CACHE + pos * stride_cache + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    heads = tl.arange(0, BLOCK_H)
    _rope_in_place(Q + token * stride_qt + heads[:, None] * stride_qh + cols[None, :],
                   (heads[:, None] < num_q_heads) & col_mask[None, :], cos, sin, HALF)
    _rope_in_place(K + token * stride_kt + heads[:, None] * stride_kh + cols[None, :],
                   (heads[:, None] < num_kv_heads) & col_mask[None, :], cos, sin, HALF)


def rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Triton version of `rope_ref`: in place, one program per token for all of its q and k heads."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        return rope_ref(q, k, positions, cos_sin_cache)
    tokens, num_q_heads, _ = q.shape
    half = cos_sin_cache.shape[-1] // 2
    block_h = next_pow2(max(num_q_heads, k.shape[1]))
    if tokens > 0:
        jit_helpers(globals(), _HELPERS)
        launch(_rope_kernel, (tokens,),
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
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(POS + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(CACHE + pos * stride_cache + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CACHE + pos * stride_cache + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # q heads: rotate in place
    _rope_in_place(Q + token * stride_qt + heads[:, None] * stride_qh + cols[None, :],
                   (heads[:, None] < num_q_heads) & col_mask[None, :], cos, sin, HALF)
    # k heads: rotate in place and write to the cache slot (slot < 0: padding, no cache write)
    slot = tl.load(SLOTS + token).to(tl.int64)
    kv_heads = heads[:, None] < num_kv_heads
    mask = kv_heads & col_mask[None, :]
    k1, k2 = _rope_in_place(K + token * stride_kt + heads[:, None] * stride_kh + cols[None, :], mask, cos, sin,
                            HALF)
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
        jit_helpers(globals(), _HELPERS)
        launch(_rope_store_kernel, (tokens, -(-max_heads // block_h)),
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), num_q_heads, num_kv_heads, HALF=half, HEAD_DIM=head_dim,
            BLOCK_SIZE=k_cache.shape[1], BLOCK_H=block_h, BLOCK_HALF=next_pow2(half),
            BLOCK_D=next_pow2(head_dim), num_warps=1 if block_h * head_dim <= 512 else 4)
    return q, k
