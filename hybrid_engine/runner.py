"""ModelRunner: one prefill or decode step over static device buffers.

Every step reads its inputs from preallocated buffers and writes the next token, position and sampling offset back
into them on the device, so the same step functions run eagerly (the JIT path) or as CUDA-graph replays
(graphs.py) and the host never has to sit between two decode steps. Nothing here allocates device memory after
construction except the eager step's activations.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from . import cuda_driver
from .kv_cache import PagedKVCache
from .models.llama import AttentionMetadata, LlamaModel
from .models.llama_jit import jit_prefill
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


_FIELDS = (  # name, shape (in terms of L = max_model_len, B = batch, M = max blocks per sequence), dtype
    # staged from the host per request, in this order (input_ids last: a request copies only its first tokens' ids)
    ("valid_len", "1", torch.int32), ("block_tables", "BM", torch.int32), ("temperature", "B", torch.float32),
    ("top_k", "B", torch.int32), ("top_p", "B", torch.float32), ("seeds", "B", torch.int64),
    ("offsets", "B", torch.int64), ("tokens", "B", torch.int64), ("dec_positions", "B", torch.int64),
    ("input_ids", "L", torch.int64),
    # written on the device only
    ("positions", "L", torch.int64), ("slot_mapping", "L", torch.int64), ("dec_slots", "B", torch.int64),
    ("seq_lens", "B", torch.int32),
)
_STAGED = "input_ids"  # the last staged field


@dataclass(slots=True)
class StepBuffers:
    """Static inputs/outputs, all views into one byte buffer so a request is staged with a single small H2D copy of
    its leading bytes (`staged_bytes`). Prefill fields hold up to max_model_len tokens; decode fields one row per
    sequence.
    """

    storage: torch.Tensor  # uint8, every field below is a view into it
    valid_len: torch.Tensor  # [1] int32: real prompt length
    block_tables: torch.Tensor  # [B, M] int32
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int32
    top_p: torch.Tensor  # [B] fp32
    seeds: torch.Tensor  # [B] int64
    offsets: torch.Tensor  # [B] int64: sampling counter, advanced per step
    tokens: torch.Tensor  # [B] int64: last sampled token = next decode input
    dec_positions: torch.Tensor  # [B] int64: position of `tokens`
    input_ids: torch.Tensor  # [L] int64
    positions: torch.Tensor  # [L] int64: 0..L-1, set once
    slot_mapping: torch.Tensor  # [L] int64: prefill tokens' cache slots, -1 = padding (computed in the step)
    dec_slots: torch.Tensor  # [B] int64: decode tokens' cache slots (computed in the step)
    seq_lens: torch.Tensor  # [B] int32: decode attention lengths (computed in the step)
    ids_offset: int = 0  # byte offset of input_ids in storage

    def staged_bytes(self, num_tokens: int) -> int:
        """Bytes to copy for a request of num_tokens (padded) prompt tokens: every staged field."""
        return self.ids_offset + num_tokens * self.input_ids.element_size()

    @classmethod
    def allocate(cls, max_len: int, batch: int, max_blocks: int, device: torch.device, pin: bool) -> "StepBuffers":
        dims = {"L": (max_len,), "1": (1,), "B": (batch,), "BM": (batch, max_blocks)}
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
        offsets = {name: off for name, _, _, off, _ in layout}
        return cls(storage=storage, **views, ids_offset=offsets[_STAGED])


class ModelRunner:
    """Runs the model's steps on the JIT path; `graphs` (if set) replays captured steps instead."""

    def __init__(self, model: LlamaModel, kv: PagedKVCache, ops: Any, max_model_len: int, max_num_seqs: int,
                 device: torch.device) -> None:
        self.model, self.kv, self.ops, self.device = model, kv, ops, device
        model.ops = ops
        self.max_model_len = max_model_len
        self.block_size = kv.block_size
        pin = device.type == "cuda"
        self.buf = StepBuffers.allocate(max_model_len, max_num_seqs, kv.max_blocks_per_seq, device, pin=False)
        self.buf.positions.copy_(torch.arange(max_model_len))  # never changes: positions 0..L-1
        self.host = StepBuffers.allocate(max_model_len, max_num_seqs, kv.max_blocks_per_seq, torch.device("cpu"),
                                         pin=pin)
        # numpy views of the pinned host fields: staging a request is a few numpy writes (~1 us each, a torch op on
        # a small CPU tensor costs several), then one H2D copy of the staged bytes (views per length made once)
        self._np = {name: getattr(self.host, name).numpy() for name, _, _ in _FIELDS}
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs: Any = None  # graphs.GraphRunner, attached by the engine when capture != "off"

    # ---- host -> device staging (one request at a time, row 0) ----
    def stage_request(self, prompt_ids: list[int], block_table: list[int], params: SamplingParams, seed: int,
                      pad_to: int) -> None:
        """Copy a request's inputs into the static buffers: token ids (padding ids 0), block table, sampling
        parameters. The step computes the cache slots on the device (padding slots -1)."""
        n, h = len(prompt_ids), self._np
        h["input_ids"][:n] = prompt_ids
        h["input_ids"][n:pad_to] = 0
        h["valid_len"][0] = n
        table = h["block_tables"][0]
        table[: len(block_table)] = block_table
        table[len(block_table):] = 0
        h["temperature"][0] = params.temperature
        h["top_k"][0] = params.top_k
        h["top_p"][0] = params.top_p
        h["seeds"][0] = seed
        h["offsets"][0] = 0
        copy = self._copies.get(pad_to)
        if copy is None:
            size = self.host.staged_bytes(pad_to)
            copy = self._copies[pad_to] = (self.buf.storage[:size], self.host.storage[:size])
        if self.device.type == "cuda" and cuda_driver.available():  # one small copy, stream-ordered before the step
            cuda_driver.copy_to_device(*copy)
        else:
            copy[0].copy_(copy[1], non_blocking=True)

    def scratch_buffers(self) -> StepBuffers:
        """Buffers for warm-up runs: same shapes as `buf`; every block-table entry is the scratch block, so the KV
        writes of a warm-up step land there and nowhere else."""
        b = StepBuffers.allocate(self.max_model_len, self.buf.tokens.shape[0], self.kv.max_blocks_per_seq,
                                 self.device, pin=False)
        b.positions.copy_(torch.arange(self.max_model_len, device=self.device))
        b.valid_len.fill_(1)
        b.block_tables.fill_(self.kv.scratch_block)
        return b

    @torch.inference_mode()
    def warm_up(self, lengths: tuple[int, ...] = (1, 15, 16, 17, 100)) -> None:
        """Run every kernel variant the JIT path will launch once, on scratch buffers (Triton specialises integer
        arguments equal to 1 or divisible by 16; prefill attention's tiles change with the length), so the first
        request compiles and loads nothing; and every projection and attention variant that graph captures use
        (inside gemm.graph_plan, whose choices differ), so that no capture compiles."""
        from .kernels import gemm, prefill_attention

        scratch = self.scratch_buffers()
        attention = prefill_attention.warm_up_lengths()
        for plan, todo in ((nullcontext(), set(lengths) | attention),
                           (gemm.graph_plan(), gemm.warm_up_lengths() | attention)):
            with plan:
                for n in sorted(n for n in todo if n <= self.max_model_len):
                    scratch.valid_len.fill_(n)
                    self.prefill_step(n, scratch)
        self.decode_step(scratch)

    def prefill_step(self, length: int, buf: StepBuffers | None = None) -> None:
        """Prefill `length` staged tokens (exact or a padded bucket); sample the first token into buf.tokens."""
        b = buf or self.buf
        slots = self.ops.prefill_slots(b.block_tables[0], b.valid_len, self.block_size, b.slot_mapping[:length])
        meta = AttentionMetadata(is_prefill=True, slot_mapping=slots, valid_len=b.valid_len,
                                 block_tables=b.block_tables[:1], seq_lens=b.valid_len,
                                 last_index=(b.valid_len - 1).long())
        ids, pos = b.input_ids[:length], b.positions[:length]
        last = jit_prefill(self.model, ids, pos, meta)  # the JIT path's leaner loop where it applies
        if last is None:
            last = self.model(ids, pos, meta)  # [1, H]: the last real token's hidden state
        self._sample_and_advance(b, self.model.compute_logits(last), rows=1)
        b.dec_positions[:1].copy_(b.valid_len)

    def decode_step(self, buf: StepBuffers | None = None) -> None:
        """One token per sequence: its KV slot and attention length are computed on the device from its position
        and block table."""
        b = buf or self.buf
        pos = b.dec_positions
        self.ops.decode_slots(b.block_tables, pos, self.block_size, b.dec_slots, b.seq_lens)
        meta = AttentionMetadata(is_prefill=False, slot_mapping=b.dec_slots, block_tables=b.block_tables,
                                 seq_lens=b.seq_lens)
        hidden = self.model(b.tokens, pos, meta)
        self._sample_and_advance(b, self.model.compute_logits(hidden), rows=b.tokens.shape[0])
        pos.add_(1)

    def _sample_and_advance(self, b: StepBuffers, logits: torch.Tensor, rows: int) -> None:
        tok = self.ops.sample(logits, b.temperature[:rows], b.top_k[:rows], b.top_p[:rows], b.seeds[:rows],
                              b.offsets[:rows])
        b.tokens[:rows].copy_(tok)
        b.offsets[:rows].add_(1)

    # ---- dispatch: graph replay when ready, else the JIT path ----
    def prefill(self, prompt_ids: list[int], block_table: list[int], params: SamplingParams, seed: int) -> str:
        """Stage and prefill a prompt; replays the bucket's graph when captured. Returns "graph" or "jit". Called with
        the serving stream current; a replay needs no inference mode (no autograd-visible op runs)."""
        n = len(prompt_ids)
        bucket = self.graphs.ready_prefill_bucket(n) if self.graphs is not None else None
        self.stage_request(prompt_ids, block_table, params, seed, pad_to=bucket or n)
        if bucket is not None:
            self.graphs.replay_prefill(bucket)
            return "graph"
        with torch.inference_mode():
            self.prefill_step(n)
        return "jit"

    def decode(self) -> str:
        if self.graphs is not None and self.graphs.replay_decode():
            return "graph"
        with torch.inference_mode():
            self.decode_step()
        return "jit"
