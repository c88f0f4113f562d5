"""Scheduler: waiting and running sequences, batch rows, KV growth and recompute preemption.

Each step it admits waiting sequences first come first served while rows and KV blocks allow (a sequence takes the
cached blocks of its prompt's longest cached prefix and prefills the rest: block_manager.py), then plans one decode
step over every running row. Rows stay dense (0..n-1): a sequence that leaves is replaced by the highest row, so the
decode batch pads up to the smallest graphed bucket >= n. When a decode step needs blocks that are not free, the
newest running sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its prompt and the tokens it already produced (vLLM's recompute preemption), before any newer one.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass(slots=True)
class DecodePlan:
    """One decode step: rows 0..num_rows-1 (rows[i] is the sequence in row i), the block-table entries to add
    before it ((row, index, block) triples), row moves and resets to apply on the device first."""

    rows: list[Sequence]
    table_updates: list[tuple[int, int, int]] = field(default_factory=list)
    row_ops: "RowOps | None" = None

    @property
    def num_rows(self) -> int:
        return len(self.rows)


@dataclass(slots=True)
class RowOps:
    """Device-side row maintenance the runner applies, in order: moves (src -> dst), then resets [start, end)."""

    moves: list[tuple[int, int]] = field(default_factory=list)
    reset: tuple[int, int] | None = None


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence | None] = []
        self._high_water = 0  # rows 0.._high_water-1 may hold state on the device
        self.num_preemptions = 0
        self.batch_sizes = [0] * (max_num_seqs + 1)  # decode steps by rows (a list: stats() reads it unlocked)

    # ---- queues ----
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.rows if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.rows)

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out (finished, cancelled or failed): its blocks and row are free at once."""
        if seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._vacate(seq)
        seq.status = Status.FINISHED

    def drop_cancelled_waiting(self) -> list[Sequence]:
        gone = [s for s in self.waiting if s.cancelled]
        for s in gone:
            self.finish(s)
        return gone

    # ---- planning ----
    def admit(self) -> list[Sequence]:
        """Waiting sequences given a row and the blocks of their prefill, first come first served: the head of the
        queue is never skipped. A sequence reuses the longest cached run of full blocks of its prefill (prefix
        cache) and prefills only the rest. Each running sequence keeps one block of headroom for its next step."""
        admitted = []
        while self.waiting and len(self.rows) < self.max_num_seqs:
            seq = self.waiting[0]
            ids = seq.prefill_ids
            hit = self.blocks.cached_prefix(ids, seq.block_hashes, seq.block_entries)
            need = self.blocks.cost(hit, len(ids))
            if need + len(self.running) + 1 > self.blocks.num_available:  # + one block of growth per running seq
                break
            self.waiting.popleft()
            self.blocks.admit(seq.block_table, hit, len(ids))
            seq.row, seq.status = len(self.rows), Status.RUNNING
            seq.num_enqueued = len(seq.output_ids)
            seq.cache_hit = len(hit) * self.blocks.block_size
            seq.num_registered = len(hit)
            if seq.epoch == 0:
                seq.num_cached_tokens = seq.cache_hit
            seq.prefill_len, seq.prefilled = len(ids), seq.cache_hit
            self.rows.append(seq)
            admitted.append(seq)
        self._high_water = max(self._high_water, len(self.rows))
        return admitted

    def cache_written(self, seq: Sequence, written: int) -> None:
        """Register the sequence's full blocks among its first `written` positions whose KV is written (or enqueued)
        and whose token ids the host knows."""
        if not self.blocks.enable_caching:
            return
        full = min(written, len(seq.prompt_ids) + len(seq.output_ids)) // self.blocks.block_size
        if full > seq.num_registered:
            seq.num_registered = self.blocks.register(seq.block_table, seq.prefill_ids, seq.block_hashes,
                                                      seq.num_registered, full, seq.block_entries)

    def plan_decode(self) -> tuple[DecodePlan | None, list[Sequence]]:
        """The next decode step over every running row (None when no row wants a token), and the sequences
        preempted to make room for it. The step writes one position per row, at each sequence's `kv_len`."""
        running = self.running
        if not any(s.wants_tokens for s in running):
            return None, []
        preempted = []
        while self._missing(running) > self.blocks.num_available and len(running) > 1:
            victim = max(running, key=lambda s: (s.arrival, s.seq_id))
            self._preempt(victim)
            preempted.append(victim)
            running.remove(victim)
        row_ops = self.compact()
        updates = []
        for seq in self.running:
            if seq.in_prefill:  # its row rides along on the scratch block until its prompt is in
                continue
            start = len(seq.block_table)
            for i, block in enumerate(self.blocks.grow(seq.block_table, seq.kv_len + 1)):
                updates.append((seq.row, start + i, block))
        self.batch_sizes[len(self.rows)] += 1
        return DecodePlan(self.running, updates, row_ops), preempted

    def compact(self) -> RowOps:
        """Make the rows dense again (the highest row fills the lowest hole) and say which rows to reset."""
        ops = RowOps()
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        while None in self.rows:
            hole = self.rows.index(None)
            seq = self.rows.pop()
            ops.moves.append((seq.row, hole))
            seq.row, self.rows[hole] = hole, seq
            while self.rows and self.rows[-1] is None:
                self.rows.pop()
        if self._high_water > len(self.rows):
            ops.reset = (len(self.rows), self._high_water)
            self._high_water = len(self.rows)
        return ops

    def _missing(self, running: list[Sequence]) -> int:
        return sum(self.blocks.missing(s.block_table, s.kv_len + 1) for s in running if not s.in_prefill)

    def _preempt(self, seq: Sequence) -> None:
        self._vacate(seq)
        seq.status, seq.epoch = Status.WAITING, seq.epoch + 1
        seq.num_enqueued, seq.kv_len, seq.prefill_len, seq.prefilled = len(seq.output_ids), 0, 0, 0
        seq.num_registered = seq.cache_hit = 0
        self.waiting.appendleft(seq)  # newest first, so older preempted sequences end up ahead of it
        self.num_preemptions += 1

    def _vacate(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.num_registered = 0
        if 0 <= seq.row < len(self.rows) and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
        seq.row = -1
