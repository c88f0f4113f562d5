"""Packed token bitmasks: allocate, unpack, and apply them to logits rows.

Format (llguidance's and xgrammar's): int32 words, W = ceil(V / 32) per row; token t is allowed when bit t % 32 of
word t // 32 is set. 32x less to copy host→device than a bool mask. Logits wider than 32 * W (a model whose
embedding table is padded past the tokenizer's vocabulary) have their extra columns disallowed.

llguidance ships `llguidance.torch.apply_token_bitmask_inplace`, but it goes through `torch.compile` (an inductor
build with a C++ compiler on its first call on a CPU) and masks every row; `apply_token_bitmask` here is plain
tensor ops on the selected rows only, so unconstrained rows of a batch are not touched.
"""
from __future__ import annotations

from typing import Sequence

import torch


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row for a vocabulary of `vocab_size` tokens."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch_size: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """A [batch_size, W] CPU int32 bitmask with every token allowed (pinned for async H2D copies if asked)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return torch.full((batch_size, bitmask_width(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 → [R, vocab_size] bool (True = allowed); columns past 32 * W are False."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros(bitmask.shape[0], vocab_size - bits.shape[1], dtype=torch.bool, device=bitmask.device)
    return torch.cat([bits, pad], dim=1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: Sequence[int] | torch.Tensor | None = None) -> None:
    """Set disallowed logits to -inf in place, in the selected rows only.

    logits: [B, V] on any device; bitmask: [B, W] int32 (row r masks logits row r; on the host it is copied to
    logits' device, asynchronously when pinned); rows: the constrained rows (None = all)."""
    _check_shapes(logits, bitmask)
    index = _row_index(rows, logits.shape[0], logits.device)
    if index.numel() == 0:
        return
    masks = bitmask.to(logits.device, non_blocking=True).index_select(0, index)
    allowed = unpack_bitmask(masks, logits.shape[1])
    logits[index] = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: Sequence[int] | None = None) -> None:
    """Reference for `apply_token_bitmask`: one token at a time, bit by bit (slow; tests only)."""
    words = bitmask.shape[1]
    for r in range(logits.shape[0]) if rows is None else rows:
        for t in range(logits.shape[1]):
            word = int(bitmask[r, t // 32]) if t // 32 < words else 0
            if not (word >> (t % 32)) & 1:
                logits[r, t] = float("-inf")


def _check_shapes(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2 or bitmask.dim() != 2:
        raise ValueError(f"logits and bitmask must be 2-D, got {tuple(logits.shape)} and {tuple(bitmask.shape)}")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")
    if bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask rows ({bitmask.shape[0]}) must equal logits rows ({logits.shape[0]})")


def _row_index(rows: Sequence[int] | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if rows is None:
        return torch.arange(batch, device=device)
    index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
        raise ValueError(f"rows must lie in [0, {batch}), got {index.tolist()}")
    return index.to(device)
