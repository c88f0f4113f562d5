"""Paged decode attention: one query token per sequence over its cached tokens (flash-decoding, split-K, the splits
merged inside the same launch)."""
from __future__ import annotations

import functools
import os

import torch

from ._triton import cdiv, env_choice, jit_helpers, launch, next_pow2, pdl_enter
from ._workspace import sm_count, split_buffers
from .kv_store import _paged_offsets  # noqa: F401 (called by _decode_split_kernel)

tl = None  # triton.language, bound on first launch (see _triton.py)

# Keys up to which a sequence runs as one split on a GPU. Splitting costs the partials' round trip and the merge (an
# atomic and a second dependent load chain, ~1.5-2.5 us on the H200); each key block of 64 one program walks costs
# ~0.6-1 us. Measured with benchmarks/decode_attn_sweep.py (HYBRID_ENGINE_DECODE_SINGLE_SPLIT overrides it): one
# split is faster up to two blocks (128 keys), splits of one block from three on.
SINGLE_SPLIT_KEYS = 128
# Splits a sequence's keys are cut into at most. The merge walks MERGE_S splits per load, so many splits cost more
# than longer ones: at 2,000 keys, Llama-3-8B's heads took 14.5 us as 32 splits of 64 keys and 12.7 us as 16 of 128
# (Qwen2-7B 13.4 / 11.5; the sweep in results/nvidia-h200-2026-11-30-decode-attention-min-split.json). With 24, up to
# ~1,500 keys split exactly as with 64 (one 64-key block each) and the grid launches fewer idle programs.
MAX_SPLITS = 24
# Head sizes up to which a program loads its next key block before attending over this one. H200 sweep
# (results/nvidia-h200-2026-11-30-decode-attention-prefetch.json): at head size 64 (Llama-3.2-1B) faster in every
# case timed, e.g. 80 keys in one program (two blocks) 3.97 vs 4.23 us, 200 keys in one program (four blocks) 6.24
# vs 6.66, 2,000 keys in 32 splits 8.99 vs 9.20; at 128 the two key/value tiles in flight cost registers (LLaMA-2-7B
# at 2,000 keys in 17 splits of two blocks: 20.0 vs 15.6 us).
PREFETCH_MAX_HEAD_DIM = 64
MERGE_ELEMENTS = 4096  # fp32 partials one merge load holds (32 registers a thread at 4 warps)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D]; caches [N, block_size, Hkv, D]; block_tables [B, max_blocks]; seq_lens [B] -> [B, Hq, D].

    Gathers every table entry (no host read of seq_lens) and masks positions >= seq_lens[b]; math in fp32.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if q.device.type == "cpu" and batch > 1:  # per sequence: a row's result must not depend on the others' lengths
        return torch.cat([decode_attention_ref(q[i:i + 1], k_cache, v_cache, block_tables[i:i + 1],
                                               seq_lens[i:i + 1], scale) for i in range(batch)])
    tables = block_tables.long().clamp(min=0)
    if q.device.type == "cpu":  # a host read is free here: gather only the blocks in use, not the whole table
        tables = tables[:, : (int(seq_lens.max()) + block_size - 1) // block_size]
    k = k_cache[tables].reshape(batch, -1, num_kv_heads, head_dim).float()
    v = v_cache[tables].reshape(batch, -1, num_kv_heads, head_dim).float()
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    masked = pos[None, :] >= seq_lens.long()[:, None]
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def _decode_split_kernel(Q, K_CACHE, V_CACHE, BLOCK_TABLES, SEQ_LENS, PART_OUT, PART_LSE, COUNT, OUT, scale,
                         stride_qb, stride_qh, stride_cb, stride_co, stride_ch, stride_bt, stride_ob, stride_oh,
                         num_q_heads, num_kv_heads, head_dim, single_split, BLOCK_SIZE: tl.constexpr,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_G: tl.constexpr,
                         MERGE_S: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr = False,
                         PDL: tl.constexpr = 0):
    """One (sequence, kv head, split): the GROUP query heads of that kv head over one slice of the KV length (a
    sequence of at most `single_split` keys is one slice: no partials, no merge). With one split holding keys its
    program stores the output; with more, each stores its partials (normalised output and log-sum-exp) and the last
    to arrive merges them for the GROUP heads at once and resets the counter (graph replays need no memset).
    PREFETCH: a program walking several key blocks loads block i + 1 before attending over block i (the same
    arithmetic in the same order: only when the loads are issued changes)."""
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    split_len = tl.where(seq_len <= single_split, seq_len, (seq_len + NUM_SPLITS - 1) // NUM_SPLITS)  # graph-safe
    split_len = (split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    active = (seq_len + split_len - 1) // tl.maximum(split_len, 1)  # splits holding keys
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    row_mask = (g < GROUP)[:, None] & (d < head_dim)[None, :]
    if start < end:
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=row_mask, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        bt = BLOCK_TABLES + b * stride_bt
        if PREFETCH:  # the next block's keys and values are loaded before this block's are used
            k, v, tok_mask = _kv_block(K_CACHE, V_CACHE, bt, start, end, kv_head, stride_cb, stride_co, stride_ch,
                                       head_dim, BLOCK_SIZE, BLOCK_N, BLOCK_D)
            for tok0 in range(start, end, BLOCK_N):
                k_next, v_next, mask_next = _kv_block(K_CACHE, V_CACHE, bt, tok0 + BLOCK_N, end, kv_head, stride_cb,
                                                      stride_co, stride_ch, head_dim, BLOCK_SIZE, BLOCK_N, BLOCK_D)
                m_i, l_i, acc = _attend(q, k, v, tok_mask, m_i, l_i, acc, scale, DOT_PRECISION)
                k, v, tok_mask = k_next, v_next, mask_next
        else:
            for tok0 in range(start, end, BLOCK_N):
                k, v, tok_mask = _kv_block(K_CACHE, V_CACHE, bt, tok0, end, kv_head, stride_cb, stride_co, stride_ch,
                                           head_dim, BLOCK_SIZE, BLOCK_N, BLOCK_D)
                m_i, l_i, acc = _attend(q, k, v, tok_mask, m_i, l_i, acc, scale, DOT_PRECISION)
        out = acc / l_i[:, None]
        if active <= 1:  # the only split with keys (always so with NUM_SPLITS == 1)
            tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     out.to(OUT.dtype.element_ty), mask=row_mask)
        else:
            part = (b * num_q_heads + heads) * NUM_SPLITS + split
            tl.store(PART_OUT + part[:, None] * BLOCK_D + d[None, :], out, mask=row_mask)
            tl.store(PART_LSE + part, m_i + tl.log(l_i), mask=g < GROUP)
            # every split's partials are written before its arrival is counted; the last of the `active` splits
            # merges (in split order, whichever arrives last) and resets the counter
            tl.debug_barrier()
            pair = b * num_kv_heads + kv_head
            arrived = tl.atomic_add(COUNT + pair, 1, sem="acq_rel")
            if arrived == active - 1:
                _merge_heads(PART_OUT, PART_LSE, OUT, b, kv_head, active, stride_ob, stride_oh, num_q_heads,
                             head_dim, GROUP, NUM_SPLITS, BLOCK_S, MERGE_G, MERGE_S, BLOCK_D)
                tl.atomic_xchg(COUNT + pair, 0)


def _kv_block(K_CACHE, V_CACHE, BT, tok0, end, kv_head, stride_cb, stride_co, stride_ch, head_dim,
              BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keys and values [BLOCK_N, BLOCK_D] of positions tok0.. of one kv head (zeros past `end`), and the mask of
    positions below `end`."""
    d = tl.arange(0, BLOCK_D)
    tok = tok0 + tl.arange(0, BLOCK_N)
    tok_mask = tok < end
    off = _paged_offsets(BT, tok, tok_mask, kv_head, stride_cb, stride_co, stride_ch, BLOCK_SIZE)
    kv_mask = tok_mask[:, None] & (d < head_dim)[None, :]
    k = tl.load(K_CACHE + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_CACHE + off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # in flight with k
    return k, v, tok_mask


def _attend(q, k, v, tok_mask, m_i, l_i, acc, scale, DOT_PRECISION: tl.constexpr):
    """One key block of online softmax: the running max, sum and output of the query heads after it."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    scores = tl.where(tok_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def _merge_heads(PART_OUT, PART_LSE, OUT, b, kv_head, active, stride_ob, stride_oh, num_q_heads, head_dim,
                 GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_G: tl.constexpr,
                 MERGE_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the `active` splits of the GROUP query heads of one (sequence, kv head) by their log-sum-exp into OUT:
    every head at once, MERGE_S splits per load (the weighted sum runs over the splits in that fixed order)."""
    g = tl.arange(0, MERGE_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    base = (b * num_q_heads + heads) * NUM_SPLITS  # [MERGE_G]: each head's first partial
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(PART_LSE + base[:, None] + s[None, :], mask=g_ok[:, None] & (s < active)[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    top = tl.max(lse, axis=1)
    acc = tl.zeros([MERGE_G, BLOCK_D], tl.float32)
    total = tl.zeros([MERGE_G], tl.float32)
    for s0 in range(0, active, MERGE_S):
        sc = s0 + tl.arange(0, MERGE_S)
        gs = g_ok[:, None] & (sc < active)[None, :]
        part = base[:, None] + sc[None, :]
        weight = tl.where(gs, tl.exp(tl.load(PART_LSE + part, mask=gs, other=float("-inf"), cache_modifier=".cg")
                                     - top[:, None]), 0.0)
        parts = tl.load(PART_OUT + part[:, :, None] * BLOCK_D + d[None, None, :],
                        mask=gs[:, :, None] & (d < head_dim)[None, None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(parts * weight[:, :, None], axis=1)
        total += tl.sum(weight, axis=1)
    tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             (acc / total[:, None]).to(OUT.dtype.element_ty), mask=g_ok[:, None] & (d < head_dim)[None, :])


def decode_launch_config(num_kv_heads: int, max_blocks: int, block_size: int,
                         device: torch.device) -> tuple[int, int, int]:
    """(num_splits, block_n, single_split) from the cache's shapes only: a captured graph stays valid for every
    sequence length, and never from the batch size, so a sequence's attention sums in the same order whatever else
    is batched. A sequence of at most single_split keys runs as one split (`SINGLE_SPLIT_KEYS` on a GPU: no
    partials, no merge); the number of splits in use depends on the sequence's own length only."""
    on_gpu = device.type == "cuda"
    block_n = 64 if on_gpu else 16
    max_tokens = max_blocks * block_size
    target = cdiv(4 * sm_count(device), num_kv_heads) if on_gpu else 2
    return max(1, min(target, cdiv(max_tokens, block_n), MAX_SPLITS)), block_n, single_split_keys() if on_gpu else 0


@functools.lru_cache(maxsize=None)
def prefetch_blocks(head_dim: int) -> bool:
    """Whether a program loads its next key block before attending over this one: $HYBRID_ENGINE_DECODE_PREFETCH
    (0 / 1; read once per process), else for head sizes up to PREFETCH_MAX_HEAD_DIM."""
    on = env_choice("HYBRID_ENGINE_DECODE_PREFETCH", "auto", {"auto": None, "0": False, "1": True},
                    "0 (off) or 1 (on)")
    return head_dim <= PREFETCH_MAX_HEAD_DIM if on is None else on


@functools.lru_cache(maxsize=None)
def single_split_keys() -> int:
    """Keys up to which a sequence runs as one split on a GPU: $HYBRID_ENGINE_DECODE_SINGLE_SPLIT (read once per
    process), else SINGLE_SPLIT_KEYS."""
    env = os.environ.get("HYBRID_ENGINE_DECODE_SINGLE_SPLIT", "").strip()
    if not env:
        return SINGLE_SPLIT_KEYS
    if not env.isdigit():
        raise ValueError(f"HYBRID_ENGINE_DECODE_SINGLE_SPLIT={env!r} must be a number of keys >= 0")
    return int(env)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            num_splits: int | None = None, single_split: int | None = None,
                            prefetch: bool | None = None) -> torch.Tensor:
    """Triton flash-decoding over the paged cache: grid (batch, kv heads, splits), the splits merged by log-sum-exp
    in the last-arriving program of each (sequence, kv head) (one launch; the partials and arrival counters are the
    reused workspace of `split_buffers`, made outside any graph capture).

    The grid and the number of splits depend only on shapes; each split's slice of the KV length is computed on
    the device from seq_lens, so the kernel never reads a length on the host and is safe inside a CUDA graph.
    """
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or block_tables.stride(-1) != 1:
        return decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    group = num_q_heads // num_kv_heads
    splits, block_n, single = decode_launch_config(num_kv_heads, block_tables.shape[1], block_size, q.device)
    if num_splits is not None:
        splits = num_splits
    if single_split is not None:
        single = single_split
    if prefetch is None:
        prefetch = prefetch_blocks(head_dim)
    block_d = next_pow2(max(head_dim, 16))
    merge_g = next_pow2(group)
    merge_s = max(1, min(next_pow2(splits), MERGE_ELEMENTS // (merge_g * block_d)))
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if splits > 1:
        parts = batch * num_q_heads * splits
        ws, count = split_buffers(q.device, ("decode_attention", num_q_heads, num_kv_heads, splits, block_d),
                                  parts * (block_d + 1), batch * num_kv_heads)
        part_out, part_lse = ws[:parts * block_d], ws[parts * block_d:parts * (block_d + 1)]
    else:
        part_out = part_lse = count = out
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    jit_helpers(globals(), ("_paged_offsets", "_kv_block", "_attend", "_merge_heads"))
    launch(_decode_split_kernel, (batch, num_kv_heads, splits),
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse, count, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), num_q_heads, num_kv_heads, head_dim, max(0, int(single)),
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        NUM_SPLITS=splits, BLOCK_S=next_pow2(splits), MERGE_G=merge_g, MERGE_S=merge_s, DOT_PRECISION=precision,
        PREFETCH=bool(prefetch), num_warps=4, num_stages=2)
    return out
