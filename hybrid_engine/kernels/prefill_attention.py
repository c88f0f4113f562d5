"""Causal self-attention over one prompt (batch 1), GQA, optionally a padded bucket, alone or fused with rope and
the KV-cache writes. Attention of new tokens after cached positions is in cached_prefill_attention.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gemm
from ._triton import cdiv, jit_helpers, launch, next_pow2, pdl_enter
from .rope import _rotate_half, rope_store_kv_triton  # noqa: F401 (_rotate_half: called by _rope_tile)
# re-exported: callers that imported the cached-prefill kernels from here before they moved keep working
from .cached_prefill_attention import cached_prefill_attention_ref, cached_prefill_attention_triton  # noqa: F401

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
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = 0):
    """Causal flash attention for one query tile of one head; keys stop at the diagonal and at valid_len."""
    pdl_enter(PDL)
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


# GPU tile config (BLOCK_M, BLOCK_N, num_warps, num_stages) by prompt length: the first entry with T <= max_T.
# Measured on the H100 with benchmarks/prefill_attn_sweep.py (LLaMA-2-7B heads, fp16).
# (benchmarks/results/nvidia-h100-80gb-hbm3-llama-2-7b-shape-2026-11-26-prefill-attn.json;
# us per call at T = 16 / 64 / 128 / 208 / 512: 3.0 / 3.4 / 4.8 / 7.4 / 17.1, against 64x64 tiles with 2 stages
# everywhere: ~3.7 / 4.1 / 5.4 / 7.95 / 18.5)
PREFILL_CONFIGS: list[tuple[int, tuple[int, int, int, int]]] = [
    (32, (16, 32, 4, 2)), (64, (16, 64, 4, 2)), (128, (32, 128, 4, 2)), (1 << 30, (64, 64, 4, 3))]
CPU_CONFIG = (16, 16, 4, 2)  # the interpreter: small tiles keep the CPU tests fast


def config_for(num_tokens: int) -> tuple[int, int, int, int]:
    return next(cfg for max_t, cfg in PREFILL_CONFIGS if num_tokens <= max_t)


def _default_config(q: torch.Tensor) -> tuple[int, int, int, int]:
    return config_for(q.shape[0]) if q.device.type == "cuda" else CPU_CONFIG


def warm_up_lengths() -> set[int]:
    """Prompt lengths that compile every GPU config in each of Triton's integer specialisations of T (1, a
    multiple of 16, neither), so that no request compiles an attention variant (run at load)."""
    out, low = set(), 0
    for max_t, _ in PREFILL_CONFIGS:
        out.update(t for t in (low + 1, low + 2, low + 16) if t <= max_t)
        low = max_t
    return out


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             valid_len: torch.Tensor | None = None,
                             config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Triton version of `prefill_attention_ref`. Tiles at or past `valid_len` (a device tensor) do no work and
    write zeros; the grid depends only on T, so a padded bucket is graph-safe."""
    num_tokens, num_q_heads, head_dim = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    block_m, block_n, num_warps, num_stages = config or _default_config(q)
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    launch(_prefill_kernel, (cdiv(num_tokens, block_m), num_q_heads),
        q, k, v, out, valid_len if valid_len is not None else q, scale, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), num_tokens, head_dim,
        GROUP=num_q_heads // k.shape[1], HAS_VALID_LEN=valid_len is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=next_pow2(max(head_dim, 16)), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    return out


# Longest prompt for which the fused kernel runs on the GPU. H100, LLaMA-2-7B heads, us (fused vs rope_store_kv +
# attention): T=16 3.7 vs >5.1, T=64 5.1 vs 6.0, T=128 8.4 vs 7.9, T=208 15.3 vs 12.1, T=512 29.6 vs 23.6: past ~100
# tokens re-rotating every k tile for every q tile costs more than the launch it saves (prefill_attn_sweep.py).
FUSED_MAX_TOKENS = 64
# On the JIT path (outside gemm.graph_plan(): no graph yet for this length) a step is bound by host time, ~20-30 us
# per launch, so the fused kernel's saved launch per layer outweighs its extra GPU time (<= 3.2 us per layer at 208
# tokens) up to here.
FUSED_MAX_TOKENS_JIT = 256


def prefill_attention_rope_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, scale,
                               valid_len=None):
    """Reference of the fused prefill step: `rope_store_kv_ref` (q and k rotated in place, roped k and v written to
    their cache slots) then `prefill_attention_ref`."""
    from .rope import rope_store_kv_ref

    q, k = rope_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    return prefill_attention_ref(q, k, v, scale, valid_len)


def _rope_tile(X, rows, stride_t, head_off, dh, mask, cos, sin, HALF: tl.constexpr):
    """Load one head's rows of X in two halves and rotate them (fp32 math, rounded back to X's dtype, as the
    unfused rope kernel stores them)."""
    a, b = _rotate_half(X + rows[:, None].to(tl.int64) * stride_t + head_off + dh[None, :], mask, cos, sin, HALF)
    return a.to(X.dtype.element_ty), b.to(X.dtype.element_ty)


def _cos_sin(POS, CACHE, idx, mask, stride_cache, dh, HALF: tl.constexpr):
    pos = tl.load(POS + idx, mask=mask, other=0).to(tl.int64)
    base = CACHE + pos[:, None] * stride_cache + dh[None, :]
    return tl.load(base, mask=mask[:, None], other=0.0), tl.load(base + HALF, mask=mask[:, None], other=0.0)


def _prefill_rope_kernel(Q, K, V, POS, CACHE, K_CACHE, V_CACHE, SLOTS, OUT, VALID_LEN, scale, stride_qt, stride_qh,
                         stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cache, stride_cb,
                         stride_co, stride_ch, num_tokens, GROUP: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = 0):
    """`_prefill_kernel` with the rotary embedding applied as q and k tiles are loaded (the D-wide q.k product is
    the sum of the two rotated halves' products), and the roped k and v of this tile's rows written to the cache
    by the first q head of each kv head. Full rotary only (rot == head_dim == 2 * HALF)."""
    pdl_enter(PDL)
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    kv_head = head // GROUP
    n_valid = tl.minimum(tl.load(VALID_LEN).to(tl.int32), num_tokens)
    end_n = tl.where(start_m < n_valid, tl.minimum(start_m + BLOCK_M, n_valid), 0)  # padded tile: no work
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < num_tokens
    dh = tl.arange(0, HALF)
    d = tl.arange(0, 2 * HALF)
    cos_m, sin_m = _cos_sin(POS, CACHE, rows, row_ok, stride_cache, dh, HALF)
    qa, qb = _rope_tile(Q, rows, stride_qt, head * stride_qh, dh, row_ok[:, None], cos_m, sin_m, HALF)
    if head % GROUP == 0:  # this tile's rows of k (roped) and v go to their cache slots (-1: padding, none)
        slot = tl.load(SLOTS + rows, mask=row_ok, other=-1).to(tl.int64)
        keep = (slot >= 0)[:, None]
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + kv_head * stride_ch
        ka, kb = _rope_tile(K, rows, stride_kt, kv_head * stride_kh, dh, row_ok[:, None], cos_m, sin_m, HALF)
        tl.store(K_CACHE + dst[:, None] + dh[None, :], ka.to(K_CACHE.dtype.element_ty), mask=keep)
        tl.store(K_CACHE + dst[:, None] + HALF + dh[None, :], kb.to(K_CACHE.dtype.element_ty), mask=keep)
        vv = tl.load(V + rows[:, None].to(tl.int64) * stride_vt + kv_head * stride_vh + d[None, :],
                     mask=row_ok[:, None], other=0.0)
        tl.store(V_CACHE + dst[:, None] + d[None, :], vv.to(V_CACHE.dtype.element_ty), mask=keep)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, 2 * HALF], tl.float32)
    for n0 in range(0, end_n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end_n
        cos_n, sin_n = _cos_sin(POS, CACHE, cols, col_mask, stride_cache, dh, HALF)
        ka, kb = _rope_tile(K, cols, stride_kt, kv_head * stride_kh, dh, col_mask[:, None], cos_n, sin_n, HALF)
        scores = tl.dot(qa, tl.trans(ka), input_precision=DOT_PRECISION)
        scores = (scores + tl.dot(qb, tl.trans(kb), input_precision=DOT_PRECISION)) * scale
        scores = tl.where((cols[None, :] <= rows[:, None]) & col_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + cols[:, None].to(tl.int64) * stride_vt + kv_head * stride_vh + d[None, :],
                    mask=col_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + rows[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention_rope_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, scale,
                                  valid_len=None, config=None):
    """Fused `prefill_attention_rope_ref` in one launch: the rotary embedding of q and k, the KV-cache writes and
    causal attention. Falls back to the unfused Triton kernels where the fused one does not apply (partial rotary,
    head_dim not a power of two >= 32: tl.dot needs K >= 16 per half; strides) or is slower (more than
    FUSED_MAX_TOKENS tokens on the GPU inside a graph capture, more than FUSED_MAX_TOKENS_JIT on the JIT path). The
    fused kernel leaves q and k unrotated in memory, the fallback rotates them in place: callers must not read q or
    k afterwards (the model does not)."""
    if not fused_applies(q, k, v, cos_sin_cache, k_cache, v_cache):
        q, k = rope_store_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
        return prefill_attention_triton(q, k, v, scale, valid_len, config)
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    if valid_len is None:
        valid_len = torch.full((1,), q.shape[0], dtype=torch.int32, device=q.device)
    fn, grid, args, kw = prefill_attention_rope_launch(q, k, v, positions, cos_sin_cache, k_cache, v_cache,
                                                       slot_mapping, out, valid_len, scale, config)
    launch(fn, grid, *args, **kw)
    return out


def fused_applies(q, k, v, cos_sin_cache, k_cache, v_cache) -> bool:
    """Whether the fused kernel runs for these operands (see `prefill_attention_rope_triton`)."""
    num_tokens, head_dim = q.shape[0], q.shape[-1]
    half = cos_sin_cache.shape[-1] // 2
    limit = FUSED_MAX_TOKENS if gemm.in_graph_plan() else FUSED_MAX_TOKENS_JIT
    return not (2 * half != head_dim or half < 16 or half & (half - 1) or (q.is_cuda and num_tokens > limit)
                or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1
                or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride())


def prefill_attention_rope_launch(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, out, valid_len,
                                  scale: float, config=None):
    """(kernel, grid, args, kw) of one fused prefill launch (operands for which `fused_applies`; out like q,
    contiguous; valid_len a [1] device tensor)."""
    num_tokens, num_q_heads, _ = q.shape
    block_m, block_n, num_warps, num_stages = config or _default_config(q)
    jit_helpers(globals(), ("_rotate_half", "_rope_tile", "_cos_sin"))
    return (_prefill_rope_kernel, (cdiv(num_tokens, block_m), num_q_heads),
            (q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, out, valid_len, scale, q.stride(0),
             q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
             cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_tokens),
            {"GROUP": num_q_heads // k.shape[1], "HALF": cos_sin_cache.shape[-1] // 2, "BLOCK_SIZE": k_cache.shape[1],
             "BLOCK_M": block_m, "BLOCK_N": block_n,
             "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32", "num_warps": num_warps,
             "num_stages": num_stages})


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
