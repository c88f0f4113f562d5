"""Projections for one token (M = 1): a Triton GEMV over nn.Linear weights [N, K], fp32 accumulation.

`linear(x, weight, bias)` is the `KernelOps.linear` of the Triton backends: x with one row, fp16/bf16 on CUDA runs
the Triton GEMV with the config `config_for` finds for its (N, K): the card's tuning table (`hybrid-engine tune
--kernels gemv`), else `GEMV_CONFIGS` (benchmarks/gemv_bench.py, H100), else the one derived from K
(`default_config`: the measured configs with BLOCK_K capped at K); an entry of None (empty in a tuning table) means
cuBLAS measured faster for that shape. Several rows follow `gemm.config_for`, the measured plan per shape and row
count (cuBLAS, cuBLASLt, the Triton GEMM, or cuBLAS on the weight's transposed copy); everything else (fp32, CPU)
goes to `gemm.linear_torch` (F.linear). `silu_mul_linear(h, weight)` = `linear(silu_mul(h), weight)` with the activation
fused into the GEMV's input load (one kernel instead of two, and the [1, I] intermediate never goes through
memory); it measured slower and is not used. `linear_silu_mul(x, weight)` = `silu_mul(linear(x, weight))` for the
fused gate/up weight, with the SiLU-mul in the GEMV's epilogue (each program owns matching gate and up rows).
Both fused decode kernels can also take the RMSNorm before them (`norm=`, `norm_config_for`): each program adds the
residual, weights its input by the norm weight and sums the squares as it walks K, and scales its sums by 1 / rms
at the end (the projection is linear in its input), so no norm kernel runs between them and the kernel before.

Each program owns BLOCK_N output rows and walks K in BLOCK_K chunks, keeping a [BLOCK_N, BLOCK_K] fp32 partial
product in registers and reducing it once at the end; the weight loads are 16-byte vectors along K. No workspace,
no host sync, output allocated like F.linear: CUDA-graph capturable.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from . import gemm, tuning
from ._triton import cdiv, env_choice, jit_helpers, launch, next_pow2, pdl_enter
from ._workspace import split_buffers

tl = None  # triton.language, bound on first launch (see _triton.py)

# (N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K]), or None where cuBLAS measured faster. Filled from
# benchmarks/gemv_bench.py on the H100 (fp16, weights rotated past L2, CUDA-graph replay).
GEMV_CONFIGS: dict[tuple[int, int], tuple[int, ...] | None] = {
    # H100 80GB HBM3, fp16, graph replay, weights rotated past L2 (us: Triton vs cuBLAS F.linear)
    (12288, 4096): (4, 2048, 4, 1),   # QKV      34.2 vs 37.2
    (4096, 4096): (4, 2048, 4, 1),    # O        13.2 vs 16.7
    (22016, 4096): (4, 2048, 4, 1),   # gate/up  59.2 vs 68.3
    (4096, 11008): (4, 2048, 4, 1),   # down     32.7 vs 36.2
    (32000, 4096): (4, 2048, 4, 1),   # LM head  85.2 vs 98.6
}
# Split-K (the 5th element, serial fix-up) measured slower than these on every shape (+3..8 us), so none is used.
# Same, for silu_mul fused into the GEMV (K = intermediate size, the input has 2K columns).
# Measured slower than silu_mul kernel + Triton GEMV (down: fused 35.8 us vs 1.3 + 32.7): every program recomputes
# silu over all of K and re-reads the [1, 2I] input from L2. Kept empty, so silu_mul_linear = the two kernels.
SILU_GEMV_CONFIGS: dict[tuple[int, int], tuple[int, ...] | None] = {}
# (2I, K) of a fused gate/up weight -> (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV with SiLU-mul in its
# epilogue (`linear_silu_mul`), or absent / None where gate/up GEMV + silu_mul kernel measured faster.
GATE_UP_SILU_CONFIGS: dict[tuple[int, int], tuple[int, ...] | None] = {
    # H100 80GB HBM3, fp16, graph replay, weights rotated past L2 (us: fused vs gate/up GEMV + silu_mul kernel)
    # 58.9 vs 61.0 (results/nvidia-h100-80gb-hbm3-llama-2-7b-shape-2026-11-27-gate-up-silu.json)
    (22016, 4096): (2, 4096, 8, 1),
}
# (Hq + 2 Hkv) * D, K) of a fused QKV weight -> (BLOCK_J, BLOCK_K, num_warps, num_stages) of the GEMV with rope and
# the KV-cache writes in its epilogue (`linear_rope_store`; BLOCK_J column pairs per program), or absent / None.
QKV_ROPE_CONFIGS: dict[tuple[int, int], tuple[int, ...] | None] = {
    # H100 80GB HBM3, fp16, graph replay, weights rotated past L2 (us: fused vs QKV GEMV + rope/KV-store kernel)
    # 35.7 vs 37.7 (results/nvidia-h100-80gb-hbm3-llama-2-7b-shape-2026-11-27-qkv-rope.json)
    (12288, 4096): (2, 2048, 4, 1),
}
DEFAULT_CONFIG = (4, 2048, 4, 1)  # what tests and linear_triton use when no table entry exists
_UNLISTED = object()


def default_config(k: int, kind: str = "plain") -> tuple[int, int, int, int]:
    """The config of a weight no table lists, from K alone: the LLaMA-2-7B shapes' measured configs (plain and
    QKV + rope (4 / 2, 2048, 4 warps), gate/up + SiLU (2, 4096, 8 warps)) with BLOCK_K capped at K rounded up to a
    power of two, so that a thin model's programs do not walk masked lanes. On the H200 the GEMV beat cuBLAS on all
    five LLaMA-2-7B shapes (10-25 %), where an unlisted shape used to go to cuBLAS (and unfused rope and SiLU)."""
    if kind == "gate_up":
        block_k = min(4096, next_pow2(k))
        return 2, block_k, 8 if block_k >= 4096 else 4, 1
    return (2 if kind == "qkv" else 4), min(2048, next_pow2(k)), 4, 1


# the tuning-table family of each GEMV variant (kernels/tuning.py; written by `hybrid-engine tune --kernels gemv`)
FAMILIES = {"plain": "gemv", "gate_up": "gemv_silu", "qkv": "gemv_rope"}
# ... and of the fused variants with the RMSNorm before them folded in (an empty entry: the norm stays apart)
NORM_FAMILIES = {"gate_up": "gemv_silu_norm", "qkv": "gemv_rope_norm"}
_TABLES = {"plain": GEMV_CONFIGS, "gate_up": GATE_UP_SILU_CONFIGS, "qkv": QKV_ROPE_CONFIGS}


@functools.lru_cache(maxsize=None)
def config_for(kind: str, n: int, k: int, device: torch.device, dtype: torch.dtype) -> tuple[int, ...] | None:
    """The config of a one-row GEMV variant ("plain", "gate_up" with SiLU-mul, "qkv" with rope + KV store) of an
    (N, K) weight: this card's tuning table (an empty entry: cuBLAS, or the unfused ops, measured faster there),
    else the module's measured tables (None: the same), else `default_config`. Cached: the JIT path asks per
    projection per step."""
    tuned = tuning.lookup(FAMILIES[kind], tuning.shape_key(n, k, dtype=dtype), device)
    if tuned is not None:
        return tuple(tuned) or None
    config = _TABLES[kind].get((n, k), _UNLISTED)
    return default_config(k, kind) if config is _UNLISTED else config


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 reference of F.linear (x [.., K], weight [N, K], bias [N]), result in x's dtype."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def silu_mul_linear_ref(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 reference of `linear(silu(h[:, :K]) * h[:, K:], weight)`."""
    k = h.shape[-1] // 2
    hf = h.float()
    return (F.silu(hf[..., :k]) * hf[..., k:] @ weight.float().t()).to(h.dtype)


def _gemv_x(X, kk, K, SILU_MUL: tl.constexpr):
    """The GEMV input at columns kk (fp32; 0 past K): x, or silu(gate) * up of X = [gate | up] with SILU_MUL."""
    kmask = kk < K
    if SILU_MUL:
        g = tl.load(X + kk, mask=kmask, other=0.0).to(tl.float32)
        u = tl.load(X + K + kk, mask=kmask, other=0.0).to(tl.float32)
        return g / (1.0 + tl.exp(-g)) * u
    return tl.load(X + kk, mask=kmask, other=0.0).to(tl.float32)


def _normed_x(X, R, G, RES_OUT, kk, K, write_res, NORM: tl.constexpr):
    """(input, its square) of a one-row kernel at columns kk, fp32, 0 past K. With NORM the input is the RMSNorm
    numerator: s = X + R rounded to X's dtype (the residual stream, stored to RES_OUT by the lanes in `write_res`)
    times the norm weight G; the square is s * s, whose sum over K gives the kernel its 1 / rms at the end."""
    kmask = kk < K
    x = tl.load(X + kk, mask=kmask, other=0.0)
    if NORM:
        x = x + tl.load(R + kk, mask=kmask, other=0.0)  # rounded to the input dtype, like the unfused add
        tl.store(RES_OUT + kk, x, mask=kmask & write_res)
        xf = x.to(tl.float32)
        return xf * tl.load(G + kk, mask=kmask, other=0.0).to(tl.float32), xf * xf
    xf = x.to(tl.float32)
    return xf, xf


def _inv_rms(sq, K, eps):
    return 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)


def _dot_two(a_ptrs, b_ptrs, row_mask, X, R, G, RES_OUT, K, eps, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
             PDL: tl.constexpr):
    """One row against two sets of weight rows (a_ptrs / b_ptrs: [rows, BLOCK_K] pointers at column 0, row_mask
    [rows, 1]) over all of K: the fp32 sums (a, b), each over K in BLOCK_K steps and reduced once at the end. With
    PDL == 2 the first tiles are read before `pdl_enter`; with NORM the input is `_normed_x`'s (program 0 writes the
    residual) and the sums come scaled by 1 / rms. The fused gate/up and QKV kernels' shared walk."""
    write_res = (tl.zeros([BLOCK_K], tl.int32) + tl.program_id(0)) == 0  # per lane (a scalar mask is not portable)
    cols = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros(a_ptrs.shape, dtype=tl.float32)
    acc_b = tl.zeros(b_ptrs.shape, dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    k_lo = 0
    if PDL == 2:  # the first weight tiles stream in while the previous kernel finishes
        mask = row_mask & (cols < K)[None, :]
        a_first = tl.load(a_ptrs, mask=mask, other=0.0)
        b_first = tl.load(b_ptrs, mask=mask, other=0.0)
    pdl_enter(PDL)
    if PDL == 2:
        x, x2 = _normed_x(X, R, G, RES_OUT, cols, K, write_res, NORM)
        if NORM:
            sq += x2
        acc_a += a_first.to(tl.float32) * x[None, :]
        acc_b += b_first.to(tl.float32) * x[None, :]
        k_lo = BLOCK_K
    for k0 in range(k_lo, K, BLOCK_K):
        kk = k0 + cols
        x, x2 = _normed_x(X, R, G, RES_OUT, kk, K, write_res, NORM)
        if NORM:
            sq += x2
        mask = row_mask & (kk < K)[None, :]
        acc_a += tl.load(a_ptrs + k0, mask=mask, other=0.0).to(tl.float32) * x[None, :]
        acc_b += tl.load(b_ptrs + k0, mask=mask, other=0.0).to(tl.float32) * x[None, :]
    a = tl.sum(acc_a, axis=1)
    b = tl.sum(acc_b, axis=1)
    if NORM:
        inv_rms = _inv_rms(sq, K, eps)
        a *= inv_rms
        b *= inv_rms
    return a, b


_DOT_TWO_HELPERS = ("_normed_x", "_inv_rms", "_dot_two")


def _gemv_kernel(X, W, B, OUT, WS, COUNT, N, K, stride_w, k_chunk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr = 0):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(K, k_lo + k_chunk)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PDL == 2:  # the first weight tile streams in while the previous kernel finishes (no kernel writes weights)
        w_first = tl.load(w_ptrs + k_lo, mask=row_mask[:, None] & (k_lo + cols < K)[None, :], other=0.0)
    pdl_enter(PDL)
    if PDL == 2:
        acc += w_first.to(tl.float32) * _gemv_x(X, k_lo + cols, K, SILU_MUL)[None, :]
        k_lo += BLOCK_K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + cols
        w = tl.load(w_ptrs + k0, mask=row_mask[:, None] & (kk < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * _gemv_x(X, kk, K, SILU_MUL)[None, :]
    out = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(B + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=row_mask)
    else:
        # serial split-K fix-up: every split writes its fp32 partial; the last to arrive (counter) sums them in
        # a fixed order (deterministic) and resets the counter for the next call (graph replays need no memset).
        tl.store(WS + pid_k * N + rows, out, mask=row_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNT + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(WS + s * N + rows, mask=row_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(B + rows, mask=row_mask, other=0.0).to(tl.float32)
            tl.store(OUT + rows, total.to(OUT.dtype.element_ty), mask=row_mask)
            tl.atomic_xchg(COUNT + pid, 0)


def linear_silu_mul_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 reference of `silu_mul(linear(x, weight))`: weight [2I, K] = gate rows then up rows -> [1, I]."""
    h = x.float() @ weight.float().t()
    i = h.shape[-1] // 2
    return (F.silu(h[..., :i]) * h[..., i:]).to(x.dtype)


def _gemv_silu_kernel(X, W, OUT, N, K, stride_w, R, G, RES_OUT, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM: tl.constexpr = False, PDL: tl.constexpr = 0):
    """One row through a gate/up weight [2N, K] with SiLU-mul in the epilogue: each program computes BLOCK_N gate
    rows and the same BLOCK_N up rows and stores silu(gate) * up. Each half is rounded to OUT's dtype first and the
    SiLU is the silu_mul kernel's formula, so the result is what GEMV + silu_mul kernel give (one launch less, and
    the [1, 2N] intermediate never goes through memory). With NORM the row is rmsnorm(X + R) * G (RES_OUT = X + R,
    written by program 0): the GEMV is linear, so 1 / rms, known once all of K is read, scales the sums at the end."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    g_ptrs = W + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
    u_ptrs = W + (rows + N).to(tl.int64)[:, None] * stride_w + cols[None, :]
    gate, up = _dot_two(g_ptrs, u_ptrs, row_mask[:, None], X, R, G, RES_OUT, K, eps, BLOCK_K, NORM, PDL)
    dtype = OUT.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    tl.store(OUT + rows, (gate / (1.0 + tl.exp(-gate)) * up).to(dtype), mask=row_mask)


# (residual [1, K], norm weight [K], eps): an RMSNorm, with its residual add, folded into a one-row kernel
Norm = tuple[torch.Tensor, torch.Tensor, float]


def _norm_args(x: torch.Tensor, norm: Norm | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(R, G, RES_OUT, eps) kernel arguments of `norm` for input x (x itself in every slot without one)."""
    if norm is None:
        return x, x, x, 0.0
    residual, weight, eps = norm
    assert residual.shape == x.shape and weight.numel() == x.shape[-1] and weight.dtype == x.dtype, \
        (residual.shape, weight.shape, x.shape)
    return residual.contiguous(), weight, torch.empty_like(x), float(eps)


def gemv_silu_triton(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, ...] | None = None,
                     norm: Norm | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """silu_mul(x [1, K] @ weight[2I, K].T) -> [1, I] in x's dtype, one launch. weight rows contiguous. With `norm`
    (residual, norm weight, eps) the row is rmsnorm(x + residual) * norm weight, and the result (out, x + residual)."""
    n2, k = weight.shape
    assert x.numel() == k and n2 % 2 == 0, (x.shape, weight.shape)
    block_n, block_k, num_warps, num_stages, *_ = config or DEFAULT_CONFIG
    x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n2 // 2), dtype=x.dtype, device=x.device)
    r, g, res_out, eps = _norm_args(x, norm)
    jit_helpers(globals(), _DOT_TWO_HELPERS)
    launch(_gemv_silu_kernel, (cdiv(n2 // 2, block_n),), x, weight, out, n2 // 2, k, weight.stride(0),
           r, g, res_out, eps, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm is not None, num_warps=num_warps,
           num_stages=num_stages)
    return out if norm is None else (out, res_out)


def linear_rope_store_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                          cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                          num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Reference of the QKV projection + rope + KV-cache writes of one decode token: returns the rotated q [T, Hq, D]
    and writes rotated k and v at `slots` (-1: no write). Built from the unfused references."""
    from .kv_store import store_kv_ref
    from .rope import rope_ref

    head_dim = weight.shape[0] // (num_q_heads + 2 * num_kv_heads)
    qkv = linear_ref(x, weight, bias).view(-1, num_q_heads + 2 * num_kv_heads, head_dim)
    q, k, v = (t.clone() for t in qkv.split([num_q_heads, num_kv_heads, num_kv_heads], dim=1))
    q, k = rope_ref(q, k, positions, cos_sin)
    store_kv_ref(k, v, k_cache, v_cache, slots)
    return q


def _gemv_rope_store_kernel(X, W, B, Q_OUT, POS, CACHE, K_CACHE, V_CACHE, SLOTS, K, stride_w, stride_cache,
                            stride_cb, stride_co, stride_ch, num_q_heads, num_kv_heads, R, G, RES_OUT, eps,
                            HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr = False,
                            PDL: tl.constexpr = 0):
    """One decode token through a QKV weight [(Hq + 2 Hkv) * 2 HALF, K] with rope and the KV-cache writes in the
    epilogue: each program computes BLOCK_J column pairs (j, j + HALF) of one head, so it holds both rotary halves.
    q heads are rotated into Q_OUT, k heads rotated and v heads as they are go to their cache slot (slot < 0: no
    write). Each projected value is rounded to the output dtype first and rotated with the rope kernel's formula,
    so the result is what GEMV + rope/KV-store kernel give, with one launch and no [1, N] intermediate. NORM: the
    row is rmsnorm(X + R) * G, as in the gate/up kernel."""
    pid = tl.program_id(0)
    head = pid // (HALF // BLOCK_J)
    j = (pid % (HALF // BLOCK_J)) * BLOCK_J + tl.arange(0, BLOCK_J)
    rows_a = head * (2 * HALF) + j
    rows_b = rows_a + HALF
    cols = tl.arange(0, BLOCK_K)
    a_ptrs = W + rows_a.to(tl.int64)[:, None] * stride_w + cols[None, :]
    b_ptrs = W + rows_b.to(tl.int64)[:, None] * stride_w + cols[None, :]
    all_rows = (j >= 0)[:, None]  # every column pair of the head is real
    xa, xb = _dot_two(a_ptrs, b_ptrs, all_rows, X, R, G, RES_OUT, K, eps, BLOCK_K, NORM, PDL)
    dtype = Q_OUT.dtype.element_ty
    if HAS_BIAS:
        xa += tl.load(B + rows_a).to(tl.float32)
        xb += tl.load(B + rows_b).to(tl.float32)
    xa = xa.to(dtype).to(tl.float32)
    xb = xb.to(dtype).to(tl.float32)
    pos = tl.load(POS).to(tl.int64)
    cos = tl.load(CACHE + pos * stride_cache + j).to(tl.float32)
    sin = tl.load(CACHE + pos * stride_cache + HALF + j).to(tl.float32)
    # masks from per-lane copies of the program's head and slot (a scalar condition as a store mask is not portable)
    head_j = tl.zeros([BLOCK_J], tl.int32) + head
    is_v = head_j >= num_q_heads + num_kv_heads  # q and k heads are rotated; v heads are stored as projected
    ra = tl.where(is_v, xa, xa * cos - xb * sin).to(dtype)
    rb = tl.where(is_v, xb, xb * cos + xa * sin).to(dtype)
    is_q = head_j < num_q_heads
    q_at = Q_OUT + head * (2 * HALF) + j
    tl.store(q_at, ra, mask=is_q)
    tl.store(q_at + HALF, rb, mask=is_q)
    slot = tl.load(SLOTS).to(tl.int64)
    kv_head = tl.where(head >= num_q_heads + num_kv_heads, head - num_q_heads - num_kv_heads, head - num_q_heads)
    at = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + kv_head * stride_ch + j
    slot_ok = (tl.zeros([BLOCK_J], tl.int64) + slot) >= 0
    k_mask = slot_ok & (head_j >= num_q_heads) & (head_j < num_q_heads + num_kv_heads)
    v_mask = slot_ok & is_v
    _store_kv_halves(K_CACHE, V_CACHE, at, ra, rb, k_mask, v_mask, HALF)


def _store_kv_halves(K_CACHE, V_CACHE, at, ra, rb, k_mask, v_mask, HALF: tl.constexpr):
    """A head's two rotary halves (ra, rb) to the caches at `at` and `at + HALF`: k lanes (k_mask) to K_CACHE, v lanes
    (v_mask) to V_CACHE. Shared with the decode GEMM's rope epilogue (decode_gemm.py)."""
    tl.store(K_CACHE + at, ra.to(K_CACHE.dtype.element_ty), mask=k_mask)
    tl.store(K_CACHE + at + HALF, rb.to(K_CACHE.dtype.element_ty), mask=k_mask)
    tl.store(V_CACHE + at, ra.to(V_CACHE.dtype.element_ty), mask=v_mask)
    tl.store(V_CACHE + at + HALF, rb.to(V_CACHE.dtype.element_ty), mask=v_mask)


def gemv_rope_store_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                           cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                           num_q_heads: int, num_kv_heads: int,
                           config: tuple[int, ...] | None = None,
                           norm: Norm | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`linear_rope_store_ref` in one launch for one token (x [1, K]); returns q [1, Hq, D]. The whole head is
    rotated (cos_sin has D columns); caches [blocks, block_size, Hkv, D] with equal strides. With `norm` (residual,
    norm weight, eps) the row is rmsnorm(x + residual) * norm weight, and the result (q, x + residual)."""
    n, k = weight.shape
    heads = num_q_heads + 2 * num_kv_heads
    head_dim = n // heads
    half = head_dim // 2
    block_j, block_k, num_warps, num_stages, *_ = config or (2, 2048, 4, 1)
    assert x.numel() == k and n == heads * head_dim and cos_sin.shape[-1] == head_dim == 2 * half, \
        (x.shape, weight.shape, cos_sin.shape)
    assert half % block_j == 0 and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    x = x.contiguous()
    q = torch.empty((1, num_q_heads, head_dim), dtype=x.dtype, device=x.device)
    r, g, res_out, eps = _norm_args(x, norm)
    jit_helpers(globals(), ("_store_kv_halves", *_DOT_TWO_HELPERS))
    launch(_gemv_rope_store_kernel, (heads * (half // block_j),), x, weight, bias if bias is not None else weight,
           q, positions, cos_sin, k_cache, v_cache, slots, k, weight.stride(0), cos_sin.stride(0),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_q_heads, num_kv_heads, r, g, res_out, eps,
           HALF=half, BLOCK_SIZE=k_cache.shape[1], BLOCK_J=block_j, BLOCK_K=block_k, HAS_BIAS=bias is not None,
           NORM=norm is not None, num_warps=num_warps, num_stages=num_stages)
    return q if norm is None else (q, res_out)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None, silu_mul: bool = False,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] (or [1, 2K] with silu_mul) @ weight[N, K].T (+ bias) -> [1, N] in x's dtype (or out_dtype: the
    float32 sum unrounded). weight contiguous."""
    n, k = weight.shape
    assert x.numel() == (2 * k if silu_mul else k), (x.shape, weight.shape)
    block_n, block_k, num_warps, num_stages, *rest = config or DEFAULT_CONFIG
    split = rest[0] if rest else 1
    x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype, device=x.device)
    grid_n = cdiv(n, block_n)
    k_chunk = cdiv(cdiv(k, split), block_k) * block_k
    split = cdiv(k, k_chunk)
    ws, count = split_buffers(x.device, ("gemv", n, grid_n, split), split * n, grid_n) if split > 1 else (out, out)
    jit_helpers(globals(), ("_gemv_x",))
    launch(_gemv_kernel, (grid_n, split),
        x, weight, bias if bias is not None else weight, out, ws, count, n, k, weight.stride(0), k_chunk,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, SILU_MUL=silu_mul, SPLIT_K=split,
        num_warps=num_warps, num_stages=num_stages)
    return out


def _triton_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1] > 0
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))


def _gemv_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return _triton_ok(x, weight, bias) and x.numel() == x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_t: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear, through the Triton GEMV for one row unless `config_for` says cuBLAS measured faster (None), and for
    several rows through whatever the plan picks for the row count and shape (`gemm.config_for`: cuBLAS, cuBLASLt, the
    Triton GEMM, or cuBLAS on `weight_t`, the weight's transposed copy [K, N] where the model keeps one).
    out_dtype (float32): the sum unrounded, from the GEMV, the decode GEMM or the Triton GEMM where the plan picks
    them, else from cuBLAS (`gemm.linear_wide`)."""
    wide = out_dtype is not None and out_dtype != x.dtype
    if not _triton_ok(x, weight, bias):
        return gemm.linear_torch(x, weight, bias, weight_t, out_dtype)
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        config = config_for("plain", *weight.shape, x.device, x.dtype)
        if config is None:
            return gemm.linear_wide(x, weight, bias, out_dtype) if wide else F.linear(x, weight, bias)
        return gemv_triton(x, weight, bias, config, out_dtype=out_dtype)
    choice = gemm.config_for(rows, *weight.shape, transposed=weight_t is not None, device=x.device, dtype=x.dtype)
    if choice == "decode_gemm":
        from .decode_gemm import decode_linear

        return decode_linear(x, weight, bias, out_dtype=out_dtype)
    if choice not in ("t", "t_lt", "lt", None):
        return gemm.gemm_triton(x, weight, bias, choice, out_dtype=out_dtype)
    if wide:  # a cuBLAS choice: cuBLAS writing its float32 sum
        return gemm.linear_wide(x, weight, bias, out_dtype)
    if choice == "t":
        return F.linear(x, weight_t.t(), bias)
    if choice == "t_lt":
        return gemm.linear_lt(x, weight_t.t(), bias)
    if choice == "lt":
        return gemm.linear_lt(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, norm: Norm | None = None) -> Any:
    """`silu_mul(linear(x, weight))` for a gate/up weight [2I, K] in one fused Triton kernel for one row (the config of
    `GATE_UP_SILU_CONFIGS`, else `default_config`); None where the table says the unfused pair measured faster, and
    off the GPU (the caller then runs its own linear and silu_mul). With `norm` (residual, norm weight, eps): the
    RMSNorm before it in the same kernel, returning (out, x + residual), or None where that does not apply."""
    if _gemv_ok(x, weight, None) and weight.shape[0] % 2 == 0 and _norm_ok(x, norm):
        config = _config_with("gate_up", weight, x, norm)
        if config is not None:
            return gemv_silu_triton(x, weight, config, norm)
    return None


def small_prefill_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """`KernelOps.prefill_linear_silu_mul`: silu_mul(linear(x, gate/up weight [2I, K])) of a graph-captured prefill in
    one decode-GEMM launch where `gemm.config_for` sends its product to the decode GEMM (the card's tuned plan, or
    `small_prefill_mode()` "decode_gemm" for 2..32 rows of a shape the built-in plan does not list); None elsewhere
    (the caller composes the ops)."""
    if not gemm.in_graph_plan():  # the JIT path: nothing more to check (its host time counts)
        return None
    rows = x.numel() // x.shape[-1]
    if rows < 2 or not _triton_ok(x, weight, None):
        return None
    if gemm.config_for(rows, *weight.shape, device=x.device, dtype=x.dtype) != "decode_gemm":
        return None
    from .decode_gemm import decode_linear_silu_mul

    return decode_linear_silu_mul(x, weight)


def linear_rope_store(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                      cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      num_q_heads: int, num_kv_heads: int, norm: Norm | None = None) -> Any:
    """A decode token's QKV projection, rope and KV-cache writes in one Triton kernel (the config of
    `QKV_ROPE_CONFIGS`, else `default_config`), where the layout allows (one row, whole-head rotary, contiguous
    cos/sin and caches) and the table does not say the unfused ops measured faster (None); returns q [1, Hq, D], or
    None (the caller then runs linear, rope and the KV store itself). With `norm` (residual, norm weight, eps): the
    RMSNorm before it in the same kernel, returning (q, x + residual), or None where that does not apply."""
    if not _gemv_ok(x, weight, bias) or x.shape[0] != 1 or not _norm_ok(x, norm):
        return None
    config = _config_with("qkv", weight, x, norm)
    heads = num_q_heads + 2 * num_kv_heads
    if config is None or weight.shape[0] % heads:
        return None
    head_dim = weight.shape[0] // heads
    if (cos_sin.shape[-1] != head_dim or head_dim % 2 or (head_dim // 2) % config[0] or cos_sin.stride(-1) != 1
            or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or k_cache.dtype != x.dtype
            or positions.numel() != 1 or slots.numel() != 1):
        return None
    return gemv_rope_store_triton(x, weight, bias, positions, cos_sin, k_cache, v_cache, slots, num_q_heads,
                                  num_kv_heads, config, norm)


# Where no tuning entry decides it (`norm_config_for`), a decode norm is folded into the projection after it up to
# this hidden size. On the H200 (fp16, batch 1, PDL on; 2026-11-30) TPOT went 0.659 -> 0.531 ms at hidden 576
# (SmolLM2-135M shape), 0.946 -> 0.949 at 2048 (Llama-3.2-1B) and 3.77 -> 4.26 at 4096 (LLaMA-2-7B), every shape on
# its unfused config: every program of the projection reads the residual and the norm weight beside x, which costs
# nothing where a step is bound by latency and ~8 us per kernel where the projection streams 100+ MB with thousands
# of two-row programs.
FUSE_NORM_MAX_K = 1024


def fuse_norm_mode() -> str:
    """$HYBRID_ENGINE_FUSE_NORM: "auto" (default: the tuning table, else hidden <= FUSE_NORM_MAX_K), "1" always (on
    the fused kernel's own config), "0" never."""
    return env_choice("HYBRID_ENGINE_FUSE_NORM", "auto", {"auto": "auto", "1": "1", "on": "1", "true": "1",
                                                          "yes": "1", "0": "0", "off": "0", "false": "0", "no": "0"},
                      "auto, 1 or 0")


@functools.lru_cache(maxsize=None)
def norm_config_for(kind: str, n: int, k: int, device: torch.device, dtype: torch.dtype) -> tuple[int, ...] | None:
    """The config of the fused one-row variant `kind` ("gate_up" or "qkv") of an (N, K) weight with the RMSNorm
    before it folded in, or None where the norm stays its own kernel: see `fuse_norm_mode`; in "auto" this card's
    tuning table (`NORM_FAMILIES`, written by `hybrid-engine tune --kernels gemv`; an empty entry: apart measured
    faster), else the unfused variant's config up to hidden FUSE_NORM_MAX_K."""
    mode = fuse_norm_mode()
    if mode == "0":
        return None
    if mode == "auto":
        tuned = tuning.lookup(NORM_FAMILIES[kind], tuning.shape_key(n, k, dtype=dtype), device)
        if tuned is not None:
            return tuple(tuned) or None
        if k > FUSE_NORM_MAX_K:
            return None
    return config_for(kind, n, k, device, dtype)


def _config_with(kind: str, weight: torch.Tensor, x: torch.Tensor, norm: Norm | None) -> tuple[int, ...] | None:
    """The config a fused one-row op runs with (None: it does not apply), with or without a norm folded in."""
    if norm is None:
        return config_for(kind, *weight.shape, x.device, x.dtype)
    return norm_config_for(kind, *weight.shape, x.device, x.dtype)


def _norm_ok(x: torch.Tensor, norm: Norm | None) -> bool:
    if norm is None:
        return True
    residual, weight, _ = norm
    return (residual is not None and residual.shape == x.shape and residual.dtype == x.dtype
            and residual.is_contiguous() and weight.dtype == x.dtype and weight.numel() == x.shape[-1])


def silu_mul_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`linear(silu_mul(h), weight)`: one fused Triton kernel for one row where measured faster, else the two ops."""
    if _gemv_ok(h, weight, None) and h.shape[-1] == 2 * weight.shape[1]:
        config = SILU_GEMV_CONFIGS.get(tuple(weight.shape))
        if config is not None:
            return gemv_triton(h, weight, None, config, silu_mul=True)
    from .activation import silu_mul_ref, silu_mul_triton

    act = silu_mul_triton(h) if h.is_cuda else silu_mul_ref(h)
    return linear(act, weight)
