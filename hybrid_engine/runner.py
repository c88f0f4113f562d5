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

import numpy as np
import torch

from .kv_cache import PagedKVCache
from .models.llama import AttentionMetadata, LlamaModel
from .models.llama_jit import jit_prefill
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


_FIELDS = (  # name, shape (in terms of L = max_model_len, B = batch, M = max blocks per sequence), dtype
    ("input_ids", "L", torch.int64), ("positions", "L", torch.int64), ("slot_mapping", "L", torch.int64),
    ("valid_len", "1", torch.int32), ("tokens", "B", torch.int64), ("dec_positions", "B", torch.int64),
    ("block_tables", "BM", torch.int32), ("temperature", "B", torch.float32), ("top_k", "B", torch.int32),
    ("top_p", "B", torch.float32), ("seeds", "B", torch.int64), ("offsets", "B", torch.int64),
)


@dataclass(slots=True)
class StepBuffers:
    """Static inputs/outputs, all views into one byte buffer so a request is staged with a single H2D copy.

    Prefill fields hold up to max_model_len tokens; decode fields one row per sequence.
    """

    storage: torch.Tensor  # uint8, every field below is a view into it
    input_ids: torch.Tensor  # [L] int64
    positions: torch.Tensor  # [L] int64
    slot_mapping: torch.Tensor  # [L] int64, -1 = padding
    valid_len: torch.Tensor  # [1] int32: real prompt length
    tokens: torch.Tensor  # [B] int64: last sampled token = next decode input
    dec_positions: torch.Tensor  # [B] int64: position of `tokens`
    block_tables: torch.Tensor  # [B, M] int32
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int32
    top_p: torch.Tensor  # [B] fp32
    seeds: torch.Tensor  # [B] int64
    offsets: torch.Tensor  # [B] int64: sampling counter, advanced per step

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
        return cls(storage=storage, **views)


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
        self.host.positions.copy_(torch.arange(max_model_len))  # never changes: positions 0..L-1
        # numpy views of the pinned host fields: staging a request is a few numpy writes (~1 us each, a torch op on
        # a small CPU tensor costs several), then one H2D copy
        self._np = {name: getattr(self.host, name).numpy() for name, _, _ in _FIELDS}
        self.graphs: Any = None  # graphs.GraphRunner, attached by the engine when capture != "off"

    # ---- host -> device staging (one request at a time, row 0) ----
    def stage_request(self, prompt_ids: list[int], block_table: list[int], params: SamplingParams, seed: int,
                      pad_to: int) -> None:
        """Copy a request's inputs into the static buffers; slots past the prompt (bucket padding) get -1."""
        n, h = len(prompt_ids), self._np
        h["input_ids"][:n] = prompt_ids
        h["input_ids"][n:pad_to] = 0
        table = np.asarray(block_table, dtype=np.int64)
        h["slot_mapping"][:n] = self.kv.slot_mapping(table, h["positions"][:n])
        h["slot_mapping"][n:pad_to] = -1
        h["valid_len"][0] = n
        h["block_tables"][0] = 0
        h["block_tables"][0, : len(table)] = table
        h["temperature"][0] = params.temperature
        h["top_k"][0] = params.top_k
        h["top_p"][0] = params.top_p
        h["seeds"][0] = seed
        h["offsets"][0] = 0
        self.buf.storage.copy_(self.host.storage, non_blocking=True)  # one copy for everything; stream-ordered

    def scratch_buffers(self) -> StepBuffers:
        """Buffers for warm-up runs: same shapes as `buf`; KV writes go nowhere (slot -1) or to the scratch block."""
        b = StepBuffers.allocate(self.max_model_len, self.buf.tokens.shape[0], self.kv.max_blocks_per_seq,
                                 self.device, pin=False)
        b.positions.copy_(torch.arange(self.max_model_len, device=self.device))
        b.slot_mapping.fill_(-1)
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
        meta = AttentionMetadata(is_prefill=True, slot_mapping=b.slot_mapping[:length], valid_len=b.valid_len,
                                 block_tables=b.block_tables[:1], seq_lens=b.valid_len,
                                 last_index=(b.valid_len - 1).long())
        ids, pos = b.input_ids[:length], b.positions[:length]
        last = jit_prefill(self.model, ids, pos, meta)  # the JIT path's leaner loop where it applies
        if last is None:
            last = self.model(ids, pos, meta)  # [1, H]: the last real token's hidden state
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
        if bucket is not None:
            self.graphs.replay_prefill(bucket)
            return "graph"
        self.prefill_step(n)
        return "jit"

    @torch.inference_mode()
    def decode(self) -> str:
        if self.graphs is not None and self.graphs.replay_decode():
            return "graph"
        self.decode_step()
        return "jit"
