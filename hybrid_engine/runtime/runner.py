"""ModelRunner: prefill and decode steps over static, batch-shaped device buffers.

Every running sequence owns one row of the per-row buffers (its last token, position, sampling counter, sampling
parameters, block table). A prefill installs a sequence in its row; a decode step runs rows 0..n-1 (a graph: the
bucket's rows, the rest padding) and advances each row's token, position and counter on the device, so the host can
enqueue the next step before it reads this one. Everything the host sends goes through pinned staging buffers
(a small ring, each reused only after its copy ran) in one H2D copy per step. Nothing here allocates device
memory after construction except the JIT step's activations.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from . import cuda_driver
from .kv_cache import PagedKVCache
from .token_reader import wait_event
from ..models.llama import AttentionMetadata, LlamaModel
from ..models.llama_jit import jit_prefill
from ..sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_FIELDS = (  # name, shape (L = max_model_len, B = rows, M = max blocks per sequence, U = B), dtype
    # staged by a decode step: block-table entries to add ((flat index into block_tables, block id); padding
    # entries point into the spare row B)
    ("upd_index", "U", torch.int64), ("upd_block", "U", torch.int32),
    # staged by a prefill, in this order (input_ids last: a prefill copies only its tokens' ids)
    ("valid_len", "1", torch.int32), ("prefill_row", "1", torch.int64), ("prefill_offset", "1", torch.int64),
    ("p_temperature", "1", torch.float32), ("p_top_k", "1", torch.int32), ("p_top_p", "1", torch.float32),
    ("p_seed", "1", torch.int64), ("ctx_start", "1", torch.int32), ("prefill_table", "1M", torch.int32),
    ("input_ids", "L", torch.int64),
    # per row, written on the device only
    ("block_tables", "B1M", torch.int32), ("temperature", "B", torch.float32), ("top_k", "B", torch.int32),
    ("top_p", "B", torch.float32), ("seeds", "B", torch.int64), ("offsets", "B", torch.int64),
    ("tokens", "B", torch.int64), ("dec_positions", "B", torch.int64),
    ("positions", "L", torch.int64), ("ctx_positions", "L", torch.int64), ("slot_mapping", "L", torch.int64),
    ("dec_slots", "B", torch.int64),
    ("seq_lens", "B", torch.int32),
)
_STAGED = {name for name, _, _ in _FIELDS[:12]}  # the fields a step stages (upd_index .. input_ids)
_ROW_FIELDS = ("temperature", "top_k", "top_p", "seeds", "offsets", "tokens", "dec_positions")
_PARAM_FIELDS = (("temperature", "p_temperature"), ("top_k", "p_top_k"), ("top_p", "p_top_p"), ("seeds", "p_seed"))


@dataclass(slots=True)
class StepBuffers:
    """Static step inputs/outputs, all views into one byte buffer, so that what a step stages is one contiguous
    range: [upd_index, valid_len) for a decode step's block-table additions, [valid_len, input_ids + n) for a
    prefill of n tokens."""

    storage: torch.Tensor  # uint8, every field below is a view into it
    upd_index: torch.Tensor  # [U] int64
    upd_block: torch.Tensor  # [U] int32
    valid_len: torch.Tensor  # [1] int32: real prompt length
    prefill_row: torch.Tensor  # [1] int64: the row the prefill installs its sequence in
    prefill_offset: torch.Tensor  # [1] int64: sampling counter of its first token
    p_temperature: torch.Tensor  # [1] fp32
    p_top_k: torch.Tensor  # [1] int32
    p_top_p: torch.Tensor  # [1] fp32
    p_seed: torch.Tensor  # [1] int64
    ctx_start: torch.Tensor  # [1] int32: positions already in the cache before the staged tokens (prefix / chunk)
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
    ctx_positions: torch.Tensor  # [L] int64: ctx_start + 0..n-1 of a prefill after cached positions (in the step)
    slot_mapping: torch.Tensor  # [L] int64: prefill tokens' cache slots, -1 = padding (computed in the step)
    dec_slots: torch.Tensor  # [B] int64: decode tokens' cache slots (computed in the step)
    seq_lens: torch.Tensor  # [B] int32: decode attention lengths (computed in the step)
    offsets_of: dict[str, int]  # byte offset of each field in storage

    def prefill_range(self, num_tokens: int) -> tuple[int, int]:
        return self.offsets_of["valid_len"], self.offsets_of["input_ids"] + num_tokens * 8

    def decode_range(self) -> tuple[int, int]:
        return self.offsets_of["upd_index"], self.offsets_of["valid_len"]

    @classmethod
    def allocate(cls, max_len: int, batch: int, max_blocks: int, device: torch.device, pin: bool) -> "StepBuffers":
        dims = {"L": (max_len,), "1": (1,), "B": (batch,), "U": (batch,), "1M": (1, max_blocks),
                "B1M": (batch + 1, max_blocks)}
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


class _Staging:
    """A ring of pinned host StepBuffers; a slot is rewritten only after the copy that last read it has run (its
    event), so the host never changes bytes a pending copy is about to read."""

    def __init__(self, make: Any, device: torch.device, depth: int = 4) -> None:
        self.slots = [make() for _ in range(depth)]
        self.np = [{name: getattr(s, name).numpy() for name, _, _ in _FIELDS if name in _STAGED} for s in self.slots]
        self.events = [torch.cuda.Event() if device.type == "cuda" else None for _ in range(depth)]
        self.used = [False] * depth
        self.next = 0
        self.watch: Any = None  # see token_reader.wait_event
    def take(self) -> tuple[StepBuffers, dict[str, Any], int]:
        i = self.next
        self.next = (i + 1) % len(self.slots)
        if self.used[i] and self.events[i] is not None:
            wait_event(self.events[i], self.watch)
        return self.slots[i], self.np[i], i



class ModelRunner:
    """Runs the model's steps on the JIT path; `graphs` (if set) replays captured steps instead."""

    def __init__(self, model: LlamaModel, kv: PagedKVCache, ops: Any, max_model_len: int, max_num_seqs: int,
                 device: torch.device) -> None:
        self.model, self.kv, self.ops, self.device = model, kv, ops, device
        model.ops = ops
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.block_size = kv.block_size
        self.max_blocks = kv.max_blocks_per_seq
        self.buf = self._device_buffers()
        self._spare = max_num_seqs * self.max_blocks  # flat block-table index in the spare row
        pin = device.type == "cuda"
        self.staging = _Staging(lambda: StepBuffers.allocate(max_model_len, max_num_seqs, self.max_blocks,
                                                             torch.device("cpu"), pin=pin), device)
        self._updates_on_device = False  # the device's update list holds entries a later step must not re-apply
        self.graphs: Any = None  # graphs.GraphRunner, attached by the engine when capture != "off"

    def _device_buffers(self) -> StepBuffers:
        b = StepBuffers.allocate(self.max_model_len, self.max_num_seqs, self.max_blocks, self.device, pin=False)
        b.positions.copy_(torch.arange(self.max_model_len))
        b.block_tables.fill_(self.kv.scratch_block)
        b.upd_index.fill_(self.max_num_seqs * self.max_blocks)
        return b

    # ---- host -> device staging ----
    def _copy(self, slot: StepBuffers, index: int, lo: int, hi: int) -> None:
        dst, src = self.buf.storage[lo:hi], slot.storage[lo:hi]
        if self.device.type == "cuda" and cuda_driver.available():  # stream-ordered before the step
            cuda_driver.copy_to_device(dst, src)
        else:
            dst.copy_(src, non_blocking=True)
        event = self.staging.events[index]
        if event is not None and cuda_driver.available():
            cuda_driver.record(event, dst.device.index)
        elif event is not None:
            event.record()
        self.staging.used[index] = True

    def stage_prefill(self, ids: list[int], row: int, table: list[int], params: SamplingParams, seed: int,
                      offset: int, pad_to: int, start: int = 0) -> None:
        """A sequence's prefill inputs: token ids (padding ids 0) at positions start.., its row, block table,
        sampling parameters and sampling counter. The step computes the cache slots on the device (padding -1)."""
        slot, h, index = self.staging.take()
        n = len(ids)
        h["input_ids"][:n] = ids
        h["input_ids"][n:pad_to] = 0
        h["valid_len"][0], h["prefill_row"][0], h["prefill_offset"][0] = n, row, offset
        h["prefill_table"][0, :len(table)] = table
        h["prefill_table"][0, len(table):] = self.kv.scratch_block
        h["p_temperature"][0], h["p_top_k"][0], h["p_top_p"][0] = params.temperature, params.top_k, params.top_p
        h["p_seed"][0], h["ctx_start"][0] = seed, start
        self._copy(slot, index, *slot.prefill_range(pad_to))

    def stage_decode(self, updates: list[tuple[int, int, int]]) -> None:
        """Block-table entries (row, index, block) the next decode step adds before it runs; the list is cleared
        on the device after a step that had some, so that no entry is applied twice."""
        if not updates and not self._updates_on_device:
            return
        if len(updates) > self.max_num_seqs:
            raise RuntimeError(f"{len(updates)} block-table updates in one step; at most {self.max_num_seqs}")
        slot, h, index = self.staging.take()
        for i, (row, j, block) in enumerate(updates):
            h["upd_index"][i], h["upd_block"][i] = row * self.max_blocks + j, block
        h["upd_index"][len(updates):] = self._spare
        self._copy(slot, index, *slot.decode_range())
        self._updates_on_device = bool(updates)

    # ---- device-side row maintenance (rows stay dense) ----
    def move_row(self, src: int, dst: int) -> None:
        b = self.buf
        b.block_tables[dst].copy_(b.block_tables[src])
        for name in _ROW_FIELDS:
            t = getattr(b, name)
            t[dst].copy_(t[src])

    def reset_rows(self, start: int, end: int) -> None:
        """Rows no sequence holds: every KV write of theirs goes to the scratch block, at position 0."""
        self.buf.block_tables[start:end].fill_(self.kv.scratch_block)
        self.buf.dec_positions[start:end].zero_()

    # ---- the steps (eager, or captured by graphs.py) ----
    def scratch_buffers(self) -> StepBuffers:
        """Buffers for warm-up runs: same shapes as `buf`; every block-table entry is the scratch block, so the KV
        writes of a warm-up step land there and nowhere else."""
        b = self._device_buffers()
        b.valid_len.fill_(1)
        b.prefill_table.fill_(self.kv.scratch_block)
        return b

    @torch.inference_mode()
    def warm_up(self, lengths: tuple[int, ...] = (1, 15, 16, 17, 100), decode_rows: tuple[int, ...] = (1,),
                context_lengths: tuple[int, ...] = (1, 15, 16, 17, 100, 112, 200, 208)) -> None:
        """Run every kernel variant the JIT path will launch once, on scratch buffers (Triton specialises integer
        arguments equal to 1 or divisible by 16; prefill attention's tiles change with the length), so the first
        request compiles and loads nothing; and every projection and attention variant that graph captures use
        (inside gemm.graph_plan, whose choices differ), so that no capture compiles."""
        from ..kernels import gemm, prefill_attention

        scratch = self.scratch_buffers()
        attention = prefill_attention.warm_up_lengths()
        for plan, todo in ((nullcontext(), set(lengths) | attention),
                           (gemm.graph_plan(), gemm.warm_up_lengths() | attention)):
            with plan:
                for n in sorted(n for n in todo if n <= self.max_model_len):
                    scratch.valid_len.fill_(n)
                    self.prefill_step(n, scratch)
                for n in (n for n in context_lengths if n <= self.max_model_len):  # prefix-cache hits
                    scratch.valid_len.fill_(n)
                    self.prefill_step(n, scratch, context=True)
                for rows in decode_rows:
                    self.decode_step(rows, scratch)

    def prefill_step(self, length: int, buf: StepBuffers | None = None, context: bool = False,
                     final: bool = True) -> None:
        """Prefill `length` staged tokens (exact or a padded bucket) of one sequence. context=True: they sit at
        positions ctx_start.. after ctx_start cached ones (a prefix-cache hit or a later prompt chunk), read from the
        device buffer, so one graph serves every start. The final (or only) part samples the first token and
        installs the sequence in its row (block table, sampling parameters, token, position, counter)."""
        b = buf or self.buf
        table, start = b.prefill_table, b.ctx_start if context else None
        slots = self.ops.prefill_slots(table[0], b.valid_len, self.block_size, b.slot_mapping[:length],
                                       0 if start is None else start)
        pos, total = b.positions[:length], b.valid_len
        if start is not None:
            pos = torch.add(pos, start, out=b.ctx_positions[:length]).clamp_(max=self.max_model_len - 1)  # padding
            total = b.valid_len + start
        meta = AttentionMetadata(is_prefill=True, slot_mapping=slots, valid_len=b.valid_len, block_tables=table,
                                 seq_lens=total, last_index=(b.valid_len - 1).long() if final else None,
                                 context_start=start)
        ids = b.input_ids[:length]
        last = jit_prefill(self.model, ids, pos, meta) if final else None  # the JIT path's leaner loop
        if last is None:
            last = self.model(ids, pos, meta)  # final: [1, H], the last real token's hidden state
        if not final:
            return
        tok = self.ops.sample(self.model.compute_logits(last), b.p_temperature, b.p_top_k, b.p_top_p, b.p_seed,
                              b.prefill_offset)
        row = b.prefill_row
        b.block_tables.index_copy_(0, row, table)
        for name, staged in _PARAM_FIELDS:
            getattr(b, name).index_copy_(0, row, getattr(b, staged))
        b.tokens.index_copy_(0, row, tok)
        b.offsets.index_copy_(0, row, b.prefill_offset + 1)
        b.dec_positions.index_copy_(0, row, total.long())

    def decode_step(self, rows: int, buf: StepBuffers | None = None) -> None:
        """One token for each of rows 0..rows-1: the staged block-table entries are added first; each row's KV
        slot and attention length are computed on the device from its position and block table."""
        b = buf or self.buf
        b.block_tables.view(-1).scatter_(0, b.upd_index, b.upd_block)
        pos = b.dec_positions[:rows]
        self.ops.decode_slots(b.block_tables[:rows], pos, self.block_size, b.dec_slots[:rows], b.seq_lens[:rows])
        meta = AttentionMetadata(is_prefill=False, slot_mapping=b.dec_slots[:rows], block_tables=b.block_tables[:rows],
                                 seq_lens=b.seq_lens[:rows])
        hidden = self.model(b.tokens[:rows], pos, meta)
        tok = self.ops.sample(self.model.compute_logits(hidden, decode=True), b.temperature[:rows], b.top_k[:rows],
                              b.top_p[:rows], b.seeds[:rows], b.offsets[:rows])
        b.tokens[:rows].copy_(tok)
        b.offsets[:rows].add_(1)
        pos.add_(1)

    # ---- dispatch: graph replay when ready, else the JIT path ----
    def prefill(self, ids: list[int], row: int, table: list[int], params: SamplingParams, seed: int,
                offset: int) -> str:
        """Stage and prefill one sequence into `row`; replays the bucket's graph when captured. Returns "graph" or
        "jit". Called with the serving stream current; a replay needs no inference mode."""
        n = len(ids)
        bucket = self.graphs.ready_prefill_bucket(n) if self.graphs is not None else None
        self.stage_prefill(ids, row, table, params, seed, offset, pad_to=bucket or n)
        if bucket is not None:
            self.graphs.replay_prefill(bucket)
            return "graph"
        with torch.inference_mode():
            self.prefill_step(n)
        return "jit"

    def prefill_from(self, ids: list[int], start: int, row: int, table: list[int], params: SamplingParams,
                     seed: int, offset: int) -> str:
        """The rest of a prompt whose first `start` positions are cached (a prefix-cache hit): `ids` at positions
        start.., attention over the cached KV and themselves; samples the first token and installs the sequence
        in `row`. Replays the graph of the bucket for len(ids) new tokens when captured (any start)."""
        n = len(ids)
        if start + n > self.max_model_len:
            raise ValueError(f"prefill ends at position {start + n} > max_model_len={self.max_model_len}")
        bucket = self.graphs.ready_context_bucket(n) if self.graphs is not None else None
        self.stage_prefill(ids, row, table, params, seed, offset, pad_to=bucket or n, start=start)
        if bucket is not None:
            self.graphs.replay_context_prefill(bucket)
            return "graph"
        with torch.inference_mode():
            self.prefill_step(n, context=True)
        return "jit"

    def prefill_chunk(self, ids: list[int], start: int, row: int, table: list[int], params: SamplingParams,
                      seed: int, offset: int, final: bool) -> str:
        """One chunk of a long prompt, `ids` at positions start.., after `start` positions already cached; the final
        chunk samples the first token and installs the sequence in `row`. Always the JIT path."""
        if start + len(ids) > self.max_model_len:
            raise ValueError(f"chunk ends at position {start + len(ids)} > max_model_len={self.max_model_len}")
        self.stage_prefill(ids, row, table, params, seed, offset, pad_to=len(ids), start=start)
        with torch.inference_mode():
            self.prefill_step(len(ids), context=start > 0, final=final)
        return "jit"

    def decode(self, rows: int, updates: list[tuple[int, int, int]]) -> str:
        """One decode step over rows 0..rows-1 (a graph pads up to its bucket; padding rows sit at position 0 of
        the scratch block)."""
        self.stage_decode(updates)
        bucket = self.graphs.ready_decode_bucket(rows) if self.graphs is not None else None
        if bucket is not None:
            if bucket > rows:
                self.buf.dec_positions[rows:bucket].zero_()
            self.graphs.replay_decode(bucket)
            return "graph"
        with torch.inference_mode():
            self.decode_step(rows)
        return "jit"
