"""The runner's static step buffers: every field a step reads or writes, as views into one byte buffer (device),
and the ring of pinned host copies (`Staging`) through which the host stages a step's inputs in one copy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_FIELDS = (  # name, shape (L = max_model_len, B = rows, M = max blocks per sequence, U = B, W = bitmask words), dtype
    # staged by a decode step: block-table entries to add ((flat index into block_tables, block id); padding
    # entries point into the spare row B)
    ("upd_index", "U", torch.int64), ("upd_block", "U", torch.int32),
    # staged by the sample half of a constrained decode step: per-row flag (1 = apply the row's bitmask), bitmasks
    ("masked", "B", torch.int32), ("bitmask", "BW", torch.int32),
    # staged by a prefill, in this order (p_bitmask first: copied only for a constrained prefill; input_ids last: a
    # prefill copies only its tokens' ids)
    ("p_bitmask", "1W", torch.int32),
    ("valid_len", "1", torch.int32), ("prefill_row", "1", torch.int64), ("prefill_offset", "1", torch.int64),
    ("p_temperature", "1", torch.float32), ("p_top_k", "1", torch.int32), ("p_top_p", "1", torch.float32),
    ("p_seed", "1", torch.int64), ("p_masked", "1", torch.int32), ("prefill_table", "1M", torch.int32),
    ("input_ids", "L", torch.int64),
    # per row, written on the device only
    ("block_tables", "B1M", torch.int32), ("temperature", "B", torch.float32), ("top_k", "B", torch.int32),
    ("top_p", "B", torch.float32), ("seeds", "B", torch.int64), ("offsets", "B", torch.int64),
    ("tokens", "B", torch.int64), ("dec_positions", "B", torch.int64),
    ("positions", "L", torch.int64), ("slot_mapping", "L", torch.int64), ("dec_slots", "B", torch.int64),
    ("seq_lens", "B", torch.int32),
)
_NAMES = [name for name, _, _ in _FIELDS]
_STAGED = set(_NAMES[:_NAMES.index("input_ids") + 1])  # the fields a step stages (upd_index .. input_ids)
ROW_FIELDS = ("temperature", "top_k", "top_p", "seeds", "offsets", "tokens", "dec_positions")
PARAM_FIELDS = (("temperature", "p_temperature"), ("top_k", "p_top_k"), ("top_p", "p_top_p"), ("seeds", "p_seed"))


@dataclass(slots=True)
class StepBuffers:
    """Static step inputs/outputs, all views into one byte buffer, so that what a step stages is one contiguous
    range: [upd_index, masked) for a decode step's block-table additions, [masked, bitmask + rows) for a sample
    half's flags and bitmasks, [valid_len, input_ids + n) for a prefill of n tokens ([p_bitmask, ...) when
    constrained)."""

    storage: torch.Tensor  # uint8, every field below is a view into it
    upd_index: torch.Tensor  # [U] int64
    upd_block: torch.Tensor  # [U] int32
    masked: torch.Tensor  # [B] int32: 1 = the row's sampling applies its bitmask
    bitmask: torch.Tensor  # [B, W] int32: packed allowed tokens per row (bit t % 32 of word t // 32)
    p_bitmask: torch.Tensor  # [1, W] int32: the prefill's first-token bitmask
    valid_len: torch.Tensor  # [1] int32: real prompt length
    prefill_row: torch.Tensor  # [1] int64: the row the prefill installs its sequence in
    prefill_offset: torch.Tensor  # [1] int64: sampling counter of its first token
    p_temperature: torch.Tensor  # [1] fp32
    p_top_k: torch.Tensor  # [1] int32
    p_top_p: torch.Tensor  # [1] fp32
    p_seed: torch.Tensor  # [1] int64
    p_masked: torch.Tensor  # [1] int32: 1 = apply p_bitmask to the first token
    prefill_table: torch.Tensor  # [1, M] int32
    input_ids: torch.Tensor  # [L] int64
    block_tables: torch.Tensor  # [B + 1, M] int32 (row B: target of padding updates)
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int32
    top_p: torch.Tensor  # [B] fp32
    seeds: torch.Tensor  # [B] int64
    offsets: torch.Tensor  # [B] int64: sampling counter, advanced per step
    tokens: torch.Tensor  # [B] int64: last sampled token = next decode input
    dec_positions: torch.Tensor  # [B] int64: position of `tokens`
    positions: torch.Tensor  # [L] int64: 0..L-1, set once
    slot_mapping: torch.Tensor  # [L] int64: prefill tokens' cache slots, -1 = padding (computed in the step)
    dec_slots: torch.Tensor  # [B] int64: decode tokens' cache slots (computed in the step)
    seq_lens: torch.Tensor  # [B] int32: decode attention lengths (computed in the step)
    offsets_of: dict[str, int]  # byte offset of each field in storage

    def prefill_range(self, num_tokens: int, masked: bool = False) -> tuple[int, int]:
        return self.offsets_of["p_bitmask" if masked else "valid_len"], self.offsets_of["input_ids"] + num_tokens * 8

    def decode_range(self) -> tuple[int, int]:
        return self.offsets_of["upd_index"], self.offsets_of["masked"]

    def sample_range(self, mask_rows: int) -> tuple[int, int]:
        """Every row's flag and the bitmasks of rows 0..mask_rows-1."""
        return self.offsets_of["masked"], self.offsets_of["bitmask"] + mask_rows * self.bitmask.shape[1] * 4

    @classmethod
    def allocate(cls, max_len: int, batch: int, max_blocks: int, words: int, device: torch.device,
                 pin: bool) -> "StepBuffers":
        dims = {"L": (max_len,), "1": (1,), "B": (batch,), "U": (batch,), "1M": (1, max_blocks),
                "B1M": (batch + 1, max_blocks), "BW": (batch, words), "1W": (1, words)}
        layout, offset = [], 0
        for name, dim, dtype in _FIELDS:
            numel = 1
            for d in dims[dim]:
                numel *= d
            layout.append((name, dims[dim], dtype, offset, numel * dtype.itemsize))
            offset += -(-numel * dtype.itemsize // 64) * 64  # 64-byte aligned fields
        storage = torch.zeros(offset, dtype=torch.uint8, device=device)
        if pin:
            storage = storage.pin_memory()
        views = {name: storage[off:off + size].view(dtype).view(shape) for name, shape, dtype, off, size in layout}
        return cls(storage=storage, **views, offsets_of={name: off for name, _, _, off, _ in layout})


class Staging:
    """A ring of pinned host StepBuffers; a slot is rewritten only after the copy that last read it has run (its
    event), so the host never changes bytes a pending copy is about to read."""

    def __init__(self, make: Any, device: torch.device, depth: int = 4) -> None:
        self.slots = [make() for _ in range(depth)]
        self.np = [{name: getattr(s, name).numpy() for name, _, _ in _FIELDS if name in _STAGED} for s in self.slots]
        self.events = [torch.cuda.Event() if device.type == "cuda" else None for _ in range(depth)]
        self.used = [False] * depth
        self.next = 0

    def take(self) -> tuple[StepBuffers, dict[str, Any], int]:
        i = self.next
        self.next = (i + 1) % len(self.slots)
        if self.used[i] and self.events[i] is not None:
            self.events[i].synchronize()
        return self.slots[i], self.np[i], i


@dataclass(slots=True)
class MaskSlot:
    """Host side of one sample half's bitmasks: `bitmask` [B, W] int32 (pinned on a GPU) and `flags` [B] (numpy
    view), inside staging slot `slot` (ring index `index`)."""

    bitmask: torch.Tensor
    flags: Any
    slot: StepBuffers
    index: int
