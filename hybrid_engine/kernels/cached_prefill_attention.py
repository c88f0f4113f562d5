"""Attention of a prompt's new tokens after `start` cached positions (prefix-cache hits, later prompt chunks),
reading the cached K/V in place from the paged cache.

A short chunk after a long history has few query tiles (130 new tokens: 3 tiles x 32 heads = 96 programs on 132 SMs)
and each would walk thousands of keys serially, so the keys are split across programs as in flash-decoding: grid
(query tiles, query heads, SPLITS), the tile's context cut into as many equal BLOCK_N-aligned ranges as hold
SPLIT_MIN_KEYS keys each (at most SPLITS), computed on the device from the start tensor (one CUDA graph serves every
start; a short context leaves later splits empty and runs unsplit, with no merge). With several splits active, the
last program to finish a (tile, head) merges the partials in split order (an unrolled loop: the splits' loads are in
flight together), so the result does not depend on which program arrives last. Inside a split, the key blocks every
row of the tile sees run without masks; only the diagonal and the range's end are masked. Scores are kept in log2
units (exp2). Each iteration reads the next one's block-table entries ahead of its own K/V loads.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import tuning
from ._triton import cdiv, check_dot_tiles, jit_helpers, launch, next_pow2, pdl_enter
from ._workspace import sm_count, split_buffers

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
MAX_SPLITS = 16  # the merge unrolls its loop over the splits
CPU_CACHED_CONFIG = (16, 16, 4, 2, 2)  # the interpreter: small tiles keep the CPU tests fast; 2 splits test the merge
LOG2E = 1.4426950408889634
SPLIT_MIN_KEYS = 512  # on a GPU a split walks at least this many keys: below that a merge costs more than it saves


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


def _pages(BT, n0, hi, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block of each key n0..n0+BLOCK_N-1 (block 0 at or past `hi`), from the block table. n0 is a
    multiple of BLOCK_N and both are powers of two, so (n0 + r) // BLOCK_SIZE = n0 // BLOCK_SIZE + r // BLOCK_SIZE:
    the per-key part is loop-invariant."""
    r = tl.arange(0, BLOCK_N)
    return tl.load(BT + n0 // BLOCK_SIZE + r // BLOCK_SIZE, mask=n0 + r < hi, other=0).to(tl.int64)


def _in_block(kv_head, stride_co, stride_ch, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """[BLOCK_N, BLOCK_D] offsets of key r's element d of `kv_head` inside its cache block, for a key block starting
    at a multiple of BLOCK_SIZE; one starting inside a cache block (BLOCK_SIZE > BLOCK_N) adds (n0 % BLOCK_SIZE) x
    stride_co. Computed once per program: per key block only the cache blocks' offsets are added. The kernel is
    bound by instruction issue (one warp per scheduler; ncu on the H200: 4.3 cycles per issued instruction, 20 % of
    DRAM bandwidth): with this and the scale folded into the exponent's multiply-add, the 64 x 64 tile's loop went
    from 555 to 447 instructions per key block (sm_90 SASS), and 96 new tokens after 2,000 cached keys from 31.2 to
    26.9 us per layer."""
    r = tl.arange(0, BLOCK_N)
    return ((r % BLOCK_SIZE).to(tl.int64) * stride_co + kv_head * stride_ch)[:, None] + tl.arange(0, BLOCK_D)[None, :]


def _key_block(q, K_CACHE, V_CACHE, page, in_block, rows, ctx, n0, hi, qk_scale, m_i, l_i, acc, stride_cb,
               stride_co, head_dim, MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Keys n0..n0+BLOCK_N-1 (in cache blocks `page`, `_pages`) folded into the online softmax (m_i, l_i, acc),
    scores in log2 units. MASKED: keys at or past `hi` or past a row's own position (row r sees keys <= ctx + r) are
    dropped, and a row with no visible key so far keeps (-inf, 0, 0) (its exponentials use 0 as the max, where the
    running max would give exp2(-inf + inf) = nan). Unmasked: every row sees every key of the block. The scale is
    applied to the block's max and inside the exponent (one fused multiply-add per score)."""
    d = tl.arange(0, BLOCK_D)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < hi  # all true in an unmasked block
    kv_at = (page * stride_cb + (n0 % BLOCK_SIZE) * stride_co)[:, None] + in_block
    kv_mask = col_mask[:, None] & (d < head_dim)[None, :]
    if EVEN_D and not MASKED:
        k = tl.load(K_CACHE + kv_at)
    else:
        k = tl.load(K_CACHE + kv_at, mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if MASKED:
        scores = tl.where((cols[None, :] <= (rows + ctx)[:, None]) & col_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1) * qk_scale)
    m_exp = m_new
    if MASKED:
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_exp)
    p = tl.exp2(scores * qk_scale - m_exp[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if EVEN_D and not MASKED:
        v = tl.load(V_CACHE + kv_at)
    else:
        v = tl.load(V_CACHE + kv_at, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def _attend_keys(q, K_CACHE, V_CACHE, BT, kv_head, rows, first_row, ctx, lo, hi, qk_scale, stride_cb, stride_co,
                 stride_ch, head_dim, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of one query tile (rows first_row..) over keys lo..hi-1, lo a multiple of BLOCK_N: (row max,
    row sum, unnormalised output), in log2 units. Keys up to ctx + first_row are visible to every row of the tile:
    their whole blocks run without masks, the rest (the diagonal, the end of the range) with them. Each iteration
    reads the next one's block-table entries (measured on the H200, 96 new tokens after 2,000 cached: 32.6 -> 28.3
    us per layer at (64, 64, 4, 3, 4); loading them in the iteration that uses them measured 37.2 against 31.3 at
    (64, 64, 4, 3, 2)). Triton's pipeliner still issues the entries two blocks ahead as a plain load just before
    that block's asynchronous K/V copies (sm_90 TTGIR), so the copies wait on it there."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi = lo + tl.maximum(tl.minimum(hi, ctx + first_row + 1) - lo, 0) // BLOCK_N * BLOCK_N
    in_block = _in_block(kv_head, stride_co, stride_ch, BLOCK_SIZE, BLOCK_N, BLOCK_D)
    page = _pages(BT, lo, hi, BLOCK_SIZE, BLOCK_N)
    for n0 in range(lo, full_hi, BLOCK_N):
        cur, page = page, _pages(BT, n0 + BLOCK_N, hi, BLOCK_SIZE, BLOCK_N)
        m_i, l_i, acc = _key_block(q, K_CACHE, V_CACHE, cur, in_block, rows, ctx, n0, hi, qk_scale, m_i, l_i, acc,
                                   stride_cb, stride_co, head_dim, False, EVEN_D, BLOCK_SIZE, BLOCK_N,
                                   BLOCK_D, DOT_PRECISION)
    for n0 in range(full_hi, hi, BLOCK_N):
        cur, page = page, _pages(BT, n0 + BLOCK_N, hi, BLOCK_SIZE, BLOCK_N)
        m_i, l_i, acc = _key_block(q, K_CACHE, V_CACHE, cur, in_block, rows, ctx, n0, hi, qk_scale, m_i, l_i, acc,
                                   stride_cb, stride_co, head_dim, True, EVEN_D, BLOCK_SIZE, BLOCK_N,
                                   BLOCK_D, DOT_PRECISION)
    return m_i, l_i, acc


def _merge_splits(WS_ACC, WS_M, WS_L, first, active, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Normalised output of one (tile, head) from its partials first..first+active-1 (log2 units), summed in split
    order. The loop over splits is unrolled (SPLITS is small), so each pass's loads are independent and in flight
    together rather than one L2 round trip per split."""
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        m_s = tl.load(WS_M + (first + s).to(tl.int64) * BLOCK_M + r, mask=r * 0 + s < active,
                      other=float("-inf"), cache_modifier=".cg")
        m = tl.maximum(m, m_s)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row no split saw (padding): weights 0, output 0
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in tl.static_range(SPLITS):
        part = (first + s).to(tl.int64) * BLOCK_M + r
        ok = r * 0 + s < active  # per-row copies of the split's flag (a scalar mask is not portable)
        w = tl.exp2(tl.load(WS_M + part, mask=ok, other=float("-inf"), cache_modifier=".cg") - m)
        l_sum += w * tl.load(WS_L + part, mask=ok, other=0.0, cache_modifier=".cg")
        acc += w[:, None] * tl.load(WS_ACC + part[:, None] * BLOCK_D + d[None, :], mask=ok[:, None], other=0.0,
                                    cache_modifier=".cg")
    return acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]


def _cached_prefill_kernel(Q, K_CACHE, V_CACHE, BT, START, VALID_LEN, OUT, WS_ACC, WS_M, WS_L, COUNT, qk_scale,
                           stride_qt, stride_qh, stride_cb, stride_co, stride_ch, stride_ot, stride_oh, num_tokens,
                           head_dim, GROUP: tl.constexpr, HAS_VALID_LEN: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr, EVEN_D: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = 0):
    """One query tile of one head over one split of the keys 0..start+its last valid row (keys stop at start +
    valid_len; a padded tile has none). A split walks at least MIN_KEYS keys, so a short context leaves the later
    splits empty: with one split active its program stores the output; with more, each stores its partials and the
    last program of the (tile, head) to arrive merges them."""
    pdl_enter(PDL)
    tile = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    start_m = tile * BLOCK_M
    ctx = tl.load(START).to(tl.int32)
    n_valid = num_tokens
    if HAS_VALID_LEN:
        n_valid = tl.minimum(tl.load(VALID_LEN).to(tl.int32), num_tokens)
    end_n = tl.where(start_m < n_valid, ctx + tl.minimum(start_m + BLOCK_M, n_valid), 0)
    # on the device (graph-safe): as many splits as hold MIN_KEYS keys each (at least one, at most SPLITS), of
    # equal BLOCK_N-aligned lengths, so a short context runs unsplit and no split is left with a sliver of keys
    parts = tl.minimum(tl.maximum(end_n // MIN_KEYS, 1), SPLITS)
    split_len = tl.maximum(((end_n + parts - 1) // parts + BLOCK_N - 1) // BLOCK_N * BLOCK_N, BLOCK_N)
    active = (end_n + split_len - 1) // split_len  # splits holding keys: 0 for a padded tile
    lo = split * split_len
    hi = tl.minimum(lo + split_len, end_n)
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    out_mask = (rows < num_tokens)[:, None] & (d < head_dim)[None, :]
    q = tl.load(Q + rows[:, None].to(tl.int64) * stride_qt + head * stride_qh + d[None, :], mask=out_mask, other=0.0)
    m_i, l_i, acc = _attend_keys(q, K_CACHE, V_CACHE, BT, head // GROUP, rows, start_m, ctx, lo, hi, qk_scale,
                                 stride_cb, stride_co, stride_ch, head_dim, EVEN_D, BLOCK_SIZE, BLOCK_M, BLOCK_N,
                                 BLOCK_D, DOT_PRECISION)
    out_at = OUT + rows[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :]
    direct = split == 0  # one split holds every key: its program stores the output
    if SPLITS > 1:
        direct = direct & (active <= 1)
        if active > 1:  # every program of the pair computes the same `active`: all of them or none are here
            pair = tile * tl.num_programs(1) + head
            part = (pair * SPLITS + split).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            if lo < hi:  # an empty split writes nothing: the merge reads only the first `active` splits
                tl.store(WS_ACC + part[:, None] * BLOCK_D + d[None, :], acc)
                tl.store(WS_M + part, m_i)
                tl.store(WS_L + part, l_i)
            # every split's partials are written before its arrival is counted; the last arrival merges and resets
            # the counter for the next call (graph replays need no memset), as the decode GEMM's split-K does
            tl.debug_barrier()
            arrived = tl.atomic_add(COUNT + pair, 1, sem="acq_rel")
            if arrived == SPLITS - 1:
                out = _merge_splits(WS_ACC, WS_M, WS_L, pair * SPLITS, active, SPLITS, BLOCK_M, BLOCK_D)
                tl.store(out_at, out.to(OUT.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(COUNT + pair, 0)
    if direct:
        tl.store(out_at, (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(OUT.dtype.element_ty), mask=out_mask)


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
    smallest measured token count >= num_tokens (else the largest), its SPLITS scaled to keep its programs for this
    count's query tiles, else `CACHED_CONFIGS` scaled to the heads and SMs. Depends on shapes only, never on the
    start, so one captured graph serves every start. SPLITS stays within the keys the table can hold."""
    tuned = tuned_configs(num_heads, head_dim, dtype, device)
    if device.type != "cuda":
        block_m, block_n, num_warps, num_stages, splits = CPU_CACHED_CONFIG
    elif tuned:
        measured, (block_m, block_n, num_warps, num_stages, splits) = next(
            ((t, cfg) for t, cfg in tuned if num_tokens <= t), tuned[-1])
        # the measured grid's programs for this many query tiles (96 tokens' 2 tiles x 2 splits: 64 tokens, 4 splits)
        splits = cdiv(splits * cdiv(measured, block_m), cdiv(num_tokens, block_m))
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
                                    config: tuple[int, int, int, int, int] | None = None,
                                    min_split_keys: int | None = None) -> torch.Tensor:
    """Triton version of `cached_prefill_attention_ref`: K/V read in place from the paged cache, `start` from a
    device tensor, so the grid depends only on the number of new tokens and the block table's capacity (graph-safe
    for any start). `config` (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLITS) overrides `cached_config`;
    `min_split_keys` (default SPLIT_MIN_KEYS on a GPU, 0 on the CPU, whose tests reach the merge with short
    contexts) the fewest keys a split walks."""
    num_tokens, num_q_heads, head_dim = q.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        return cached_prefill_attention_ref(q, k_cache, v_cache, block_table, start, scale, valid_len)
    block_size = k_cache.shape[1]
    if config is None:
        config = cached_config(num_tokens, block_table.shape[0] * block_size, num_q_heads, q.device,
                               head_dim, q.dtype)
    _check_config(config)
    if min_split_keys is None:
        min_split_keys = SPLIT_MIN_KEYS if q.is_cuda else 0
    if min_split_keys < 0:
        raise ValueError(f"min_split_keys={min_split_keys}: must be >= 0")
    block_m, block_n, num_warps, num_stages, splits = config
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if not isinstance(start, torch.Tensor):
        start = torch.full((1,), start, dtype=torch.int32, device=q.device)
    tiles, block_d = cdiv(num_tokens, block_m), next_pow2(max(head_dim, 16))
    ws_acc, ws_m, ws_l, count = _workspace(q, tiles, splits, block_m, block_d)
    jit_helpers(globals(), ("_pages", "_in_block", "_key_block", "_attend_keys", "_merge_splits"))
    launch(_cached_prefill_kernel, (tiles, num_q_heads, splits),
           q, k_cache, v_cache, block_table, start, valid_len if valid_len is not None else start, out, ws_acc, ws_m,
           ws_l, count, scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
           k_cache.stride(2), out.stride(0), out.stride(1), num_tokens, head_dim,
           GROUP=num_q_heads // k_cache.shape[2], HAS_VALID_LEN=valid_len is not None, BLOCK_SIZE=block_size,
           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SPLITS=splits, MIN_KEYS=max(1, min_split_keys),
           EVEN_D=head_dim == block_d, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
           num_warps=num_warps, num_stages=num_stages)
    return out
