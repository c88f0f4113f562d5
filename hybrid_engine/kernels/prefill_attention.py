"""Causal self-attention over one prompt (batch 1, no earlier cache), GQA, optionally a padded bucket."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, jit, next_pow2

tl = None  # triton.language, bound on first launch (see _triton.py)


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


def _prefill_kernel(Q, K, V, OUT, VALID_LEN, scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                    stride_vh, stride_ot, stride_oh, num_tokens, head_dim,
                    GROUP: tl.constexpr, HAS_VALID_LEN: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Causal flash attention for one query tile of one head; keys stop at the diagonal and at valid_len."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    kv_head = head // GROUP
    n_valid = num_tokens
    if HAS_VALID_LEN:
        n_valid = tl.minimum(tl.load(VALID_LEN).to(tl.int32), num_tokens)
    end_n = tl.where(start_m < n_valid, tl.minimum(start_m + BLOCK_M, n_valid), 0)  # padded tile: no work
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_mask = (d < head_dim)[None, :]
    q = tl.load(Q + rows[:, None].to(tl.int64) * stride_qt + head * stride_qh + d[None, :],
                mask=(rows < num_tokens)[:, None] & d_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, end_n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end_n
        kv_mask = col_mask[:, None] & d_mask
        k = tl.load(K + cols[:, None].to(tl.int64) * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask,
                    other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        scores = tl.where((cols[None, :] <= rows[:, None]) & col_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + cols[:, None].to(tl.int64) * stride_vt + kv_head * stride_vh + d[None, :], mask=kv_mask,
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + rows[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=(rows < num_tokens)[:, None] & d_mask)


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             valid_len: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `prefill_attention_ref`. Tiles at or past `valid_len` (a device tensor) do no work and
    write zeros; the grid depends only on T, so a padded bucket is graph-safe."""
    num_tokens, num_q_heads, head_dim = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    on_gpu = q.device.type == "cuda"
    block_m, block_n = (64, 64) if on_gpu else (16, 16)
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    jit(_prefill_kernel)[(cdiv(num_tokens, block_m), num_q_heads)](
        q, k, v, out, valid_len if valid_len is not None else q, scale, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), num_tokens, head_dim,
        GROUP=num_q_heads // k.shape[1], HAS_VALID_LEN=valid_len is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=next_pow2(max(head_dim, 16)), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2)
    return out


def make_xformers_prefill(xops):
    """Prefill attention through xformers' memory-efficient kernel (GQA via the 5-D BMGHK layout)."""
    causal = xops.LowerTriangularMask()

    def prefill_attention_xformers(q, k, v, scale, valid_len=None):
        tokens, num_q_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        q5 = q.reshape(1, tokens, num_kv_heads, group, head_dim)
        k5 = k.reshape(1, tokens, num_kv_heads, 1, head_dim).expand(1, tokens, num_kv_heads, group, head_dim)
        v5 = v.reshape(1, tokens, num_kv_heads, 1, head_dim).expand(1, tokens, num_kv_heads, group, head_dim)
        out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=causal, scale=scale)
        return out.reshape(tokens, num_q_heads, head_dim)

    return prefill_attention_xformers


def make_flash_prefill(flash_attn):
    """Prefill attention through flash-attn (native GQA)."""

    def prefill_attention_flash(q, k, v, scale, valid_len=None):
        return flash_attn.flash_attn_func(q[None], k[None], v[None], softmax_scale=scale, causal=True)[0]

    return prefill_attention_flash
