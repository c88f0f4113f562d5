"""EngineCore: the step loop over the scheduler, the model runner and the token reader.

There is no engine thread: whichever caller is waiting for a token drives the loop (one at a time), and every step
it runs serves every running sequence, delivering each one's deltas to that sequence's outbox. A request alone thus
runs on its caller's thread with no hand-off, and concurrent callers share batched steps. On the GPU the loop reads
tokens one step behind: it enqueues the next decode step before it reads the previous one (the step advances
tokens, positions and sampling counters on the device), so the GPU never waits for Python.

Grammar-constrained rows (structured output) need each step's token on the host before the next step's mask. A
batch with such rows splits its decode step: the loop enqueues the forward half, then reads every earlier step's
tokens (they finished before the forward began), advances each matcher and computes the next masks on the host
while the GPU runs the forward, stages them, and enqueues the sample half. Batches without one keep the single
step. A matcher that fails fails its request only.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import torch

from ..errors import HybridEngineError
from ..outputs import RequestMetrics, StreamDelta
from ..structured.matcher import fill_bitmasks
from .scheduler import RowOps, Scheduler
from .sequence import Sequence, Status

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, runner: Any, scheduler: Scheduler, reader: Any, scope: Any, eos_token_ids: set[int],
                 graphs: Any, lookahead: bool, chunk_size: int = 512, batched_prefill: bool = False) -> None:
        self.runner, self.sched, self.reader, self.scope = runner, scheduler, reader, scope
        self.chunk_size = chunk_size
        self.batched_prefill = batched_prefill
        self.eos_token_ids, self.graphs, self.lookahead = eos_token_ids, graphs, lookahead
        self.cv = threading.Condition()
        self._driving = False
        self._inbox: list[Sequence] = []
        # per enqueued step, in order: (sequence, its epoch then, its row) for each token the step samples
        self.inflight: deque[list[tuple[Sequence, int, int]]] = deque()
        self.chunks = 0  # prompt chunks run (long prompts beside running decodes)
        self._first_mask = None  # host row for a constrained prefill's first-token bitmask (made on first use)
        self.counts = {"requests_served": 0, "requests_failed": 0, "requests_cancelled": 0, "jit_steps": 0,
                       "graph_steps": 0, "prefill_batches": 0, "prefill_batched_sequences": 0}

    # ---- callers (any thread) ----
    def add(self, seq: Sequence) -> None:
        with self.cv:
            self._inbox.append(seq)
            if self.graphs is not None:
                self.graphs.notify_busy()
            self.cv.notify_all()

    def next_delta(self, seq: Sequence) -> StreamDelta | None:
        """The sequence's next delta; drives the loop while no other caller does. None once the sequence has ended
        without one (cancelled, e.g. closed from another thread)."""
        while True:
            with self.cv:
                while not seq.outbox:
                    if seq.error is not None:
                        raise seq.error
                    if seq.finished:
                        return None
                    if not self._driving:
                        self._driving = True
                        break
                    self.cv.wait()
                else:
                    return seq.outbox.popleft()
            self._drive(self.step)

    def cancel(self, seq: Sequence, wait: bool = True) -> None:
        """Stop `seq`: its blocks and row are free when this returns. With wait=False (finalizers) it only marks the
        sequence when another caller is driving; that caller's next step frees it."""
        with self.cv:
            if seq.finished:
                return
            seq.cancelled = True
            if self._driving and not wait:
                return
            while self._driving:
                self.cv.wait()
            self._driving = True
        self._drive(lambda: self._cancel_now(seq))

    def drive_until(self, done: Callable[[], bool]) -> None:
        """Run steps until `done()` (called under the lock) is true. While another caller drives, wait for its steps
        instead; `done` must turn true once the sequences it watches finish (for the async front end's thread)."""
        while True:
            with self.cv:
                while not done():
                    if not self._driving:
                        self._driving = True
                        break
                    self.cv.wait()
                else:
                    return
            self._drive(self.step)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no request holds (they become free); waits for the driving caller's step.
        Returns how many blocks were dropped."""
        with self.cv:
            while self._driving:
                self.cv.wait()
            self._driving = True
        before = self.sched.blocks.num_cached
        self._drive(self.sched.blocks.allocator.drop_cached)
        return before - self.sched.blocks.num_cached

    def mark_cancelled(self, seq: Sequence) -> None:
        """Cancel `seq` without driving or waiting (safe on an event loop): the next step, whoever runs it, frees its
        row and blocks."""
        with self.cv:
            if not seq.finished:
                seq.cancelled = True
            self.cv.notify_all()

    def _drive(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # the step broke (not one request's input): fail what it was serving, go on
            logger.exception("engine step failed; failing the requests in it")
            self._fail_all(exc)
        finally:
            with self.cv:
                self._driving = False
                if self.graphs is not None and not self.sched.has_work() and not self._inbox:
                    self.graphs.notify_idle()
                self.cv.notify_all()

    # ---- the step (the driving thread only) ----
    def step(self) -> None:
        """Admit and prefill, decode every running row, then read back all but the newest step."""
        sched = self.sched
        with self.cv:
            for seq in self._inbox:
                sched.add(seq)
            self._inbox.clear()
        for seq in sched.drop_cancelled_waiting():
            self.counts["requests_cancelled"] += 1
        for seq in [s for s in sched.running if s.cancelled]:
            self._retire(seq, "requests_cancelled")
        plan = None
        with self.scope:
            self._apply(sched.compact())
            decoding = any(not s.in_prefill for s in sched.running)
            sched.admit()
            self._prefills(decoding)
            plan, _ = sched.plan_decode()
            if plan is not None:
                self._apply(plan.row_ops)
                entries = [(s, s.epoch, s.row) for s in plan.rows if not s.in_prefill]
                if any(s.grammar is not None for s, _, _ in entries):
                    self._decode_constrained(plan.num_rows, plan.table_updates, entries)
                else:
                    self._count(self.runner.decode(plan.num_rows, plan.table_updates))
                    self._push(entries)
                for seq in plan.rows:
                    if seq.in_prefill:
                        continue
                    if seq.wants_tokens:
                        seq.num_enqueued += 1
                    seq.kv_len += 1
        keep = 1 if self.lookahead and plan is not None else 0
        while len(self.inflight) > keep:
            self._read_one()
        if not sched.has_work():
            self._drain()
        elif self.graphs is not None:  # sustained load: a graph that waited too long for an idle window, now
            self.graphs.capture_if_starved()

    def _decode_constrained(self, rows: int, updates: list[tuple[int, int, int]],
                            entries: list[tuple[Sequence, int, int]]) -> None:
        """A split decode step: forward, read every earlier step (the matchers catch up), masks, sample."""
        self._count(self.runner.decode_forward(rows, updates))
        self._drain()
        masks = self.runner.mask_slot()
        live = [(s, row) for s, epoch, row in entries
                if s.matcher is not None and s.status is Status.RUNNING and s.epoch == epoch and not s.cancelled]
        filled = self._fill_masks(live, masks.bitmask)
        for row in filled:
            masks.flags[row] = 1
        self.runner.decode_sample(rows, masks, max(filled) + 1 if filled else 0)
        self._push(entries)

    def _fill_masks(self, live: list[tuple[Sequence, int]], bitmask: Any) -> list[int]:
        """Each live constrained row's next-token mask into its row of `bitmask`; the rows filled. A matcher that
        raises or ends in its error state (e.g. a grammar too complex for llguidance's per-step limits) fails its
        sequence only."""
        done = False
        if len(live) > 1:
            try:
                fill_bitmasks([(s.matcher, row) for s, row in live], bitmask)
                done = True
            except Exception:  # find the culprit row by row
                logger.debug("batched mask fill failed; filling row by row", exc_info=True)
        filled = []
        for seq, row in live:
            try:
                if not done:
                    seq.matcher.fill_bitmask(bitmask[row])
                if seq.matcher.error() is not None:
                    raise ValueError(seq.matcher.error())
                filled.append(row)
            except Exception as exc:
                self._fail(seq, HybridEngineError(f"{seq.request_id}: grammar mask failed: {exc}"))
        return filled

    def _prefills(self, decoding: bool) -> None:
        """Prompts of admitted sequences: short ones (or any while nothing decodes) whole, through the bucket graphs,
        after a prefix-cache hit from the first uncached position; a long one beside running decodes in chunks of
        chunk_size, one chunk per step, so that no decode step waits for more than one chunk. With batched_prefill,
        two or more whole unconstrained prompts run as one forward pass (groups of at most chunk_size new tokens
        while others decode)."""
        chunked, whole = False, []
        for seq in self.sched.running:
            if not seq.in_prefill:
                continue
            rest = seq.prefill_len - seq.prefilled
            if seq.prefilled == seq.cache_hit and (rest <= self.chunk_size or not decoding):
                whole.append(seq)
            elif not chunked:
                self._prefill_chunk(seq)
                chunked = True
        together = [s for s in whole if s.grammar is None] if self.batched_prefill else []
        for group in self._groups(together, self.chunk_size if decoding else None):
            self._prefill_batch(group)
        for seq in whole:
            if seq.in_prefill:  # not in a batch (alone, constrained, or batching off)
                self._prefill_rest(seq)

    @staticmethod
    def _groups(seqs: list[Sequence], budget: int | None) -> list[list[Sequence]]:
        """Consecutive groups of at least two sequences whose new tokens stay within `budget` (None: no limit)."""
        groups, cur, used = [], [], 0
        for seq in seqs:
            n = seq.prefill_len - seq.prefilled
            if cur and budget is not None and used + n > budget:
                groups.append(cur)
                cur, used = [], 0
            cur.append(seq)
            used += n
        groups.append(cur)
        return [g for g in groups if len(g) >= 2]

    def _prefill_batch(self, group: list[Sequence]) -> None:
        from ..runtime.runner import PrefillItem

        items = [PrefillItem(s.prefill_ids[s.prefilled:], s.prefilled, s.row, s.block_table, s.params, s.seed,
                             len(s.output_ids)) for s in group]
        self._count(self.runner.prefill_batch(items))
        self.counts["prefill_batches"] += 1
        self.counts["prefill_batched_sequences"] += len(group)
        self._push([(s, s.epoch, s.row) for s in group])
        for s in group:
            self._prefilled(s, s.prefill_len, push=False)

    def _prefill_rest(self, seq: Sequence) -> None:
        ids, start = seq.prefill_ids, seq.prefilled
        ok, mask = self._prefill_mask(seq)
        if not ok:
            return
        args = (seq.row, seq.block_table, seq.params, seq.seed, len(seq.output_ids), mask)
        if start == 0:
            self._count(self.runner.prefill(ids, *args))
        else:
            self._count(self.runner.prefill_from(ids[start:], start, *args))
        self._prefilled(seq, len(ids))

    def _prefill_chunk(self, seq: Sequence) -> None:
        start = seq.prefilled
        end = min(seq.prefill_len, start + self.chunk_size)
        ids = seq.prefill_ids[start:end]
        final = end == seq.prefill_len
        ok, mask = self._prefill_mask(seq) if final else (True, None)
        if not ok:
            return
        self._count(self.runner.prefill_chunk(ids, start, seq.row, seq.block_table, seq.params, seq.seed,
                                              len(seq.output_ids), final, mask))
        self.chunks += 1
        if final:
            self._prefilled(seq, end)
        else:
            seq.prefilled = end
            self.sched.cache_written(seq, end)

    def _prefilled(self, seq: Sequence, length: int, push: bool = True) -> None:
        if push:
            self._push([(seq, seq.epoch, seq.row)])
        seq.prefilled = length
        seq.num_enqueued, seq.kv_len = len(seq.output_ids) + 1, length
        self.sched.cache_written(seq, length)  # later steps run after this one on the stream: they see its KV

    def _prefill_mask(self, seq: Sequence) -> tuple[bool, Any]:
        """(ok, mask): the first token's bitmask of a constrained sequence (None: unconstrained), from a matcher
        advanced over the tokens it already has (a recomputed preempted sequence); not ok if that failed (the
        sequence is failed)."""
        if seq.grammar is None:
            return True, None
        try:
            matcher = seq.matcher
            if matcher is None or matcher.num_accepted != len(seq.output_ids):
                matcher = seq.matcher = seq.grammar.matcher()
                if not matcher.accept_tokens(seq.output_ids):
                    raise ValueError(f"its own output was refused: {matcher.error()}")
            if self._first_mask is None:
                self._first_mask = torch.zeros(self.runner.mask_words, dtype=torch.int32)
            matcher.fill_bitmask(self._first_mask)
            if matcher.error() is not None:
                raise ValueError(matcher.error())
        except Exception as exc:
            self._fail(seq, HybridEngineError(f"{seq.request_id}: grammar failed: {exc}"))
            return False, None
        return True, self._first_mask

    def _apply(self, ops: RowOps | None) -> None:
        if ops is None:
            return
        for src, dst in ops.moves:
            self.runner.move_row(src, dst)
        if ops.reset is not None:
            self.runner.reset_rows(*ops.reset)

    def _push(self, entries: list[tuple[Sequence, int, int]]) -> None:
        self.reader.push()
        self.inflight.append(entries)

    def _count(self, path: str) -> None:
        self.counts["jit_steps" if path == "jit" else "graph_steps"] += 1

    def _read_one(self) -> None:
        entries = self.inflight.popleft()
        tokens = self.reader.pop()
        for seq, epoch, row in entries:
            if seq.status is Status.RUNNING and seq.epoch == epoch and not seq.cancelled:
                self._accept(seq, tokens[row])

    def _accept(self, seq: Sequence, tok: int) -> None:
        seq.output_ids.append(tok)
        self.sched.cache_written(seq, seq.kv_len)
        n, now = len(seq.output_ids), time.perf_counter()
        if n == 1:
            seq.first_token_at = now
        finish, stop_reason = self._finish_reason(seq, tok, n)
        if finish is None and seq.matcher is not None:
            try:
                if not seq.matcher.accept(tok):
                    raise ValueError(f"token {tok} refused: {seq.matcher.error()}")
            except Exception as exc:
                return self._fail(seq, HybridEngineError(f"{seq.request_id}: grammar failed: {exc}"))
            if seq.matcher.is_terminated():  # the grammar is complete: nothing more may follow
                finish = "stop"
        text = seq.stops.feed(seq.detok.step(tok))
        if seq.stops.matched is not None:
            finish, stop_reason = "stop", seq.stops.matched
        elif finish is not None:
            text += seq.stops.flush()
        if finish is None:
            return self._deliver(seq, StreamDelta(text, [tok]))
        seq.finish_reason, seq.stop_reason = finish, stop_reason
        ttft, e2e = seq.first_token_at - seq.arrival, now - seq.arrival
        metrics = RequestMetrics(ttft, (e2e - ttft) / (n - 1) if n > 1 else 0.0, e2e, len(seq.prompt_ids), n,
                                 seq.num_cached_tokens)
        self._retire(seq, "requests_served")
        self._deliver(seq, StreamDelta(text, [tok], finish, metrics, stop_reason))

    def _finish_reason(self, seq: Sequence, tok: int, n: int) -> tuple[str | None, int | None]:
        params = seq.params
        if tok in params.stop_token_ids:
            return "stop", tok
        if not params.ignore_eos and tok in self.eos_token_ids:
            return "stop", None
        return ("length" if n >= params.max_tokens else None), None

    def _retire(self, seq: Sequence, counter: str) -> None:
        self.sched.finish(seq)
        self.counts[counter] += 1

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        """Fail one sequence (its row and blocks are freed at once); the others go on."""
        logger.warning("request failed: %s", exc)
        self._retire(seq, "requests_failed")
        seq.error = exc
        with self.cv:
            self.cv.notify_all()
        if seq.consumer is not None:
            seq.consumer(exc)

    def _drain(self) -> None:
        while self.inflight:
            self._read_one()

    def _deliver(self, seq: Sequence, delta: StreamDelta) -> None:
        with self.cv:
            seq.outbox.append(delta)
            self.cv.notify_all()
        if seq.consumer is not None:
            seq.consumer(delta)

    def _cancel_now(self, seq: Sequence) -> None:
        with self.cv:
            if seq in self._inbox:
                self._inbox.remove(seq)
        if not seq.finished:
            self._retire(seq, "requests_cancelled")
        seq.outbox.clear()
        if not self.sched.has_work():
            self._drain()

    def _fail_all(self, exc: BaseException) -> None:
        self.inflight.clear()
        self.reader.reset()
        with self.cv:
            victims = self.sched.running + list(self.sched.waiting) + self._inbox
            self._inbox.clear()
        for seq in victims:
            if not seq.finished:
                self.sched.finish(seq)
                seq.error = exc
                self.counts["requests_failed"] += 1
                if seq.consumer is not None:
                    seq.consumer(exc)
        self.sched.blocks.allocator.drop_cached()  # KV the failed step may have left half written is not reused
