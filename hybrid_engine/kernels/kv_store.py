"""Write the new tokens' k/v into the paged KV cache at their flat slots (slot -1 = padding, write nothing)."""
from __future__ import annotations

import torch

from ._triton import launch, next_pow2

tl = None  # triton.language, bound on first launch (see _triton.py)


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot = block * block_size + offset."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def _store_kv_kernel(K, V, K_CACHE, V_CACHE, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_co, stride_ch, num_kv_heads, head_dim, BLOCK_SIZE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim) & ((tl.zeros([BLOCK_H, 1], tl.int64) + slot) >= 0)
    cache_off = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + heads * stride_ch + dims
    k = tl.load(K + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(V + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(K_CACHE + cache_off, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(V_CACHE + cache_off, v.to(V_CACHE.dtype.element_ty), mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Triton version of `store_kv_ref`: one program per token; slot -1 writes nothing (no host sync)."""
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        return store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    tokens, num_kv_heads, head_dim = k.shape
    block_h, block_d = next_pow2(num_kv_heads), next_pow2(head_dim)
    if tokens > 0:
        launch(_store_kv_kernel, (tokens,),
            k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_kv_heads, head_dim,
            BLOCK_SIZE=k_cache.shape[1], BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=4 if block_h * block_d >= 2048 else 1)
