"""Attention of a prompt's new tokens after `start` cached positions (prefix-cache hits, later prompt chunks),
reading the cached K/V in place from the paged cache.

A short chunk after a long history has few query tiles (130 new tokens: 3 tiles x 32 heads = 96 programs on 132 SMs)
and each would walk thousands of keys serially, so the keys are split across programs as in flash-decoding: grid
(query tiles, query heads, SPLITS), each split a contiguous BLOCK_N-aligned range of the keys its tile needs,
computed on the device from the start tensor (one CUDA graph serves every start). The last program to finish a
(tile, head) merges the partials in split order, so the result does not depend on which program arrives last.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import tuning
from ._triton import cdiv, check_dot_tiles, jit_helpers, launch, next_pow2
from ._workspace import sm_count, split_buffers
from .kv_store import _paged_offsets  # noqa: F401 (called by _attend_keys)

tl = None  # triton.language, bound on first launch (see _triton.py)

# GPU configs by new-token count: (max_T, (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLITS)), the first entry with
# num_tokens <= max_T. One config per num_tokens for every start (a graph serves them all). Placeholders reasoned for
# the H200 (132 SMs), LLaMA-2-7B heads: tiles as the unsplit kernel had them (PREFILL_CONFIGS' BLOCK_M, BLOCK_N 64)
# and SPLITS bringing tiles x 32 heads x SPLITS to ~3-4 programs per SM; to be replaced by the measured table of
# benchmarks/cached_attn_sweep.py.
CACHED_CONFIGS: list[tuple[int, tuple[int, int, int, int, int]]] = [
    (32, (16, 64, 4, 2, 8)), (64, (32, 64, 4, 2, 8)), (160, (64, 64, 4, 2, 4)), (256, (64, 64, 4, 3, 4)),
    (512, (64, 64, 4, 3, 2)), (1 << 30, (64, 64, 4, 3, 1))]
# What CACHED_CONFIGS' SPLITS were chosen for: other head and SM counts keep the same programs per SM.
TUNED_HEADS, TUNED_SMS = 32, 132
MAX_SPLITS = 64
CPU_CACHED_CONFIG = (16, 16, 4, 2, 2)  # the interpreter: small tiles keep the CPU tests fast; 2 splits test the merge


def cached_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_table: torch.Tensor, start: int | torch.Tensor, scale: float,
                                 valid_len: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of prompt tokens after `start` cached positions (a prefix-cache hit, a later prompt chunk): q [n,
    Hq, D] at positions start..start+n-1, whose k/v are already in the paged cache with the earlier ones
    (block_table [max_blocks] int32). Query i sees positions 0..start+i. The context is gathered into contiguous
    k/v, then SDPA with the offset causal mask. `start` is a host int or a [1] device tensor; for a tensor the
    gather covers the whole block table (fixed shapes, graph-safe). Rows at or past `valid_len` (padding) are
    finite and ignored."""
    n, _, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    total = start + n if isinstance(start, int) else block_table.shape[0] * block_size
    pos = torch.arange(total, device=q.device)
    slots = block_table.long()[pos // block_size] * block_size + pos % block_size
    k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots)
    v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots)
    first = start if isinstance(start, int) else start.long()
    mask = pos[None, :] <= (torch.arange(n, device=q.device)[:, None] + first)  # [n, total]
    group = q.shape[1] // num_kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).to(q.dtype),
                                         v.transpose(0, 1).to(q.dtype), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _attend_keys(q, K_CACHE, V_CACHE, BT, kv_head, rows, ctx, lo, hi, scale, stride_cb, stride_co, stride_ch,
                 head_dim, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of one query tile over keys lo..hi-1 read through the block table: (row max, row sum,
    unnormalised output). Row r sees keys <= ctx + r. A row with no visible key in the range keeps (-inf, 0, 0):
    its exponentials use 0 as the max, where the running max would give exp(-inf + inf) = nan."""
    d = tl.arange(0, BLOCK_D)
    d_mask = (d < head_dim)[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < hi
        off = _paged_offsets(BT, cols, col_mask, kv_head, stride_cb, stride_co, stride_ch, BLOCK_SIZE)
        kv_mask = col_mask[:, None] & d_mask
        k = tl.load(K_CACHE + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale
        scores = tl.where((cols[None, :] <= (rows + ctx)[:, None]) & col_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_exp)
        p = tl.exp(scores - m_exp[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V_CACHE + off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


def _merge_splits(WS_ACC, WS_M, WS_L, first, active, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalised output of one (tile, head) from its partials first..first+active-1, summed in split order."""
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, active):
        m = tl.maximum(m, tl.load(WS_M + (first + s).to(tl.int64) * BLOCK_M + r, cache_modifier=".cg"))
    m = tl.where(m == float("-inf"), 0.0, m)  # a row no split saw (padding): weights 0, output 0
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, active):
        part = (first + s).to(tl.int64) * BLOCK_M + r
        w = tl.exp(tl.load(WS_M + part, cache_modifier=".cg") - m)
        l_sum += w * tl.load(WS_L + part, cache_modifier=".cg")
        acc += w[:, None] * tl.load(WS_ACC + part[:, None] * BLOCK_D + d[None, :], cache_modifier=".cg")
    return acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]


def _cached_prefill_kernel(Q, K_CACHE, V_CACHE, BT, START, VALID_LEN, OUT, WS_ACC, WS_M, WS_L, COUNT, scale,
                           stride_qt, stride_qh, stride_cb, stride_co, stride_ch, stride_ot, stride_oh, num_tokens,
                           head_dim, GROUP: tl.constexpr, HAS_VALID_LEN: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query tile of one head over one split of the keys 0..start+its last valid row (keys stop at start +
    valid_len; a padded tile has none). SPLITS > 1: partials to the workspace, the last arrival merges them."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    start_m = tile * BLOCK_M
    ctx = tl.load(START).to(tl.int32)
    n_valid = num_tokens
    if HAS_VALID_LEN:
        n_valid = tl.minimum(tl.load(VALID_LEN).to(tl.int32), num_tokens)
    end_n = tl.where(start_m < n_valid, ctx + tl.minimum(start_m + BLOCK_M, n_valid), 0)
    split_len = ((end_n + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # on the device: graph-safe
    lo = split * split_len
    hi = tl.minimum(lo + split_len, end_n)
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    out_mask = (rows < num_tokens)[:, None] & (d < head_dim)[None, :]
    q = tl.load(Q + rows[:, None].to(tl.int64) * stride_qt + head * stride_qh + d[None, :], mask=out_mask, other=0.0)
    m_i, l_i, acc = _attend_keys(q, K_CACHE, V_CACHE, BT, head // GROUP, rows, ctx, lo, hi, scale, stride_cb,
                                 stride_co, stride_ch, head_dim, BLOCK_SIZE, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    out_at = OUT + rows[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :]
    if SPLITS == 1:
        tl.store(out_at, (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(OUT.dtype.element_ty), mask=out_mask)
    else:
        pair = tile * tl.num_programs(1) + head
        part = (pair * SPLITS + split).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        if lo < hi:  # an empty split writes nothing: the merge reads only the first `active` splits
            tl.store(WS_ACC + part[:, None] * BLOCK_D + d[None, :], acc)
            tl.store(WS_M + part, m_i)
            tl.store(WS_L + part, l_i)
        # every split's partials are written before its arrival is counted; the last arrival merges in split order
        # and resets the counter for the next call (graph replays need no memset), as gemv's split-K does
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNT + pair, 1, sem="acq_rel")
        if arrived == SPLITS - 1:
            active = tl.where(end_n > 0, (end_n + split_len - 1) // tl.maximum(split_len, 1), 0)
            out = _merge_splits(WS_ACC, WS_M, WS_L, pair * SPLITS, active, BLOCK_M, BLOCK_D)
            tl.store(out_at, out.to(OUT.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(COUNT + pair, 0)


def _scaled_splits(splits: int, num_heads: int, device: torch.device) -> int:
    """The table's SPLITS for another head count or SM count: the same number of programs per SM."""
    return cdiv(splits * TUNED_HEADS * sm_count(device), num_heads * TUNED_SMS)


@functools.lru_cache(maxsize=None)
def tuned_configs(num_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device) -> list[tuple[int, tuple[int, ...]]]:
    """This card's measured configs for these heads (`hybrid-engine tune`, kernels/sweeps/, kernels/tuning.py) as
    (new tokens measured, config), sorted; empty where none were measured."""
    suffix = "," + tuning.shape_key(num_heads, head_dim, dtype=dtype)
    found = [(int(key.split(",")[0]), tuple(cfg)) for key, cfg in tuning.entries("cached_attention", device).items()
             if key.endswith(suffix) and key.count(",") == 3]
    return sorted(found)


def cached_config(num_tokens: int, max_context: int, num_heads: int, device: torch.device,
                  head_dim: int = 128, dtype: torch.dtype = torch.float16) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, SPLITS) of the cached-prefill kernel for `num_tokens` new tokens of
    `num_heads` query heads over a block table holding `max_context` positions: the card's tuned entry for the
    smallest measured token count >= num_tokens (else the largest), else `CACHED_CONFIGS` scaled to the heads and
    SMs. Depends on shapes only, never on the start, so one captured graph serves every start. SPLITS stays within
    the keys the table can hold."""
    tuned = tuned_configs(num_heads, head_dim, dtype, device)
    if device.type != "cuda":
        block_m, block_n, num_warps, num_stages, splits = CPU_CACHED_CONFIG
    elif tuned:
        block_m, block_n, num_warps, num_stages, splits = next(
            (cfg for t, cfg in tuned if num_tokens <= t), tuned[-1][1])
    else:
        block_m, block_n, num_warps, num_stages, splits = next(
            cfg for max_t, cfg in CACHED_CONFIGS if num_tokens <= max_t)
        splits = _scaled_splits(splits, num_heads, device)
    splits = max(1, min(splits, cdiv(max_context, block_n), MAX_SPLITS))
    return block_m, block_n, num_warps, num_stages, splits


def _check_config(config: tuple[int, int, int, int, int]) -> None:
    if len(config) != 5:
        raise ValueError(f"config={config!r}: want (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLITS)")
    block_m, block_n, num_warps, num_stages, splits = config
    check_dot_tiles(BLOCK_M=block_m, BLOCK_N=block_n)
    if num_warps < 1 or num_warps & (num_warps - 1) or num_stages < 1:
        raise ValueError(f"num_warps={num_warps}, num_stages={num_stages}: num_warps a power of two, stages >= 1")
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"SPLITS={splits}: must be in 1..{MAX_SPLITS}")


def _workspace(q: torch.Tensor, tiles: int, splits: int, block_m: int, block_d: int):
    """(acc, m, l, counters) views of this shape's reused split workspace; the output itself where SPLITS = 1."""
    num_heads = q.shape[1]
    if splits == 1:
        return q, q, q, q
    rows = tiles * num_heads * splits * block_m
    ws, count = split_buffers(q.device, ("cached_prefill", rows, block_d, tiles, num_heads), rows * (block_d + 2),
                              tiles * num_heads)
    return ws[:rows * block_d], ws[rows * block_d:rows * (block_d + 1)], ws[rows * (block_d + 1):], count


def cached_prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    block_table: torch.Tensor, start: int | torch.Tensor, scale: float,
                                    valid_len: torch.Tensor | None = None,
                                    config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """Triton version of `cached_prefill_attention_ref`: K/V read in place from the paged cache, `start` from a
    device tensor, so the grid depends only on the number of new tokens and the block table's capacity (graph-safe
    for any start). `config` (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLITS) overrides `cached_config`."""
    num_tokens, num_q_heads, head_dim = q.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        return cached_prefill_attention_ref(q, k_cache, v_cache, block_table, start, scale, valid_len)
    block_size = k_cache.shape[1]
    if config is None:
        config = cached_config(num_tokens, block_table.shape[0] * block_size, num_q_heads, q.device,
                               head_dim, q.dtype)
    _check_config(config)
    block_m, block_n, num_warps, num_stages, splits = config
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if not isinstance(start, torch.Tensor):
        start = torch.full((1,), start, dtype=torch.int32, device=q.device)
    tiles, block_d = cdiv(num_tokens, block_m), next_pow2(max(head_dim, 16))
    ws_acc, ws_m, ws_l, count = _workspace(q, tiles, splits, block_m, block_d)
    jit_helpers(globals(), ("_paged_offsets", "_attend_keys", "_merge_splits"))
    launch(_cached_prefill_kernel, (tiles, num_q_heads, splits),
           q, k_cache, v_cache, block_table, start, valid_len if valid_len is not None else start, out, ws_acc, ws_m,
           ws_l, count, scale, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           out.stride(0), out.stride(1), num_tokens, head_dim, GROUP=num_q_heads // k_cache.shape[2],
           HAS_VALID_LEN=valid_len is not None, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
           BLOCK_D=block_d, SPLITS=splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
           num_warps=num_warps, num_stages=num_stages)
    return out
