"""The engine workers: threads that take requests from a bounded FIFO queue, each streaming one request at a time.

HTTP handlers run on the asyncio loop. A handler submits a `Job`; a worker runs `llm.stream_deltas` for it and
hands every delta back to the loop through the job's asyncio queue. The engine batches the workers' concurrent
requests (up to its max_num_seqs). A handler whose client went away calls `job.cancel()`; the worker then closes
the engine's stream at the next token, which cancels the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from hybrid_engine.outputs import StreamDelta
from hybrid_engine.sampling_params import SamplingParams
from hybrid_engine.server_metrics import ServerMetrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The FIFO queue is at its bound; the caller should answer 429."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class Event:
    kind: Literal["delta", "error", "end"]
    delta: StreamDelta | None = None
    error: BaseException | None = None


class Job:
    """One generation request travelling from an HTTP handler to the worker and back."""

    def __init__(self, prompt: Any, params: SamplingParams, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt = prompt
        self.params = params
        self.arrived = time.perf_counter()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()
        self.released = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()


class EngineWorker:
    """Owns the LLM's generation calls; everything else only reads llm.stats(). `concurrency` serving threads
    (default: the engine's max_num_seqs) each stream one job at a time; the engine batches their requests."""

    def __init__(self, llm: Any, max_queue: int, concurrency: int | None = None) -> None:
        if not (isinstance(max_queue, int) and max_queue >= 1):
            raise ValueError(f"max_queue={max_queue!r} must be an int >= 1")
        self.llm = llm
        self.max_queue = max_queue
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._handoff = threading.Lock()
        n = concurrency or getattr(getattr(llm, "config", None), "max_num_seqs", 1)
        self._threads = [threading.Thread(target=self._loop, name=f"hybrid-engine-worker-{i}", daemon=True)
                         for i in range(n)]
        self._running = 0
        self._current: set[Job] = set()
        self._mean_e2e_s = 1.0
        self.metrics = ServerMetrics(llm.stats, self.queued, self.running)

    def queued(self) -> int:
        return self._queue.qsize()

    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def start(self) -> None:
        for t in self._threads:
            if not t.is_alive():
                t.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel the running requests, answer the queued ones, join the threads."""
        with self._handoff:  # either a loop sees the stop flag, or this sees the job it took from the queue
            self._stop.set()
            current = list(self._current)
        for job in current:
            job.cancel()
        while True:
            try:
                self._queue.get_nowait().emit(Event("end"))
            except queue.Empty:
                break
        for t in self._threads:
            if t.is_alive():
                t.join(timeout_s)

    def submit(self, job: Job) -> None:
        """Queue a job or raise QueueFull (with a Retry-After estimate)."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.rejected.inc()
            waiting = self._queue.qsize() + self._running
            raise QueueFull(max(1, round(waiting * self._mean_e2e_s))) from None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._handoff:
                stopping = self._stop.is_set()
                if not (job.cancelled or stopping):
                    self._running += 1
                    self._current.add(job)
            if job.cancelled or stopping:  # taken from the queue as stop() drained it: answered like the queued
                self.metrics.cancelled.inc()
                job.emit(Event("end"))
                continue
            try:
                self._serve(job)
            finally:
                with self._handoff:
                    self._running -= 1
                    self._current.discard(job)

    def _serve(self, job: Job) -> None:
        self.metrics.queue_wait.observe(time.perf_counter() - job.arrived)
        try:
            self._generate(job)
        except ValueError as exc:  # the engine's verdict on a bad request: a 400 if nothing was sent yet
            job.emit(Event("error", error=exc))
        except Exception as exc:
            logger.exception("engine failed on a request; the server keeps serving")
            job.emit(Event("error", error=exc))
        else:
            job.emit(Event("end"))

    def _generate(self, job: Job) -> None:
        stream = self.llm.stream_deltas(job.prompt, job.params)
        last = None
        try:
            for delta in stream:
                now = time.perf_counter()
                self._observe(delta, job, last, now)
                last = now
                job.emit(Event("delta", delta=delta))
                if job.cancelled:
                    self.metrics.cancelled.inc()
                    break
        finally:
            stream.close()  # on cancel: the engine cancels the request and frees its KV blocks

    def _observe(self, delta: StreamDelta, job: Job, last: float | None, now: float) -> None:
        m = self.metrics
        n = len(delta.token_ids)
        if last is None:
            m.ttft.observe(now - job.arrived)
        else:
            for _ in range(n):
                m.token_latency.observe((now - last) / n)
        m.generation_tokens.inc(len(delta.token_ids))
        if delta.finish_reason is not None:
            e2e = now - job.arrived
            m.e2e.observe(e2e)
            self._mean_e2e_s = 0.8 * self._mean_e2e_s + 0.2 * e2e
            if delta.metrics is not None:
                m.prompt_tokens.inc(delta.metrics.prompt_tokens)
