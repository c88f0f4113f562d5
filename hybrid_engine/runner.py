"""ModelRunner: one prefill or decode step over static device buffers.

Every step reads its inputs from preallocated buffers and writes the next token, position and sampling offset back
into them on the device, so the same step functions run eagerly (the JIT path) or as CUDA-graph replays
(graphs.py) and the host never has to sit between two decode steps. Nothing here allocates device memory after
construction except the eager step's activations.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .kv_cache import PagedKVCache
from .models.llama import AttentionMetadata, LlamaModel
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepBuffers:
    """Static inputs/outputs. Prefill buffers hold up to max_model_len tokens; decode buffers one row per sequence."""

    input_ids: torch.Tensor  # [max_model_len] int64
    positions: torch.Tensor  # [max_model_len] int64
    slot_mapping: torch.Tensor  # [max_model_len] int64, -1 = padding
    valid_len: torch.Tensor  # [1] int32: real prompt length
    tokens: torch.Tensor  # [B] int64: last sampled token = next decode input
    dec_positions: torch.Tensor  # [B] int64: position of `tokens`
    block_tables: torch.Tensor  # [B, max_blocks] int32
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int32
    top_p: torch.Tensor  # [B] fp32
    seeds: torch.Tensor  # [B] int64
    offsets: torch.Tensor  # [B] int64: sampling counter, advanced per step

    @classmethod
    def allocate(cls, max_len: int, batch: int, max_blocks: int, device: torch.device, pin: bool) -> "StepBuffers":
        def z(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            t = torch.zeros(shape, dtype=dtype, device=device)
            return t.pin_memory() if pin else t

        return cls(z(max_len), z(max_len), z(max_len), z(1, dtype=torch.int32), z(batch), z(batch),
                   z(batch, max_blocks, dtype=torch.int32), z(batch, dtype=torch.float32),
                   z(batch, dtype=torch.int32), z(batch, dtype=torch.float32), z(batch), z(batch))


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
        self.host = StepBuffers.allocate(max_model_len, max_num_seqs, kv.max_blocks_per_seq, torch.device("cpu"),
                                         pin=pin)
        self.graphs: Any = None  # graphs.GraphRunner, attached by the engine when capture != "off"

    # ---- host -> device staging (one request at a time, row 0) ----
    def stage_request(self, prompt_ids: list[int], block_table: list[int], params: SamplingParams, seed: int,
                      pad_to: int) -> None:
        """Copy a request's inputs into the static buffers; slots past the prompt (bucket padding) get -1."""
        n, h, b = len(prompt_ids), self.host, self.buf
        h.input_ids[:n] = torch.tensor(prompt_ids, dtype=torch.int64)
        h.input_ids[n:pad_to] = 0
        h.positions[:pad_to] = torch.arange(pad_to)
        h.slot_mapping[:n] = torch.tensor(self.kv.slot_mapping(block_table, 0, n), dtype=torch.int64)
        h.slot_mapping[n:pad_to] = -1
        h.valid_len[0] = n
        h.block_tables[0].zero_()
        h.block_tables[0, : len(block_table)] = torch.tensor(block_table, dtype=torch.int32)
        h.temperature[0] = params.temperature
        h.top_k[0] = params.top_k
        h.top_p[0] = params.top_p
        h.seeds[0] = seed
        h.offsets[0] = 0
        for name in ("input_ids", "positions", "slot_mapping"):
            getattr(b, name)[:pad_to].copy_(getattr(h, name)[:pad_to], non_blocking=True)
        for name in ("valid_len", "block_tables", "temperature", "top_k", "top_p", "seeds", "offsets"):
            getattr(b, name).copy_(getattr(h, name), non_blocking=True)

    # ---- the step functions (eager here; graphs.py captures exactly these) ----
    def scratch_buffers(self) -> StepBuffers:
        """Buffers for warm-up runs: same shapes as `buf`; KV writes go nowhere (slot -1) or to the scratch block."""
        b = StepBuffers.allocate(self.max_model_len, self.buf.tokens.shape[0], self.kv.max_blocks_per_seq,
                                 self.device, pin=False)
        b.positions.copy_(torch.arange(self.max_model_len, device=self.device))
        b.slot_mapping.fill_(-1)
        b.valid_len.fill_(1)
        b.block_tables.fill_(self.kv.scratch_block)
        return b

    def prefill_step(self, length: int, buf: StepBuffers | None = None) -> None:
        """Prefill `length` staged tokens (exact or a padded bucket); sample the first token into buf.tokens."""
        b = buf or self.buf
        meta = AttentionMetadata(is_prefill=True, slot_mapping=b.slot_mapping[:length], valid_len=b.valid_len)
        hidden = self.model(b.input_ids[:length], b.positions[:length], meta)
        last = hidden.index_select(0, (b.valid_len - 1).long())
        self._sample_and_advance(b, self.model.compute_logits(last), rows=1)
        b.dec_positions[:1].copy_(b.valid_len)

    def decode_step(self, buf: StepBuffers | None = None) -> None:
        """One token per sequence: the KV slot is computed on the device from the position and block table."""
        b = buf or self.buf
        pos = b.dec_positions
        block = b.block_tables.gather(1, torch.div(pos, self.block_size, rounding_mode="floor").unsqueeze(1))
        slots = block.squeeze(1).long() * self.block_size + pos % self.block_size
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slots, block_tables=b.block_tables,
                                 seq_lens=(pos + 1).int())
        hidden = self.model(b.tokens, pos, meta)
        self._sample_and_advance(b, self.model.compute_logits(hidden), rows=b.tokens.shape[0])
        pos.add_(1)

    def _sample_and_advance(self, b: StepBuffers, logits: torch.Tensor, rows: int) -> None:
        tok = self.ops.sample(logits, b.temperature[:rows], b.top_k[:rows], b.top_p[:rows], b.seeds[:rows],
                              b.offsets[:rows])
        b.tokens[:rows].copy_(tok)
        b.offsets[:rows].add_(1)

    # ---- dispatch: graph replay when ready, else the JIT path ----
    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], block_table: list[int], params: SamplingParams, seed: int) -> str:
        """Stage and prefill a prompt; replays the bucket's graph when captured. Returns "graph" or "jit"."""
        n = len(prompt_ids)
        bucket = self.graphs.ready_prefill_bucket(n) if self.graphs is not None else None
        self.stage_request(prompt_ids, block_table, params, seed, pad_to=bucket or n)
        if bucket is not None and self.graphs.replay_prefill(bucket):
            return "graph"
        self.prefill_step(n)
        return "jit"

    @torch.inference_mode()
    def decode(self) -> str:
        if self.graphs is not None and self.graphs.replay_decode():
            return "graph"
        self.decode_step()
        return "jit"
