"""Decode projections (M = 1..32 rows) whose per-row result does not depend on M: one Triton kernel family.

Why: with a GEMV for one row and cuBLAS / a per-M GEMM for several, a row's summation order changed with the batch,
so a request's greedy tokens changed with what else was in the batch. Here BLOCK_M is 16 for every M (tl.dot needs
every dim >= 16; more rows add M-tiles to the grid) and the config (BLOCK_N, BLOCK_K, SPLIT_K, num_warps,
num_stages, SWAP) comes from the weight shape only (`DECODE_GEMM_CONFIGS`, else `default_config(n, k)`; a 5-tuple
means SWAP=0), so every row is reduced the same way - K in BLOCK_K chunks through tl.dot with fp32 accumulation,
split-K partials summed in the fixed order s = 0..SPLIT_K-1 - whatever M is. Rows past M are masked (read as zeros,
never loaded) and never stored. (They once read row M-1 again: with 15 of 16 rows on one address, M = 1 took 35 us
for the QKV weight against 26 at M = 16 on the H200; masked, M = 1..16 all take ~25 us, benchmarks/NOTES.md.)
At 17-32 rows two 16-row programs read each weight tile (the second mostly from L2): a 32-row step took 1.55x a
one-row step on the H200. `wide_rows_mode` (off by default, not yet measured) runs such steps as one 32-row tile.

Two layouts of the dot, both reducing each output element over K on its own (so both keep rows independent):
  SWAP=0  acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, BLOCK_K] @ W[BLOCK_N, BLOCK_K]^T  (rows as the MMA's M operand)
  SWAP=1  acc[BLOCK_N, BLOCK_M] += W[BLOCK_N, BLOCK_K] @ x[BLOCK_M, BLOCK_K]^T  (weight rows as the M operand),
          transposed to [BLOCK_M, BLOCK_N] after the K loop. Hopper's wgmma needs an M operand of >= 64, which
          16 rows never give: with BLOCK_N 64 or 128 the weight tile does.
The loads are the same; from the split-K fix-up on, both layouts run the same code.

M-tiles are the fastest program index: the programs that read one weight tile run side by side and all but the
first hit L2. Split-K (several programs per output tile, for shapes with few N-tiles): each split writes its fp32
partial tile to a workspace and the last to arrive (a counter per tile, reset by that program, so graph replays need
no memset) sums them, adds the bias and runs the epilogue. The workspace is made on a shape's first call, sized for
at least `DECODE_MAX_ROWS` rows, before any graph capture.

Epilogues (constexpr EPILOGUE; the projected values are rounded to the output dtype first and then combined with
the unfused kernels' formulas, so fused and composed give the same numbers):
  "plain"      out = x @ W^T (+ bias)                                  `decode_linear`
  "silu_mul"   gate/up weight [2I, K]: silu(gate) * up -> [M, I]        `decode_linear_silu_mul`
  "rope_store" QKV weight: q rotated -> [M, Hq, D], rotated k and v to the paged caches at each row's slot
               (slot < 0: no write); a program holds BLOCK_N column pairs (j, j + D/2) of one head, so BLOCK_N
               must divide D/2 (else the caller composes the unfused ops)
                                                                       `decode_linear_rope_store`
The public functions have the signatures of `KernelOps.decode_linear`, `linear_silu_mul` and `linear_rope_store`.

The RMSNorm before QKV and gate/up can be folded in (constexpr NORM, one split only; `decode_norm_linear_silu_mul`,
`decode_norm_linear_rope_store`, behind $HYBRID_ENGINE_DECODE_GEMM_NORM until measured on a card): as in the one-row
GEMVs, each row's input is (x + residual) * norm weight, its sum of squares is taken on the way through K, and its
sums are scaled by 1 / rms at the end; the programs of the first N-tile write x + residual, the next residual.
Every row count runs the same kernel, so rows stay invariant; the numbers differ from the unfused norm's in the
last bits (the input to the dot is rounded before the 1 / rms scaling, not after).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from . import tuning
from ._triton import cdiv, check_dot_tiles, env_choice, jit_helpers, launch, pdl_enter
from .gemm import linear_rows
from ._workspace import sm_count, split_buffers
from .gemv import (Norm, _norm_args, _norm_ok, _store_kv_halves, _triton_ok, linear_ref, linear_rope_store_ref,
                   linear_silu_mul_ref)

tl = None  # triton.language, bound on first launch (see _triton.py)

__all__ = ["DECODE_GEMM_CONFIGS", "decode_linear", "decode_linear_rope_store", "decode_linear_silu_mul",
           "decode_norm_linear_rope_store", "decode_norm_linear_silu_mul", "fold_norm_mode", "wide_rows_mode",
           "decode_gemm_triton", "decode_silu_triton", "decode_rope_store_triton", "default_config", "config_for",
           "has_tuned_config",
           "linear_ref", "linear_silu_mul_ref", "linear_rope_store_ref"]

BLOCK_M = 16  # fixed for every M: the point of the module
WIDE_BLOCK_M = 32  # with $HYBRID_ENGINE_DECODE_GEMM_WIDE=1, the M-tile of steps of more than BLOCK_M rows
DECODE_MAX_ROWS = 32  # the largest decode bucket: split-K workspaces are sized for at least this many rows
H200_SMS = 132
Config = tuple[int, int, int, int, int, int]  # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, SWAP)
# (N, K) -> a config (5-tuple: SWAP=0), from benchmarks/decode_gemm_bench.py on a GPU (fp16; bf16 has the same
# element size). A shape not listed uses default_config(n, k).
DECODE_GEMM_CONFIGS: dict[tuple[int, int], tuple[int, ...]] = {}


def default_config(n: int, k: int, sms: int = H200_SMS) -> Config:
    """A config from the weight shape and the card's SM count alone: split K until there are ~4 programs per SM at
    M <= 16 (the card's own count: a smaller card splits less, a larger one more)."""
    block_n = 32 if n >= 8192 else 16
    block_k = 256 if k >= 1024 else 128
    split = max(1, min(8, cdiv(4 * sms, cdiv(n, block_n)), cdiv(k, 2 * block_k)))
    return block_n, block_k, split, 4, 3, 0


@functools.lru_cache(maxsize=None)
def _tuned(n: int, k: int, device: torch.device | None, dtype: torch.dtype) -> list[int] | None:
    return tuning.lookup("decode_gemm", tuning.shape_key(n, k, dtype=dtype), device) if device else None


def has_tuned_config(n: int, k: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this card's tuning table holds a measured config for an (N, K) weight in `dtype`."""
    return _tuned(n, k, device, dtype) is not None


@functools.lru_cache(maxsize=None)
def _config(n: int, k: int, device: torch.device | None, dtype: torch.dtype) -> Config:
    tuned = _tuned(n, k, device, dtype)
    on_card = device is not None and device.type == "cuda" and torch.cuda.is_available()
    sms = sm_count(device) if on_card else H200_SMS  # (a CUDA device named where none exists: tests, planning)
    return _check_config(tuple(tuned) if tuned else DECODE_GEMM_CONFIGS.get((n, k)) or default_config(n, k, sms))


def config_for(n: int, k: int, device: torch.device | None = None, dtype: torch.dtype = torch.float16) -> Config:
    """The config of an (N, K) weight: this card's tuning table (kernels/tuning.py), else `DECODE_GEMM_CONFIGS`,
    else `default_config` for this card's SM count, as a 6-tuple. Never the row count: that is what keeps rows
    invariant."""
    return _config(n, k, device, dtype)


def _check_config(config: tuple[int, ...]) -> Config:
    """The config as a 6-tuple (a 5-tuple gets SWAP=0); ValueError naming a bad length or value."""
    if len(config) not in (5, 6):
        raise ValueError(f"config {config} must be (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages[, SWAP])")
    block_n, block_k, split, num_warps, num_stages, swap = (*config, 0)[:6]
    check_dot_tiles(BLOCK_N=block_n, BLOCK_K=block_k)  # either layout: BLOCK_N, BLOCK_K and BLOCK_M = 16
    if split < 1 or num_warps < 1 or num_stages < 1:
        raise ValueError(f"SPLIT_K={split}, num_warps={num_warps}, num_stages={num_stages} must be >= 1")
    if swap not in (0, 1):
        raise ValueError(f"SWAP={swap!r} must be 0 (rows as the MMA's M operand) or 1 (weight rows as it)")
    return block_n, block_k, split, num_warps, num_stages, int(swap)


# --- Device code -----------------------------------------------------------------------------------------------------

def _tile_columns(pid_n, N, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr, HALF: tl.constexpr):
    """(output columns, weight rows of the first dot, weight rows of the second dot) of N-tile pid_n. Weight rows
    past the end are clamped (read, never stored)."""
    lanes = tl.arange(0, BLOCK_N)
    if EPILOGUE == "rope_store":  # N-tile = (head, j block): rows (j, j + HALF) of the head
        per_head = HALF // BLOCK_N
        w_a = (pid_n // per_head) * (2 * HALF) + (pid_n % per_head) * BLOCK_N + lanes
        return w_a, w_a, w_a + HALF
    cols = pid_n * BLOCK_N + lanes
    w_a = tl.minimum(cols, N - 1)
    return cols, w_a, w_a + N  # silu_mul: the up row N (= I) after its gate row


def _mma(x, w, acc, SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x @ w^T ([BLOCK_M, BLOCK_N]), or with SWAP acc + w @ x^T ([BLOCK_N, BLOCK_M]: the weight tile as the
    MMA's M operand)."""
    if SWAP:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


def _load_k(ptrs, ks, K, EVEN_K: tl.constexpr):
    """A [rows, BLOCK_K] tile at columns ks, 0 past K (no mask when K is a whole number of BLOCK_K steps)."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(ks < K)[None, :], other=0.0)


def _load_x(ptrs, row_ok, ks, K, EVEN_K: tl.constexpr):
    """The rows' [BLOCK_M, BLOCK_K] tile at columns ks: 0 in rows past M (row_ok [BLOCK_M, 1] false) and past K."""
    if EVEN_K:
        return tl.load(ptrs, mask=row_ok, other=0.0)
    return tl.load(ptrs, mask=row_ok & (ks < K)[None, :], other=0.0)


def _rows_tile(X, R, G, RES_OUT, offs, row_ok, kk, K, sq, write_res, EVEN_K: tl.constexpr, NORM: tl.constexpr):
    """(the rows' tile for the dot at columns kk, the rows' running sum of squares). Without NORM: x as it is. With
    NORM (the GEMVs' fold, `gemv._normed_x`): s = X + R rounded to X's dtype (the residual stream, stored to RES_OUT
    where `write_res`), the tile s * G in X's dtype, and sq grows by the sum of s * s over these columns."""
    x = _load_x(X + offs, row_ok, kk, K, EVEN_K)
    if NORM:
        x = x + _load_x(R + offs, row_ok, kk, K, EVEN_K)  # rounded to the input dtype, like the unfused add
        tl.store(RES_OUT + offs, x, mask=row_ok & (kk < K)[None, :] & write_res)
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
        g = tl.load(G + kk, mask=kk < K, other=0.0).to(tl.float32)
        x = (xf * g[None, :]).to(X.dtype.element_ty)
    return x, sq


def _dot_pair(X, W, x_rows, M, w_a, w_b, stride_xm, stride_wn, K, k_start, k_stop, R, G, RES_OUT, eps, write_res,
              PAIR: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM: tl.constexpr,
              PDL: tl.constexpr):
    """x[x_rows, k_start:k_stop] @ W[w_a]^T (and @ W[w_b]^T with PAIR), fp32 [BLOCK_M, BLOCK_N], K in BLOCK_K
    steps, rows x_rows >= M read as 0; with SWAP accumulated as [BLOCK_N, BLOCK_M] and transposed at the end. Waits
    for the previous kernel (`pdl_enter`) before reading x; with PDL == 2 the first weight tiles are read before that
    wait (weights are never written, so the read overlaps the previous kernel's tail), then go through the same
    first MMA as the loop's, so the sums keep their order. With NORM the rows are the RMSNorm's input folded in
    (`_rows_tile`) and the sums come scaled by each row's 1 / rms (one split only: the norm needs all of K)."""
    ks = k_start + tl.arange(0, BLOCK_K)
    row_off = x_rows.to(tl.int64)[:, None] * stride_xm
    row_ok = (x_rows < M)[:, None]
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_ptrs = W + w_a.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    b_ptrs = W + w_b.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    if SWAP:
        acc_a = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = acc_a
    k_lo = k_start
    if PDL == 2:  # k_start < K always: every split owns at least one BLOCK_K step
        a_first = _load_k(a_ptrs, ks, K, EVEN_K)
        if PAIR:
            b_first = _load_k(b_ptrs, ks, K, EVEN_K)
    pdl_enter(PDL)
    if PDL == 2:
        x, sq = _rows_tile(X, R, G, RES_OUT, row_off + ks[None, :], row_ok, ks, K, sq, write_res, EVEN_K, NORM)
        acc_a = _mma(x, a_first, acc_a, SWAP, DOT_PRECISION)
        if PAIR:
            acc_b = _mma(x, b_first, acc_b, SWAP, DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        k_lo += BLOCK_K
    for k0 in range(k_lo, k_stop, BLOCK_K):
        kk = ks + (k0 - k_start)
        x, sq = _rows_tile(X, R, G, RES_OUT, row_off + kk[None, :], row_ok, kk, K, sq, write_res, EVEN_K, NORM)
        acc_a = _mma(x, _load_k(a_ptrs, kk, K, EVEN_K), acc_a, SWAP, DOT_PRECISION)
        if PAIR:
            acc_b = _mma(x, _load_k(b_ptrs, kk, K, EVEN_K), acc_b, SWAP, DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SWAP:
        acc_a = tl.trans(acc_a)
        acc_b = tl.trans(acc_b)
    if NORM:
        inv_rms = (1.0 / tl.sqrt(sq / K + eps))[:, None]
        acc_a *= inv_rms
        acc_b *= inv_rms
    return acc_a, acc_b


def _split_k_fixup(acc_a, acc_b, WS, COUNT, tile, pid_k, SPLIT_K: tl.constexpr, PAIR: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store this split's partials; the last split of the tile to arrive gets their sum in the fixed order
    s = 0..SPLIT_K-1 (deterministic, whichever split arrives last) and resets the tile's counter. Returns
    (acc_a, acc_b, whether this program is the last)."""
    size = BLOCK_M * BLOCK_N
    parts = 2 if PAIR else 1
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    base = WS + tile.to(tl.int64) * (SPLIT_K * parts * size)  # the M-tile is the slowest index: grow-once prefix
    tl.store(base + pid_k * (parts * size) + offs, acc_a)
    if PAIR:
        tl.store(base + pid_k * (parts * size) + size + offs, acc_b)
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNT + tile, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    if last:
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):
            acc_a += tl.load(base + s * (parts * size) + offs, cache_modifier=".cg")
            if PAIR:
                acc_b += tl.load(base + s * (parts * size) + size + offs, cache_modifier=".cg")
        tl.atomic_xchg(COUNT + tile, 0)
    return acc_a, acc_b, last


def _store_tile(OUT, rows, cols, M, N, stride_om, val):
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], val.to(OUT.dtype.element_ty), mask=mask)


def _store_silu_mul(gate, up, OUT, rows, cols, M, N, stride_om):
    """silu(gate) * up with the silu_mul kernel's formula, each half rounded to OUT's dtype first (as stored by an
    unfused projection)."""
    dtype = OUT.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    _store_tile(OUT, rows, cols, M, N, stride_om, gate / (1.0 + tl.exp(-gate)) * up)


def _store_rope(xa, xb, w_a, rows, M, Q_OUT, stride_qm, POS, CACHE, stride_cache, K_CACHE, V_CACHE, SLOTS,
                stride_cb, stride_co, stride_ch, num_q_heads, num_kv_heads, HALF: tl.constexpr,
                BLOCK_SIZE: tl.constexpr):
    """Rows' column pairs (w_a, w_a + HALF) of one head, rounded to the output dtype, rotated with the rope kernel's
    formula (q and k heads; v as is); q to Q_OUT, k / v to the caches at the row's slot (slot < 0: no write)."""
    dtype = Q_OUT.dtype.element_ty
    xa = xa.to(dtype).to(tl.float32)
    xb = xb.to(dtype).to(tl.float32)
    row_ok = (rows < M)[:, None]
    rows_in = tl.minimum(rows, M - 1)
    pos = tl.load(POS + rows_in).to(tl.int64)[:, None]
    head = (w_a // (2 * HALF))[None, :]  # per-lane copies of the head (a scalar store mask is not portable)
    j = (w_a % (2 * HALF))[None, :]
    cos = tl.load(CACHE + pos * stride_cache + j).to(tl.float32)
    sin = tl.load(CACHE + pos * stride_cache + HALF + j).to(tl.float32)
    is_v = head >= num_q_heads + num_kv_heads
    ra = tl.where(is_v, xa, xa * cos - xb * sin).to(dtype)
    rb = tl.where(is_v, xb, xb * cos + xa * sin).to(dtype)
    q_mask = row_ok & (head < num_q_heads)
    q_at = Q_OUT + rows.to(tl.int64)[:, None] * stride_qm + w_a[None, :]  # a q head's column = its weight row
    tl.store(q_at, ra, mask=q_mask)
    tl.store(q_at + HALF, rb, mask=q_mask)
    slot = tl.load(SLOTS + rows_in).to(tl.int64)[:, None]
    kv_head = tl.where(is_v, head - num_q_heads - num_kv_heads, head - num_q_heads)
    at = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + kv_head * stride_ch + j
    slot_ok = row_ok & (slot >= 0)
    k_mask = slot_ok & (head >= num_q_heads) & (head < num_q_heads + num_kv_heads)
    v_mask = slot_ok & is_v
    _store_kv_halves(K_CACHE, V_CACHE, at, ra, rb, k_mask, v_mask, HALF)


_HELPERS = ("_tile_columns", "_mma", "_load_k", "_load_x", "_rows_tile", "_dot_pair", "_split_k_fixup",
            "_store_tile", "_store_silu_mul", "_store_rope", "_store_kv_halves")


def _decode_gemm_kernel(X, W, B, OUT, WS, COUNT, POS, CACHE, K_CACHE, V_CACHE, SLOTS, M, N, K, stride_xm,
                        stride_wn, stride_om, k_chunk, stride_cache, stride_cb, stride_co, stride_ch, num_q_heads,
                        num_kv_heads, R, G, RES_OUT, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EPILOGUE: tl.constexpr, PAIR: tl.constexpr,
                        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM: tl.constexpr = False,
                        PDL: tl.constexpr = 0):
    pid = tl.program_id(0)  # nothing is read before _dot_pair's pdl_enter but (with PDL == 2) weights
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m  # M-tiles fastest: the programs reading one weight tile run side by side
    pid_n = pid // num_pid_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols, w_a, w_b = _tile_columns(pid_n, N, BLOCK_N, EPILOGUE, HALF)
    k_start = pid_k * k_chunk
    write_res = (tl.zeros([BLOCK_M, BLOCK_K], tl.int32) + pid_n) == 0  # one N-tile's programs write the residual
    acc_a, acc_b = _dot_pair(X, W, rows, M, w_a, w_b, stride_xm, stride_wn, K, k_start,
                             tl.minimum(K, k_start + k_chunk), R, G, RES_OUT, eps, write_res, PAIR, EVEN_K, BLOCK_M,
                             BLOCK_N, BLOCK_K, SWAP, DOT_PRECISION, NORM, PDL)
    last = pid_k == SPLIT_K - 1  # without split-K: the one program of the tile
    if SPLIT_K > 1:
        tile = pid_m * (tl.num_programs(0) // num_pid_m) + pid_n
        acc_a, acc_b, last = _split_k_fixup(acc_a, acc_b, WS, COUNT, tile, pid_k, SPLIT_K, PAIR, BLOCK_M,
                                            BLOCK_N)
    if last:
        if HAS_BIAS:
            acc_a += tl.load(B + w_a).to(tl.float32)[None, :]
            if PAIR:
                acc_b += tl.load(B + w_b).to(tl.float32)[None, :]
        if EPILOGUE == "rope_store":
            _store_rope(acc_a, acc_b, w_a, rows, M, OUT, stride_om, POS, CACHE, stride_cache, K_CACHE, V_CACHE,
                        SLOTS, stride_cb, stride_co, stride_ch, num_q_heads, num_kv_heads, HALF, BLOCK_SIZE)
        elif EPILOGUE == "silu_mul":
            _store_silu_mul(acc_a, acc_b, OUT, rows, cols, M, N, stride_om)
        else:
            _store_tile(OUT, rows, cols, M, N, stride_om, acc_a)


# --- Launches --------------------------------------------------------------------------------------------------------

def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, n_out: int,
            n_tiles: int, config: tuple[int, ...], epilogue: str, rope: tuple = (),
            norm: Norm | None = None) -> torch.Tensor | None:
    """One launch of `_decode_gemm_kernel` over x2 [M, K] (rows contiguous); `n_tiles` N-tiles of `n_out` output
    columns; `rope` = the rope_store epilogue's (positions, cos_sin, k_cache, v_cache, slots, Hq, Hkv, HALF);
    `norm` = (residual [M, K], norm weight [K], eps) of an RMSNorm folded in (one split). Returns x2 + residual
    with a norm, else None."""
    block_n, block_k, split, num_warps, num_stages, swap = _check_config(config)
    m, k = x2.shape
    r, g, res_out, eps = _norm_launch_args(x2, norm)
    if m == 0:
        return res_out if norm is not None else None
    k_chunk = cdiv(cdiv(k, split), block_k) * block_k  # whole BLOCK_K steps per split
    split = cdiv(k, k_chunk)
    if norm is not None and split != 1:
        raise ValueError(f"a folded RMSNorm needs all of K in one program: config {config} splits K={k} {split} ways")
    block_m = WIDE_BLOCK_M if m > BLOCK_M and wide_rows_mode() else BLOCK_M
    grid_m = cdiv(m, block_m)
    pair = epilogue != "plain"
    ws, count = out, out
    if split > 1:
        m_tiles = max(grid_m, cdiv(DECODE_MAX_ROWS, block_m))
        per_tile = split * (2 if pair else 1) * block_m * block_n
        ws, count = split_buffers(x2.device, ("decode_gemm", n_tiles, split, pair, block_n),
                                  m_tiles * n_tiles * per_tile, m_tiles * n_tiles)
    if rope:
        pos, cos_sin, k_cache, v_cache, slots, num_q_heads, num_kv_heads, half = rope
        rope_args = (pos, cos_sin, k_cache, v_cache, slots)
        rope_ints = (cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_q_heads,
                     num_kv_heads)
        rope_kw = {"HALF": half, "BLOCK_SIZE": k_cache.shape[1]}
    else:
        rope_args, rope_ints, rope_kw = (out,) * 5, (0,) * 6, {"HALF": 1, "BLOCK_SIZE": 1}
    jit_helpers(globals(), _HELPERS)
    launch(_decode_gemm_kernel, (grid_m * n_tiles, split),
           x2, weight, bias if bias is not None else weight, out, ws, count, *rope_args, m, n_out, k, x2.stride(0),
           weight.stride(0), out.stride(0), k_chunk, *rope_ints, r, g, res_out, eps, BLOCK_M=block_m, BLOCK_N=block_n,
           BLOCK_K=block_k, SPLIT_K=split, EPILOGUE=epilogue, PAIR=pair, HAS_BIAS=bias is not None,
           EVEN_K=k % block_k == 0, SWAP=swap, DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
           NORM=norm is not None, num_warps=num_warps, num_stages=num_stages, **rope_kw)
    return res_out if norm is not None else None


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns but the weight has K={k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def decode_gemm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       config: tuple[int, ...] | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) -> [..., N] in x's dtype (or out_dtype: the float32 sum unrounded);
    config defaults to `config_for(N, K)`."""
    n, k = weight.shape
    config = config or config_for(n, k, x.device, x.dtype)
    x2 = _rows(x, k)
    out = torch.empty((x2.shape[0], n), dtype=out_dtype or x.dtype, device=x.device)
    _launch(x2, weight, bias, out, n, cdiv(n, config[0]), config, "plain")
    return out.view(*x.shape[:-1], n)


def _norm_launch_args(x2: torch.Tensor, norm: Norm | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """`gemv._norm_args` (R, G, RES_OUT, eps) of a norm folded into rows x2 [M, K]; ValueError where the residual and
    norm weight do not fit x2's rows (`gemv._norm_ok`) or the rows are not contiguous."""
    if norm is not None and not (x2.is_contiguous() and _norm_ok(x2, norm)):
        residual, norm_weight, _ = norm
        raise ValueError(f"a folded norm needs contiguous rows and residual of one shape and dtype and a norm weight "
                         f"of K={x2.shape[1]}: got {tuple(x2.shape)} / {tuple(residual.shape)}, {norm_weight.numel()}")
    return _norm_args(x2, norm)


def decode_silu_triton(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, ...] | None = None,
                       norm: Norm | None = None) -> Any:
    """silu_mul(x [M, K] @ weight[2I, K].T) -> [M, I] in x's dtype (gate rows then up rows), one launch. With `norm`
    = (residual, norm weight, eps): silu_mul(rms_norm(x + residual) @ weight.T) and x + residual, as a pair (the
    config must keep K in one split)."""
    n2, k = weight.shape
    if n2 % 2:
        raise ValueError(f"a gate/up weight has an even number of rows, not {n2}")
    config = config or config_for(n2, k, x.device, x.dtype)
    x2 = _rows(x, k)
    out = torch.empty((x2.shape[0], n2 // 2), dtype=x.dtype, device=x.device)
    res_out = _launch(x2, weight, None, out, n2 // 2, cdiv(n2 // 2, config[0]), config, "silu_mul", norm=norm)
    out = out.view(*x.shape[:-1], n2 // 2)
    return out if norm is None else (out, res_out.view(x.shape))


def decode_rope_store_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, slots: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                             config: tuple[int, ...] | None = None, norm: Norm | None = None) -> Any:
    """`linear_rope_store_ref` for M rows in one launch: returns q [M, Hq, D]; rotated k and v go to the caches
    [blocks, block_size, Hkv, D] at `slots` [M] (< 0: no write). Whole-head rotary (cos_sin has D columns). With
    `norm` = (residual, norm weight, eps) the input is rms_norm(x + residual), and (q, x + residual) comes back."""
    n, k = weight.shape
    config = config or config_for(n, k, x.device, x.dtype)
    heads = num_q_heads + 2 * num_kv_heads
    head_dim = n // heads
    half = head_dim // 2
    x2 = _rows(x, k)
    m = x2.shape[0]
    if n != heads * head_dim or cos_sin.shape[-1] != head_dim or head_dim % 2 or half % config[0]:
        raise ValueError(f"weight rows {n}, {heads} heads, cos_sin width {cos_sin.shape[-1]}: need whole heads, "
                         f"whole-head rotary and a rotary half divisible by BLOCK_N={config[0]}")
    if positions.numel() != m or slots.numel() != m:
        raise ValueError(f"{m} rows need {m} positions and slots, not {positions.numel()} and {slots.numel()}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("the caches need equal strides and contiguous heads; cos_sin contiguous rows")
    q = torch.empty((m, num_q_heads, head_dim), dtype=x.dtype, device=x.device)
    rope = (positions, cos_sin, k_cache, v_cache, slots, num_q_heads, num_kv_heads, half)
    res_out = _launch(x2, weight, bias, q, n, heads * (half // config[0]), config, "rope_store", rope, norm)
    return q if norm is None else (q, res_out.view(x.shape))


# --- Dispatch (the KernelOps signatures) -----------------------------------------------------------------------------

def _kernel_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return _triton_ok(x, weight, bias) and weight.is_contiguous()


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  weight_t: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`KernelOps.decode_linear`: F.linear whose rows do not depend on each other or on M. CUDA fp16/bf16 with a
    contiguous weight: the decode GEMM; elsewhere F.linear one row at a time. weight_t is not read. out_dtype
    (float32): the sum unrounded."""
    if _kernel_ok(x, weight, bias):
        return decode_gemm_triton(x, weight, bias, out_dtype=out_dtype)
    return linear_rows(x, weight, bias, out_dtype=out_dtype)


def decode_linear_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """`KernelOps.linear_silu_mul`: silu_mul(linear(x, gate/up weight [2I, K])) in one launch on CUDA fp16/bf16;
    None elsewhere (the caller composes decode_linear and silu_mul, with the same numbers)."""
    if _kernel_ok(x, weight, None) and weight.shape[0] % 2 == 0:
        return decode_silu_triton(x, weight)
    return None


def _rope_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
               cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
               num_q_heads: int, num_kv_heads: int) -> bool:
    """Whether the rope_store epilogue runs these operands (else the caller composes the unfused ops)."""
    if not _kernel_ok(x, weight, bias) or x.dim() != 2:
        return False
    heads = num_q_heads + 2 * num_kv_heads
    n, k = weight.shape
    head_dim = n // heads
    block_n = config_for(n, k, x.device, x.dtype)[0]
    return not (n % heads or head_dim % 2 or cos_sin.shape[-1] != head_dim or (head_dim // 2) % block_n
                or cos_sin.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1
                or k_cache.dtype != x.dtype or positions.numel() != x.shape[0] or slots.numel() != x.shape[0])


def decode_linear_rope_store(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, slots: torch.Tensor, num_q_heads: int,
                             num_kv_heads: int) -> torch.Tensor | None:
    """`KernelOps.linear_rope_store`: the decode rows' QKV projection, rope and KV-cache writes in one launch;
    returns q [M, Hq, D], or None where the layout does not fit (CPU, fp32, partial rotary, a head's rotary half
    not a multiple of BLOCK_N (>= 16), strided caches): the caller then composes the unfused ops."""
    if not _rope_fits(x, weight, bias, positions, cos_sin, k_cache, v_cache, slots, num_q_heads, num_kv_heads):
        return None
    return decode_rope_store_triton(x, weight, bias, positions, cos_sin, k_cache, v_cache, slots, num_q_heads,
                                    num_kv_heads)


@functools.lru_cache(maxsize=None)
def wide_rows_mode() -> bool:
    """$HYBRID_ENGINE_DECODE_GEMM_WIDE: "1" runs steps of 17-32 rows as one 32-row M-tile, so each weight tile is
    read by one program instead of two; "0" (the default) keeps 16-row tiles at every M. Rows stay invariant only if
    the MMA sums a row's products the same way at both tile widths (the rows are the dot's N operand with SWAP=1,
    its M operand with SWAP=0): `decode_gemm_sweep.check` compares each row alone with its row of a 32-row call,
    bitwise, so it is to be measured on a card before it is turned on. Read once per process."""
    return env_choice("HYBRID_ENGINE_DECODE_GEMM_WIDE", "0", {"0": False, "off": False, "1": True, "on": True},
                      "0 (16-row tiles at every row count) or 1 (one 32-row tile above 16 rows)")


@functools.lru_cache(maxsize=None)
def fold_norm_mode() -> bool:
    """$HYBRID_ENGINE_DECODE_GEMM_NORM: "1" folds a decode step's RMSNorm into the decode GEMM after it (QKV + rope,
    gate/up + SiLU-mul) where the shape's config keeps K in one split, as the one-row GEMVs fold it on small models;
    "0" (the default until it is measured on a card) keeps the norm its own kernel. Read once per process
    (`fold_norm_mode.cache_clear()` to read it again)."""
    return env_choice("HYBRID_ENGINE_DECODE_GEMM_NORM", "0", {"0": False, "off": False, "1": True, "on": True},
                      "0 (the norm its own kernel) or 1 (folded into the decode GEMM after it)")


def _fold_ok(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, weight: torch.Tensor) -> bool:
    return (residual is not None and fold_norm_mode() and _kernel_ok(x, weight, None) and x.dim() == 2
            and x.is_contiguous() and _norm_ok(x, (residual, norm_weight, 0.0))
            and config_for(*weight.shape, x.device, x.dtype)[2] == 1)


def decode_norm_linear_silu_mul(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                                eps: float, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`KernelOps.norm_linear_silu_mul` on the batch-invariant path: (silu_mul(rms_norm(x + residual) @ gate/up^T),
    x + residual) in one launch where `fold_norm_mode` is on and the config has one split; None elsewhere (the caller
    runs the norm, then `decode_linear_silu_mul`)."""
    if not _fold_ok(x, residual, norm_weight, weight) or weight.shape[0] % 2:
        return None
    return decode_silu_triton(x, weight, norm=(residual, norm_weight, eps))


def decode_norm_linear_rope_store(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                                  eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                                  positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, slots: torch.Tensor, num_q_heads: int,
                                  num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`KernelOps.norm_linear_rope_store` on the batch-invariant path: (q, x + residual) of the QKV projection of
    rms_norm(x + residual) with rope and the KV-cache writes, in one launch where `fold_norm_mode` is on, the config
    has one split and `decode_linear_rope_store` would fuse; None elsewhere."""
    if not (_fold_ok(x, residual, norm_weight, weight) and _rope_fits(x, weight, bias, positions, cos_sin, k_cache,
                                                                      v_cache, slots, num_q_heads, num_kv_heads)):
        return None
    return decode_rope_store_triton(x, weight, bias, positions, cos_sin, k_cache, v_cache, slots, num_q_heads,
                                    num_kv_heads, norm=(residual, norm_weight, eps))
