"""ModelRunner: prefill and decode steps over static, batch-shaped device buffers.

Every running sequence owns one row of the per-row buffers (its last token, position, sampling counter, sampling
parameters, block table). A prefill installs a sequence in its row; a decode step runs rows 0..n-1 (a graph: the
bucket's rows, the rest padding) and advances each row's token, position and counter on the device, so the host can
enqueue the next step before it reads this one. A batch with grammar-constrained rows runs its decode step in two
halves, forward (logits into a static buffer) and sample (masked by token bitmasks staged in between), so that the
host computes the masks, which need the previous step's tokens, while the GPU runs the forward. Everything the host sends goes through pinned staging buffers
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
from .buffers import PARAM_FIELDS, ROW_FIELDS, MaskSlot, StepBuffers, Staging
from .kv_cache import PagedKVCache
from .token_reader import wait_event
from ..models.llama import AttentionMetadata, LlamaModel
from ..models.llama_jit import jit_prefill
from ..sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefillItem:
    """One sequence of a batched prefill (`ModelRunner.prefill_batch`): its new tokens `ids` at positions start..,
    after `start` cached ones; its row, block table, sampling parameters, seed and first token's counter."""

    ids: list[int]
    start: int
    row: int
    table: list[int]
    params: SamplingParams
    seed: int
    offset: int


class ModelRunner:
    """Runs the model's steps on the JIT path; `graphs` (if set) replays captured steps instead."""

    def __init__(self, model: LlamaModel, kv: PagedKVCache, ops: Any, max_model_len: int, max_num_seqs: int,
                 device: torch.device, mask_vocab: int = 0) -> None:
        self.model, self.kv, self.ops, self.device = model, kv, ops, device
        model.ops = ops
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.block_size = kv.block_size
        self.max_blocks = kv.max_blocks_per_seq
        # bitmask words per row: the grammar's vocabulary (the tokenizer's, when larger than the logits)
        self.mask_words = -(-max(mask_vocab, model.args.vocab_size) // 32)
        self.buf = self._device_buffers()
        # the forward half of a split decode step writes the logits here; the sample half reads them
        self.logits = torch.zeros(max_num_seqs, model.args.vocab_size, dtype=torch.float32, device=device)
        self._spare = max_num_seqs * self.max_blocks  # flat block-table index in the spare row
        pin = device.type == "cuda"
        self.staging = Staging(lambda: StepBuffers.allocate(max_model_len, max_num_seqs, self.max_blocks,
                                                             self.mask_words, torch.device("cpu"), pin=pin), device)
        self._split_bucket: int | None = None  # the graph bucket of the split step in flight (None: JIT path)
        self._updates_on_device = False  # the device's update list holds entries a later step must not re-apply
        self.graphs: Any = None  # graphs.GraphRunner, attached by the engine when capture != "off"

    def _device_buffers(self) -> StepBuffers:
        b = StepBuffers.allocate(self.max_model_len, self.max_num_seqs, self.max_blocks, self.mask_words,
                                 self.device, pin=False)
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
                      offset: int, pad_to: int, start: int = 0, mask: torch.Tensor | None = None) -> None:
        """A sequence's prefill inputs: token ids (padding ids 0) at positions start.., its row, block table,
        sampling parameters, sampling counter and (constrained) its first token's bitmask ([W] int32). The step
        computes the cache slots on the device (padding -1)."""
        slot, h, index = self.staging.take()
        if mask is not None:
            slot.p_bitmask[0].copy_(mask)
        h["p_masked"][0] = mask is not None
        n = len(ids)
        h["input_ids"][:n] = ids
        h["input_ids"][n:pad_to] = 0
        h["valid_len"][0], h["prefill_row"][0], h["prefill_offset"][0] = n, row, offset
        h["prefill_table"][0, :len(table)] = table
        h["prefill_table"][0, len(table):] = self.kv.scratch_block
        h["p_temperature"][0], h["p_top_k"][0], h["p_top_p"][0] = params.temperature, params.top_k, params.top_p
        h["p_seed"][0], h["ctx_start"][0] = seed, start
        self._copy(slot, index, *slot.prefill_range(pad_to, mask is not None))

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

    def mask_slot(self) -> MaskSlot:
        """A staging slot for the next sample half's bitmasks: the caller fills rows of `bitmask` and sets their
        `flags` (all 0 to start with), then passes it to `decode_sample`."""
        slot, h, index = self.staging.take()
        h["masked"][:] = 0
        return MaskSlot(slot.bitmask, h["masked"], slot, index)

    # ---- device-side row maintenance (rows stay dense) ----
    def move_row(self, src: int, dst: int) -> None:
        b = self.buf
        b.block_tables[dst].copy_(b.block_tables[src])
        for name in ROW_FIELDS:
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
                context_lengths: tuple[int, ...] = (1, 15, 16, 17, 100, 112, 200, 208),
                graph_plan: bool = True) -> None:
        """Run every kernel variant the JIT path will launch once, on scratch buffers (Triton specialises integer
        arguments equal to 1 or divisible by 16; prefill attention's tiles change with the length), so the first
        request compiles and loads nothing; and (graph_plan) every projection and attention variant that graph
        captures use (inside gemm.graph_plan, whose choices differ), so that no capture compiles. graph_plan=False
        leaves those to the capture worker's own warm-up run before each capture: right where Triton's cache
        already holds them (it then only loads them), not where they would be compiled in the background."""
        from ..kernels import gemm, prefill_attention

        scratch = self.scratch_buffers()
        attention = prefill_attention.warm_up_lengths()
        passes = [(nullcontext(), set(lengths) | attention)]
        if graph_plan:
            passes.append((gemm.graph_plan(), gemm.warm_up_lengths(self.device) | attention))
        for plan, todo in passes:
            with plan:
                for n in sorted(n for n in todo if n <= self.max_model_len):
                    scratch.valid_len.fill_(n)
                    self.prefill_step(n, scratch)
                for n in (n for n in context_lengths if n <= self.max_model_len):  # prefix-cache hits
                    scratch.valid_len.fill_(n)
                    self.prefill_step(n, scratch, context=True)
                for rows in decode_rows:
                    # valid token ids for the embedding lookup: under kernels._triton.compile_only no kernel runs,
                    # and the sampler's output (the tokens a decode step reads) is then whatever memory held
                    scratch.tokens.zero_()
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
                              b.prefill_offset, b.p_bitmask, b.p_masked)
        row = b.prefill_row
        b.block_tables.index_copy_(0, row, table)
        for name, staged in PARAM_FIELDS:
            getattr(b, name).index_copy_(0, row, getattr(b, staged))
        b.tokens.index_copy_(0, row, tok)
        b.offsets.index_copy_(0, row, b.prefill_offset + 1)
        b.dec_positions.index_copy_(0, row, total.long())

    def decode_step(self, rows: int, buf: StepBuffers | None = None) -> None:
        """One token for each of rows 0..rows-1: the staged block-table entries are added first; each row's KV
        slot and attention length are computed on the device from its position and block table."""
        b = buf or self.buf
        logits = self.model.compute_logits(*self._decode_hidden(rows, b), decode=True, fp32=False)  # sample: fp32
        self.ops.sample(logits, b.temperature[:rows], b.top_k[:rows], b.top_p[:rows], b.seeds[:rows], b.offsets[:rows],
                        advance=(b.tokens[:rows], b.dec_positions[:rows]))

    def decode_forward_step(self, rows: int, buf: StepBuffers | None = None, logits: torch.Tensor | None = None) -> None:
        """The forward half of a split decode step: `decode_step` up to the logits, which go to `logits`."""
        b = buf or self.buf
        out = self.logits if logits is None else logits
        out[:rows].copy_(self.model.compute_logits(*self._decode_hidden(rows, b), decode=True, fp32=False))

    def decode_sample_step(self, rows: int, buf: StepBuffers | None = None, logits: torch.Tensor | None = None) -> None:
        """The sample half: each row's token from the forward half's logits, masked where the row's flag is set,
        and the row advanced as `decode_step` advances it."""
        b = buf or self.buf
        x = (self.logits if logits is None else logits)[:rows]
        self.ops.sample(x, b.temperature[:rows], b.top_k[:rows], b.top_p[:rows], b.seeds[:rows], b.offsets[:rows],
                        b.bitmask[:rows], b.masked[:rows], advance=(b.tokens[:rows], b.dec_positions[:rows]))

    def _decode_hidden(self, rows: int, b: StepBuffers) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's output, residual) of a decode step's rows; compute_logits adds them in its norm kernel."""
        pos = b.dec_positions[:rows]
        self.ops.decode_slots(b.block_tables[:rows], pos, self.block_size, b.dec_slots[:rows], b.seq_lens[:rows],
                              (b.block_tables.view(-1), b.upd_index, b.upd_block))  # the staged entries first
        meta = AttentionMetadata(is_prefill=False, slot_mapping=b.dec_slots[:rows], block_tables=b.block_tables[:rows],
                                 seq_lens=b.seq_lens[:rows])
        return self.model(b.tokens[:rows], pos, meta, residual_apart=True)

    # ---- dispatch: graph replay when ready, else the JIT path ----
    def prefill(self, ids: list[int], row: int, table: list[int], params: SamplingParams, seed: int,
                offset: int, mask: torch.Tensor | None = None) -> str:
        """Stage and prefill one sequence into `row` (mask: its first token's bitmask); replays the bucket's graph
        when captured. Returns "graph" or "jit". Called with the serving stream current; a replay needs no
        inference mode."""
        graphs = self.graphs
        bucket = graphs.ready_prefill_bucket(len(ids)) if graphs is not None else None
        return self._prefill(ids, 0, (row, table, params, seed, offset, mask), bucket,
                             lambda b: graphs.replay_prefill(b), context=False, final=True)

    def prefill_from(self, ids: list[int], start: int, row: int, table: list[int], params: SamplingParams,
                     seed: int, offset: int, mask: torch.Tensor | None = None) -> str:
        """The rest of a prompt whose first `start` positions are cached (a prefix-cache hit): `ids` at positions
        start.., attention over the cached KV and themselves; samples the first token (mask: its bitmask) and
        installs the sequence in `row`. Replays the graph of the bucket for len(ids) new tokens when captured (any
        start)."""
        self._check_end("prefill", start + len(ids))
        graphs = self.graphs
        bucket = graphs.ready_context_bucket(len(ids)) if graphs is not None else None
        return self._prefill(ids, start, (row, table, params, seed, offset, mask), bucket,
                             lambda b: graphs.replay_context_prefill(b), context=True, final=True)

    def prefill_chunk(self, ids: list[int], start: int, row: int, table: list[int], params: SamplingParams,
                      seed: int, offset: int, final: bool, mask: torch.Tensor | None = None) -> str:
        """One chunk of a long prompt, `ids` at positions start.., after `start` positions already cached; the final
        chunk samples the first token and installs the sequence in `row`. Replays the chunk graph (a non-final
        chunk) or the bucket's prefill-after-cached-positions graph (the final one, as `prefill_from`) when
        captured, whatever the start (0 included); else the JIT path."""
        self._check_end("chunk", start + len(ids))
        graphs, bucket = self.graphs, None
        if graphs is not None:
            bucket = graphs.ready_context_bucket(len(ids)) if final else graphs.ready_part_bucket(len(ids))
        replay = (lambda b: graphs.replay_context_prefill(b)) if final else (lambda b: graphs.replay_context_part(b))
        return self._prefill(ids, start, (row, table, params, seed, offset, mask if final else None), bucket, replay,
                             context=start > 0, final=final)

    def prefill_batch(self, items: list["PrefillItem"]) -> str:
        """Several sequences' prompts (each after its cached positions, 0 included) in one forward pass on the JIT
        path, so their projections read the weights once: each samples its first token and is installed in its
        row, as `prefill_from` does for one. Returns "jit". No bitmask: constrained sequences go one at a time."""
        for it in items:
            self._check_end("prefill", it.start + len(it.ids))
        bs, spare, m = self.block_size, self.kv.scratch_block, self.max_blocks
        seqs, ids, first = [], [], 0
        for it in items:
            seqs.append((first, first + len(it.ids), it.start))
            ids += it.ids
            first += len(it.ids)
        tables = torch.tensor([[*it.table, *[spare] * (m - len(it.table))] for it in items], dtype=torch.int64)
        pos = torch.cat([torch.arange(it.start, it.start + len(it.ids)) for it in items])
        owner = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([len(it.ids) for it in items]))
        slots = tables[owner, pos // bs] * bs + pos % bs
        # one pinned host buffer per dtype, one copy each (stream-ordered: torch keeps the host memory until done)
        head = torch.tensor([*ids], dtype=torch.int64)
        tail = torch.tensor([*(e - 1 for _, e, _ in seqs), *(it.row for it in items),
                             *(it.offset for it in items), *(it.seed for it in items)], dtype=torch.int64)
        ints = torch.cat([head, pos, slots, tail])
        seq_lens = torch.tensor([s + e - f for f, e, s in seqs], dtype=torch.int32)
        i32 = torch.cat([tables.view(-1).to(torch.int32), seq_lens,
                         torch.tensor([it.params.top_k for it in items], dtype=torch.int32)])
        f32 = torch.tensor([[it.params.temperature, it.params.top_p] for it in items], dtype=torch.float32)
        pin = self.device.type == "cuda"
        ints, i32, f32 = (t.pin_memory().to(self.device, non_blocking=True) if pin else t for t in (ints, i32, f32))
        t, s = len(ids), len(items)
        ids_d, pos_d, slots_d, last_d, rows_d, offsets_d, seeds_d = ints.split([t, t, t, s, s, s, s])
        tables_d, seq_lens_d, top_k_d = i32.split([s * m, s, s])
        tables_d = tables_d.view(s, m)
        meta = AttentionMetadata(is_prefill=True, slot_mapping=slots_d, block_tables=tables_d, seq_lens=seq_lens_d,
                                 last_index=last_d, seqs=tuple(seqs))
        b = self.buf
        with torch.inference_mode():
            last = self.model(ids_d, pos_d, meta)  # [S, H]: each sequence's last row
            temperature, top_p = f32[:, 0].contiguous(), f32[:, 1].contiguous()
            tok = self.ops.sample(self.model.compute_logits(last), temperature, top_k_d, top_p, seeds_d, offsets_d)
            b.block_tables.index_copy_(0, rows_d, tables_d)
            for name, value in (("temperature", temperature), ("top_k", top_k_d), ("top_p", top_p),
                                ("seeds", seeds_d)):
                getattr(b, name).index_copy_(0, rows_d, value)
            b.tokens.index_copy_(0, rows_d, tok)
            b.offsets.index_copy_(0, rows_d, offsets_d + 1)
            b.dec_positions.index_copy_(0, rows_d, seq_lens_d.long())
        return "jit"

    def _check_end(self, what: str, end: int) -> None:
        if end > self.max_model_len:
            raise ValueError(f"{what} ends at position {end} > max_model_len={self.max_model_len}")

    def _prefill(self, ids: list[int], start: int, staged: tuple, bucket: int | None, replay: Any, context: bool,
                 final: bool) -> str:
        """Stage `ids` at positions start.. with `staged` = (row, table, params, seed, offset, mask), padded to
        `bucket`, and replay its graph (`replay(bucket)`); with no bucket, the JIT path's step on the exact length."""
        row, table, params, seed, offset, mask = staged
        n = len(ids)
        self.stage_prefill(ids, row, table, params, seed, offset, pad_to=bucket or n, start=start, mask=mask)
        if bucket is not None:
            replay(bucket)
            return "graph"
        with torch.inference_mode():
            self.prefill_step(n, context=context, final=final)
        return "jit"

    def decode(self, rows: int, updates: list[tuple[int, int, int]]) -> str:
        """One decode step over rows 0..rows-1 (a graph pads up to its bucket; padding rows sit at position 0 of
        the scratch block)."""
        self.stage_decode(updates)
        bucket = self.graphs.ready_decode_bucket(rows) if self.graphs is not None else None
        return self._run_decode(rows, bucket, self.decode_step, lambda: self.graphs.replay_decode(bucket))

    def decode_forward(self, rows: int, updates: list[tuple[int, int, int]]) -> str:
        """The forward half of a split decode step over rows 0..rows-1 (graph or JIT path, as `decode`); the sample
        half (`decode_sample`) must follow before any other step."""
        self.stage_decode(updates)
        bucket = self._split_bucket = self.graphs.ready_split_bucket(rows) if self.graphs is not None else None
        return self._run_decode(rows, bucket, self.decode_forward_step,
                                lambda: self.graphs.replay_decode_forward(bucket))

    def _run_decode(self, rows: int, bucket: int | None, step: Any, replay: Any) -> str:
        """Replay the bucket's graph (its padding rows at position 0) or run `step(rows)` on the JIT path."""
        if bucket is not None:
            if bucket > rows:
                self.buf.dec_positions[rows:bucket].zero_()
            replay()
            return "graph"
        with torch.inference_mode():
            step(rows)
        return "jit"

    def decode_sample_masks(self, rows: int, flags: Any, bitmask: torch.Tensor, mask_rows: int) -> None:
        """`decode_sample` with the flags and bitmask rows given as data (a tensor-parallel worker receives them so,
        not as the engine's staging slot)."""
        masks = self.mask_slot()
        masks.flags[:] = flags
        masks.bitmask[:mask_rows].copy_(bitmask)
        self.decode_sample(rows, masks, mask_rows)

    def decode_sample(self, rows: int, masks: MaskSlot, mask_rows: int) -> None:
        """The sample half: stages the flags of every row and the bitmasks of rows 0..mask_rows-1 from `masks`
        (filled by the caller after `mask_slot()`), then samples on the path the forward half took."""
        self._copy(masks.slot, masks.index, *masks.slot.sample_range(mask_rows))
        bucket, self._split_bucket = self._split_bucket, None
        if bucket is not None:
            self.graphs.replay_decode_sample(bucket)
            return
        with torch.inference_mode():
            self.decode_sample_step(rows)

