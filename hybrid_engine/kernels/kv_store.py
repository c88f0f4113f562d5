"""Write the new tokens' k/v into the paged KV cache at their flat slots (slot -1 = padding, write nothing)."""
from __future__ import annotations

import torch

from ._triton import cdiv, launch, next_pow2, pdl_enter

tl = None  # triton.language, bound on first launch (see _triton.py)


def _paged_offsets(BT, pos, mask, kv_head, stride_cb, stride_co, stride_ch, BLOCK_SIZE: tl.constexpr):
    """Offsets (elements, int64) of positions `pos` of one kv head in a paged cache, through the block table row BT
    (an attention kernel's device helper: they import it and bind it with `jit_helpers`)."""
    block = tl.load(BT + pos // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return block * stride_cb + (pos % BLOCK_SIZE).to(tl.int64) * stride_co + kv_head * stride_ch


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot = block * block_size + offset."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def _store_kv_kernel(K, V, K_CACHE, V_CACHE, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_co, stride_ch, num_kv_heads, head_dim, BLOCK_SIZE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_enter(PDL)
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


# --- Slot mapping on the device --------------------------------------------------------------------------------------
# A prefill's tokens sit at positions 0..n-1 of one sequence (row 0 of the block tables); a decode token b at
# dec_positions[b] of sequence b. Computing their flat slots inside the step (one launch, part of every graph) keeps the
# host's staging to the token ids and the block table, and the H2D copy to a few KB.

def prefill_slots_ref(block_table: torch.Tensor, valid_len: torch.Tensor, block_size: int,
                      out: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
    """Token t of the step sits at position p = start + t: out[t] = block_table[p // block_size] * block_size +
    p % block_size for t < valid_len[0], else -1 (padding). block_table: [max_blocks] int32, valid_len: [1] int32,
    out: [n] int64 (n = the bucket or the exact length); start (an int or a [1] int32 device tensor) > 0 after
    cached positions (a prefix-cache hit, a later prompt chunk)."""
    t = torch.arange(out.shape[0], device=out.device)
    pos = t + (start.long() if isinstance(start, torch.Tensor) else start)
    blocks = block_table.long()[(pos // block_size).clamp(max=block_table.shape[0] - 1)]
    out.copy_(torch.where(t < valid_len.long(), blocks * block_size + pos % block_size, -1))
    return out


Updates = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (flat block table, flat indices [U] int64, blocks [U])


def _apply_updates(updates: Updates | None) -> None:
    if updates is not None:
        flat, index, block = updates
        flat.scatter_(0, index, block)


def decode_slots_ref(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int, slots: torch.Tensor,
                     seq_lens: torch.Tensor, updates: Updates | None = None) -> None:
    """Sequence b's token at positions[b]: slots[b] (int64) its flat cache slot, seq_lens[b] (int32) = positions[b]
    + 1, the tokens attention reads. block_tables: [B, max_blocks] int32, positions: [B] int64. updates=(flat,
    index, block): first flat[index[u]] = block[u] (the step's new block-table entries; flat is the whole table,
    block_tables a view of its first rows)."""
    _apply_updates(updates)
    blocks = block_tables.long().gather(1, (positions // block_size).unsqueeze(1)).squeeze(1)
    slots.copy_(blocks * block_size + positions % block_size)
    seq_lens.copy_(positions + 1)


def _slots_kernel(BT, stride_bt, POS, VALID, SLOTS, SEQ_LENS, n, start, START, FLAT, UPD_INDEX, UPD_BLOCK, n_upd,
                  BLOCK_SIZE: tl.constexpr, DECODE: tl.constexpr, START_PTR: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_U: tl.constexpr = 0, PDL: tl.constexpr = 0):
    """Cache slots of a prefill's or a decode step's tokens. BLOCK_U > 0 (decode, one program): the step's n_upd
    block-table entries are written first (FLAT[UPD_INDEX[u]] = UPD_BLOCK[u]), and the barrier makes them visible
    to every thread of the program before any reads the table."""
    pdl_enter(PDL)
    if BLOCK_U > 0:
        u = tl.arange(0, BLOCK_U)
        upd = u < n_upd
        at = tl.load(UPD_INDEX + u, mask=upd, other=0)
        tl.store(FLAT + at, tl.load(UPD_BLOCK + u, mask=upd, other=0), mask=upd)
        tl.debug_barrier()
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = t < n
    if DECODE:
        pos = tl.load(POS + t, mask=live, other=0)
        real = live
        row = t.to(tl.int64)
    else:
        if START_PTR:
            start = tl.load(START)
        pos = t.to(tl.int64) + start
        real = live & (t < tl.load(VALID))
        row = t.to(tl.int64) * 0
    block = tl.load(BT + row * stride_bt + pos // BLOCK_SIZE, mask=real, other=0).to(tl.int64)
    tl.store(SLOTS + t, tl.where(real, block * BLOCK_SIZE + pos % BLOCK_SIZE, -1), mask=live)
    if DECODE:
        tl.store(SEQ_LENS + t, (pos + 1).to(tl.int32), mask=live)


def _slots_block(n: int) -> int:
    return min(1024, next_pow2(max(n, 16)))


def prefill_slots_triton(block_table: torch.Tensor, valid_len: torch.Tensor, block_size: int,
                         out: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
    """Triton version of `prefill_slots_ref` (one launch, no host read of valid_len or of a tensor start)."""
    n = out.shape[0]
    if n > 0:
        block = _slots_block(n)
        ptr = isinstance(start, torch.Tensor)
        launch(_slots_kernel, (cdiv(n, block),), block_table, 0, out, valid_len, out, out, n, 0 if ptr else start,
               start if ptr else valid_len, out, out, out, 0, BLOCK_SIZE=block_size, DECODE=False, START_PTR=ptr,
               BLOCK=block, num_warps=4 if block >= 512 else 1)
    return out


def decode_slots_triton(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int, slots: torch.Tensor,
                        seq_lens: torch.Tensor, updates: Updates | None = None) -> None:
    """Triton version of `decode_slots_ref` (one launch, the updates included where one program covers the rows)."""
    n = positions.shape[0]
    block = _slots_block(n)
    upd = updates is not None and cdiv(n, block) == 1 and n > 0
    if not upd:
        _apply_updates(updates)
    if n > 0:
        flat, index, new = updates if upd else (slots, slots, slots)
        launch(_slots_kernel, (cdiv(n, block),), block_tables, block_tables.stride(0), positions, slots, slots,
               seq_lens, n, 0, positions, flat, index, new, index.numel() if upd else 0, BLOCK_SIZE=block_size,
               DECODE=True, START_PTR=False, BLOCK=block, BLOCK_U=next_pow2(index.numel()) if upd else 0,
               num_warps=1)
