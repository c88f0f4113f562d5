"""The asyncio side of the engine: a driver thread and per-request async streams (`LLM.astream_deltas`, AsyncLLM).

Each request gets an asyncio queue; the step loop hands it every StreamDelta through the sequence's `consumer`, from
whichever thread runs the step, via its event loop's mailbox (one `call_soon_threadsafe` wake-up per batch of
deltas, not per delta). One background thread per engine runs steps
while any async request is unfinished and sleeps on the core's condition variable otherwise; synchronous callers
may drive the same core meanwhile (one driver at a time), and every step serves every running request.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from ..outputs import RequestOutput, StreamDelta
from ..sampling_params import SamplingParams
from .core import EngineCore
from .sequence import Sequence


logger = logging.getLogger(__name__)


class EngineClosed(RuntimeError):
    """The async front end was closed while the request was running."""


class AsyncDriver:
    """The background thread that runs engine steps while any async request is unfinished."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._live: set[Sequence] = set()
        self._thread: threading.Thread | None = None
        self._closing = False

    def submit(self, seq: Sequence) -> None:
        with self.core.cv:  # the thread sees the sequence and the core has it, together
            self._closing = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hybrid-engine-async-driver", daemon=True)
                self._thread.start()
            self._live.add(seq)
            self.core.add(seq)

    def cancel(self, seq: Sequence) -> None:
        self.core.mark_cancelled(seq)

    def close(self, timeout_s: float = 10.0) -> None:
        """Fail the running async requests with EngineClosed and stop the thread (a later request restarts it)."""
        with self.core.cv:
            live, thread, self._closing = list(self._live), self._thread, True
            self.core.cv.notify_all()
        for seq in live:
            self.core.mark_cancelled(seq)
            if seq.consumer is not None:
                seq.consumer(EngineClosed("the engine was closed while this request was running"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self.core.cv:
                while not self._live and not self._closing:
                    self.core.cv.wait()
                if self._closing and not self._live:
                    self._thread = None  # under the lock: a request submitted from now on starts a new thread
                    return
            self.core.drive_until(self._all_finished)

    def _all_finished(self) -> bool:
        """Under the core's lock: forget finished sequences; true when none is left."""
        self._live = {s for s in self._live if not s.finished}
        return not self._live


class _LoopMailbox:
    """Hands items from the driving thread to one event loop's queues with one wake-up per batch, not per item:
    a step that serves 32 streams delivers 32 deltas, and `call_soon_threadsafe` costs a write to the loop's
    self-pipe (a system call, and a wake-up of the loop) each time. Items posted before the loop drains the box ride
    on the same wake-up; order per queue is kept."""

    _boxes: "dict[asyncio.AbstractEventLoop, _LoopMailbox]" = {}
    _boxes_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_LoopMailbox":
        with cls._boxes_lock:
            box = cls._boxes.get(loop)
            if box is None or box.loop.is_closed():
                for dead in [lp for lp in cls._boxes if lp.is_closed()]:
                    del cls._boxes[dead]
                box = cls._boxes[loop] = cls(loop)
            return box

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """Any thread: queue `item` for `queue`; raises RuntimeError if the loop is closed."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
                self._items.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class AsyncRequestStream:
    """Async iterator over one request's StreamDeltas (`async for delta in stream`). `aclose()`, dropping it or
    cancelling the task awaiting it cancels the request and frees its KV blocks at the next step; a failed step's
    exception is raised here."""

    def __init__(self, driver: AsyncDriver, seq: Sequence) -> None:
        self.seq, self._driver, self._done = seq, driver, False
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._done = True
            raise RuntimeError("the async API needs a running event loop (call it from a coroutine); synchronous "
                               "code uses LLM.stream_deltas / LLM.generate") from None
        self._queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()
        self._mailbox = _LoopMailbox.of(self._loop)
        seq.consumer = self._push
        driver.submit(seq)

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    def _push(self, item: StreamDelta | BaseException) -> None:
        """On the driving thread: hand the item to the event loop (the outbox is for synchronous readers only)."""
        self.seq.outbox.clear()
        try:
            self._mailbox.post(self._queue, item)
        except RuntimeError:  # the event loop is closed: nobody will read this request
            self._driver.cancel(self.seq)

    def __aiter__(self) -> "AsyncRequestStream":
        return self

    async def __anext__(self) -> StreamDelta:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # the awaiting task was cancelled
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    def cancel(self) -> None:
        """Cancel the request unless it already finished (never blocks)."""
        if not self._done:
            self._done = True
            self._driver.cancel(self.seq)

    async def aclose(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        self.cancel()


