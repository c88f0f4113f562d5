"""AsyncLLM: the asyncio front end (as vLLM's AsyncLLM), for servers and async frameworks.

Each request gets an asyncio queue; the step loop hands it every StreamDelta through the sequence's `consumer`
(`loop.call_soon_threadsafe`, from whichever thread runs the step). One background thread per front end runs steps
while any of its requests is unfinished and sleeps on the core's condition variable otherwise; synchronous callers
may drive the same core meanwhile (one driver at a time), and every step serves every running request.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence as Seq

from ..outputs import RequestOutput, StreamDelta
from ..sampling_params import SamplingParams
from .core import EngineCore
from .sequence import Sequence

if TYPE_CHECKING:
    from .llm import LLM

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
        seq.consumer = self._push
        driver.submit(seq)

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    def _push(self, item: StreamDelta | BaseException) -> None:
        """On the driving thread: hand the item to the event loop (the outbox is for synchronous readers only)."""
        self.seq.outbox.clear()
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
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


class AsyncLLM:
    """The asyncio front end of an `LLM`: `await generate(...)`, `async for ... in stream(...)`. Pass an LLM, or a
    model and `LLM(...)` keywords to build one. Concurrent requests are batched by the engine.

    >>> engine = AsyncLLM("tiny-llama")
    >>> outs = await engine.generate(["Hello", "Hi"], SamplingParams(max_tokens=8, temperature=0))
    """

    def __init__(self, model: Any = "tiny-llama", **kwargs: Any) -> None:
        from .llm import LLM

        if isinstance(model, LLM):
            if kwargs:
                raise ValueError(f"options {sorted(kwargs)} cannot change an already built LLM; pass them to "
                                 "LLM(...) instead")
            self.llm = model
        else:
            self.llm = LLM(model, **kwargs)
        shared = getattr(self.llm, "aio", None)  # one driver thread per engine, whichever front end asks
        self.driver = shared.driver if shared is not None else AsyncDriver(self.llm.core)

    def stream_deltas(self, prompt: Any, sampling_params: SamplingParams | None = None) -> AsyncRequestStream:
        """StreamDelta per generated token; validates and submits at once (call it inside a running event loop)."""
        return AsyncRequestStream(self.driver, self.llm.sequences([prompt], sampling_params)[0])

    async def stream(self, prompt: Any, sampling_params: SamplingParams | None = None) -> AsyncIterator[str]:
        """Text deltas as tokens are generated; leaving the `async for` early cancels the request."""
        deltas = self.stream_deltas(prompt, sampling_params)
        try:
            async for delta in deltas:
                if delta.text:
                    yield delta.text
        finally:
            deltas.cancel()

    async def generate(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
                       ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; the prompts run together (batched)."""
        from .llm import request_output

        streams = [AsyncRequestStream(self.driver, seq) for seq in self.llm.sequences(prompts, sampling_params)]
        try:
            return [request_output(s.seq, [d async for d in s]) for s in streams]
        finally:
            for s in streams:
                s.cancel()

    async def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Apply the tokenizer's chat template to `messages` and generate the assistant's reply."""
        ids = self.llm.encode_chat(messages)
        return (await self.generate({"prompt_token_ids": ids}, sampling_params))[0]

    def stats(self) -> dict[str, Any]:
        return self.llm.stats()

    def close(self) -> None:
        """Stop the driver thread; requests still running fail with EngineClosed."""
        self.driver.close()
