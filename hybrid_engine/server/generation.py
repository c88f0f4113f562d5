"""Per-request serving logic: admission to the engine queue, waiting for events, JSON or SSE answers."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hybrid_engine.sampling_params import SamplingParams
from hybrid_engine.server.protocol import (
    SSE_DONE, APIError, ChunkWriter, bad_value, chat_body, completion_body, new_id, sse, usage)
from hybrid_engine.server.worker import EngineWorker, Event, Job, QueueFull
from hybrid_engine.tools.plan import ChatPlan
from hybrid_engine.tools.streaming import StreamDelta


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class ServerState:
    """What the route handlers share: the LLM, its worker, the served model name, the chat template override and
    the tool-call syntax."""

    def __init__(self, llm: Any, model_name: str, max_queue: int, chat_template: str | None = None,
                 tool_call_parser: str = "hermes") -> None:
        self.llm = llm
        self.model_name = model_name
        self.chat_template = chat_template
        self.tool_call_parser = tool_call_parser
        self.worker = EngineWorker(llm, max_queue)
        self.metrics = self.worker.metrics
        self.started = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def max_model_len(self) -> int | None:
        return getattr(self.llm, "max_model_len", None) or getattr(self.llm.config, "max_model_len", None)

    async def count_prompt_tokens(self, prompt: str | dict[str, list[int]]) -> int | None:
        """Tokenize off the event loop, to reject a too-long prompt before it takes a queue slot."""
        if isinstance(prompt, dict):
            return len(prompt["prompt_token_ids"])
        tokenizer = getattr(self.llm, "tokenizer", None)
        if tokenizer is None or not prompt:
            return None  # the engine's own validation answers
        return len((await asyncio.to_thread(tokenizer, prompt))["input_ids"])

    def check_length(self, prompt_tokens: int | None, max_tokens: int, param: str) -> None:
        limit = self.max_model_len()
        if prompt_tokens is None or limit is None or prompt_tokens + max_tokens <= limit:
            return
        raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                            f"{prompt_tokens + max_tokens} exceeds max_model_len={limit}; shorten the prompt or "
                            f"lower max_tokens", param=param, code="context_length_exceeded")

    def admit(self, prompt: Any, params: SamplingParams) -> Job:
        if not self.worker.alive:
            raise APIError(503, "the engine worker is not running; see the server log", code="worker_dead")
        job = Job(prompt, params)
        try:
            self.worker.submit(job)
        except QueueFull as exc:
            raise APIError(429, f"the request queue is full ({self.worker.max_queue} waiting); retry later",
                           code="queue_full", headers={"Retry-After": str(exc.retry_after_s)}) from None
        self.metrics.in_flight.inc()
        return job

    def release(self, job: Job, endpoint: str, status: int) -> None:
        if not job.released:
            job.released = True
            job.cancel()  # no-op when the engine already finished it
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()


def engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, ValueError):
        error = bad_value(exc)
        if "max_model_len" in error.message:
            error.code = "context_length_exceeded"
        return error
    return APIError(500, f"the engine failed on this request: {type(exc).__name__}: {exc}", code="engine_error")


def _cancelled() -> APIError:
    return APIError(503, "the request was cancelled before it finished: the server is shutting down",
                    code="shutting_down")


async def next_event(job: Job, disconnect: asyncio.Future[Any] | None) -> Event:
    """The job's next event, or ClientGone if the client disconnects first."""
    get = asyncio.ensure_future(job.events.get())
    if disconnect is None:
        return await get
    done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    raise ClientGone


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class JobStream(StreamingResponse):
    """An SSE response that cancels its job however it ends: finished, client gone, or server error."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _chat_chunks(writer: ChunkWriter, *parsed: StreamDelta | None) -> list[str]:
    """The SSE events for parsed stream pieces: content, then tool-call deltas."""
    out = []
    for piece in parsed:
        if piece is None:
            continue
        if piece.content:
            out.append(writer.text(piece.content))
        if piece.tool_calls:
            out.append(writer.tool_calls(piece.tool_calls))
    return out


class Generation:
    """One admitted generation request: waits for its first event, then answers JSON or SSE."""

    def __init__(self, state: ServerState, request: Request, endpoint: str, chat: bool,
                 plan: ChatPlan | None = None) -> None:
        self.state, self.request, self.endpoint, self.chat = state, request, endpoint, chat
        self.plan = plan or ChatPlan()  # no tools: the reply is all content
        self.rid = new_id("chatcmpl" if chat else "cmpl")
        self.text: list[str] = []
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.status = 499  # a stream that ends before [DONE] lost its client

    async def respond(self, prompt: Any, params: SamplingParams, stream: bool, include_usage: bool) -> Response:
        job = self.state.admit(prompt, params)
        watcher = asyncio.ensure_future(wait_for_disconnect(self.request))
        status = 499
        try:
            first = await self._first(job, watcher)
            if stream:
                status = 0  # the stream reports its own status when it closes
                return JobStream(self._sse(job, first, include_usage), lambda: self._release(job, self.status))
            response = await self._collect(job, first, watcher)
            status = 200
            return response
        except ClientGone:
            return Response(status_code=499)
        except APIError as exc:
            status = exc.status
            raise
        finally:
            watcher.cancel()
            if status:
                self._release(job, status)

    def _release(self, job: Job, status: int) -> None:
        self.state.release(job, self.endpoint, status)

    async def _first(self, job: Job, watcher: asyncio.Future[Any]) -> Event:
        event = await next_event(job, watcher)
        if event.kind == "error":
            raise engine_error(event.error or RuntimeError("unknown engine error"))
        if event.kind == "end":  # dropped from the queue unstarted: only happens at shutdown
            raise _cancelled()
        return event

    def _take(self, event: Event) -> str:
        delta = event.delta
        if delta is None:
            return ""
        self.completion_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish = delta.finish_reason
            if delta.metrics is not None:
                self.prompt_tokens = delta.metrics.prompt_tokens
                self.cached_tokens = delta.metrics.cached_tokens
                self.completion_tokens = delta.metrics.generated_tokens or self.completion_tokens
        return delta.text

    async def _collect(self, job: Job, event: Event, watcher: asyncio.Future[Any]) -> JSONResponse:
        while event.kind == "delta":
            self.text.append(self._take(event))
            event = await next_event(job, watcher)
        if event.kind == "error":
            raise engine_error(event.error or RuntimeError("unknown engine error"))
        if self.finish is None:
            raise _cancelled()
        use = usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        text = "".join(self.text)
        if not self.chat:
            return JSONResponse(completion_body(self.rid, self.state.model_name, text, self.finish, use))
        content, calls = self.plan.parse(text)
        finish = "tool_calls" if calls else self.finish
        return JSONResponse(chat_body(self.rid, self.state.model_name, content, finish, use, calls))

    async def _sse(self, job: Job, event: Event, include_usage: bool) -> AsyncIterator[str]:
        writer = ChunkWriter(self.rid, self.state.model_name, self.chat, include_usage)
        parser = self.plan.stream_parser()
        if self.chat:
            yield writer.role()
        while event.kind == "delta":
            text = self._take(event)
            finish = event.delta.finish_reason if event.delta else None
            if self.chat:
                for chunk in _chat_chunks(writer, parser.feed(text) if text else None,
                                          parser.finish() if finish is not None else None):
                    yield chunk
                if finish is not None:
                    yield writer.text("", "tool_calls" if parser.tool_calls else finish)
            elif text or finish is not None:
                yield writer.text(text, finish)
            event = await job.events.get()
        if event.kind == "error":
            yield sse(engine_error(event.error or RuntimeError("unknown engine error")).body())
        elif self.finish is None:
            yield sse(_cancelled().body())
        elif include_usage:
            yield writer.usage(usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens))
        yield SSE_DONE
        self.status = 200 if event.kind == "end" else 500
