"""Admission to the engine: a bounded FIFO queue in front of up to max_num_seqs running requests, all on the event
loop (no worker threads).

An HTTP handler submits a `Job`; its task waits for a slot (FIFO), then streams the request through the engine's
async API (`llm.astream_deltas`) and hands every delta to the handler through the job's queue. The engine batches
the running requests. A handler whose client went away calls `job.cancel()`: the task is cancelled, which closes the
engine stream, cancelling the request and freeing its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from hybrid_engine.outputs import StreamDelta
from hybrid_engine.sampling_params import SamplingParams
from hybrid_engine.server.metrics import ServerMetrics

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
    """One generation request travelling from an HTTP handler to the engine and back (event loop only)."""

    def __init__(self, prompt: Any, params: SamplingParams) -> None:
        self.prompt = prompt
        self.params = params
        self.arrived = time.perf_counter()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.slot: asyncio.Future[None] | None = None  # resolved when a queued job is handed a slot
        self.holds_slot = False
        self.done = False  # its last event is out
        self.released = False

    def cancel(self) -> None:
        """Stop the job (client gone, server stopping); a no-op once its last event is out."""
        if not self.done and self.task is not None:
            self.task.cancel()

    def emit(self, event: Event) -> None:
        if event.kind != "delta" or event.delta is None or event.delta.finish_reason is not None:
            self.done = True
        self.events.put_nowait(event)


class EngineWorker:
    """Runs at most `concurrency` jobs at once (default: the engine's max_num_seqs) and queues up to `max_queue`
    more; everything else only reads llm.stats()."""

    def __init__(self, llm: Any, max_queue: int, concurrency: int | None = None) -> None:
        if not (isinstance(max_queue, int) and max_queue >= 1):
            raise ValueError(f"max_queue={max_queue!r} must be an int >= 1")
        self.llm = llm
        self.max_queue = max_queue
        self.slots = concurrency or getattr(getattr(llm, "config", None), "max_num_seqs", 1)
        self._waiting: deque[Job] = deque()
        self._running = 0
        self._jobs: set[Job] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._mean_e2e_s = 1.0
        self.metrics = ServerMetrics(llm.stats, self.queued, self.running)

    def queued(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return self._loop is not None and not self._stopped

    def start(self) -> None:
        """Bind to the running event loop (the app's lifespan calls this)."""
        self._loop, self._stopped = asyncio.get_running_loop(), False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel the running and queued jobs (each answers as cancelled); callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _running_loop() is loop:
            self._stop_now()
            return
        asyncio.run_coroutine_threadsafe(self._stop_async(), loop).result(timeout_s)

    async def _stop_async(self) -> None:
        self._stop_now()

    def _stop_now(self) -> None:
        self._stopped = True
        for job in list(self._jobs):
            job.cancel()

    def submit(self, job: Job) -> None:
        """Start the job, queue it, or raise QueueFull (with a Retry-After estimate). On the event loop."""
        loop = asyncio.get_running_loop()
        if self._running < self.slots:
            self._running += 1
            job.holds_slot = True
        elif len(self._waiting) < self.max_queue:
            job.slot = loop.create_future()
            self._waiting.append(job)
        else:
            self.metrics.rejected.inc()
            raise QueueFull(max(1, round((len(self._waiting) + self._running) * self._mean_e2e_s)))
        self._jobs.add(job)
        job.task = loop.create_task(self._serve(job))
        job.task.add_done_callback(lambda _: self._finished(job))

    async def _serve(self, job: Job) -> None:
        """Wait for a slot, then stream; a cancellation propagates and `_finished` answers the job."""
        try:
            if job.slot is not None:
                await job.slot
            self.metrics.queue_wait.observe(time.perf_counter() - job.arrived)
            await self._generate(job)
        except ValueError as exc:  # the engine's verdict on a bad request: a 400 if nothing was sent yet
            job.emit(Event("error", error=exc))
        except Exception as exc:
            logger.exception("engine failed on a request; the server keeps serving")
            job.emit(Event("error", error=exc))
        else:
            job.emit(Event("end"))

    def _finished(self, job: Job) -> None:
        """The job's task is over, however it ended (even cancelled before it started): free what it held."""
        self._jobs.discard(job)
        if job in self._waiting:
            self._waiting.remove(job)
        if job.holds_slot:
            job.holds_slot = False
            self._release_slot()
        if not job.done:  # cancelled: the client went away or the server is stopping
            self.metrics.cancelled.inc()
            job.emit(Event("end"))

    def _release_slot(self) -> None:
        """Hand the slot to the oldest waiting job, or free it."""
        while self._waiting:
            job = self._waiting.popleft()
            if job.slot is not None and not job.slot.done():
                job.holds_slot = True
                job.slot.set_result(None)
                return
        self._running -= 1

    async def _generate(self, job: Job) -> None:
        stream = self.llm.astream_deltas(job.prompt, job.params)
        last = None
        try:
            async for delta in stream:
                now = time.perf_counter()
                self._observe(delta, job, last, now)
                last = now
                job.emit(Event("delta", delta=delta))
        finally:
            await stream.aclose()  # unfinished: the engine cancels the request and frees its KV blocks

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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
