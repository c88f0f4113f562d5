"""OpenAI-compatible HTTP server: `hybrid-engine serve` / `python -m hybrid_engine.server`.

Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON or SSE streaming), GET /v1/models, /health,
/metrics (Prometheus). One worker thread runs the engine (batch size 1) from a bounded FIFO queue; past the bound
the server answers 429 with Retry-After. A client that disconnects cancels its request and frees its KV blocks.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from hybrid_engine.errors import require

require("fastapi", "server")
require("uvicorn", "server")
require("prometheus_client", "server")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from hybrid_engine.sampling_params import SamplingParams  # noqa: E402
from hybrid_engine.server_protocol import (  # noqa: E402
    SSE_DONE, APIError, ChatCompletionRequest, ChunkWriter, CompletionRequest, bad_value, chat_body,
    completion_body, new_id, parse_request, sse, usage)
from hybrid_engine.server_worker import EngineWorker, Event, Job, QueueFull  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CAPTURE_KEYS = ("graphs_captured", "graphs_pending", "graphs_failed", "graph_pool_bytes")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class ServerState:
    """What the route handlers share: the LLM, its worker, the served model name."""

    def __init__(self, llm: Any, model_name: str, max_queue: int) -> None:
        self.llm = llm
        self.model_name = model_name
        self.worker = EngineWorker(llm, max_queue)
        self.metrics = self.worker.metrics
        self.started = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def max_model_len(self) -> int | None:
        return getattr(self.llm, "max_model_len", None) or getattr(self.llm.config, "max_model_len", None)

    def admit(self, prompt: Any, params: SamplingParams) -> Job:
        job = Job(prompt, params, asyncio.get_running_loop())
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


class Generation:
    """One admitted generation request: waits for its first event, then answers JSON or SSE."""

    def __init__(self, state: ServerState, request: Request, endpoint: str, chat: bool) -> None:
        self.state, self.request, self.endpoint, self.chat = state, request, endpoint, chat
        self.rid = new_id("chatcmpl" if chat else "cmpl")
        self.text: list[str] = []
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
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
        build = chat_body if self.chat else completion_body
        use = usage(self.prompt_tokens, self.completion_tokens)
        return JSONResponse(build(self.rid, self.state.model_name, "".join(self.text), self.finish, use))

    async def _sse(self, job: Job, event: Event, include_usage: bool) -> AsyncIterator[str]:
        writer = ChunkWriter(self.rid, self.state.model_name, self.chat, include_usage)
        if self.chat:
            yield writer.role()
        while event.kind == "delta":
            text = self._take(event)
            finish = event.delta.finish_reason if event.delta else None
            if self.chat and text:
                yield writer.text(text)
            if finish is not None or (text and not self.chat):
                yield writer.text("" if self.chat else text, finish)
            event = await job.events.get()
        if event.kind == "error":
            yield sse(engine_error(event.error or RuntimeError("unknown engine error")).body())
        elif self.finish is None:
            yield sse(_cancelled().body())
        elif include_usage:
            yield writer.usage(usage(self.prompt_tokens, self.completion_tokens))
        yield SSE_DONE
        self.status = 200 if event.kind == "end" else 500


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = parse_request(CompletionRequest, await request.body())
    state.check_model(req.model)
    prompt = req.engine_prompt()
    params = req.sampling_params(req.resolved_max_tokens() or DEFAULT_COMPLETION_MAX_TOKENS)
    gen = Generation(state, request, "completions", chat=False)
    return await gen.respond(prompt, params, req.stream, req.include_usage)


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = parse_request(ChatCompletionRequest, await request.body())
    state.check_model(req.model)
    try:
        ids = await asyncio.to_thread(state.llm.encode_chat, req.template_messages())
    except ValueError as exc:
        raise bad_value(exc) from exc
    max_tokens = req.resolved_max_tokens() or _room_left(state, len(ids))
    params = req.sampling_params(max_tokens)
    gen = Generation(state, request, "chat", chat=True)
    return await gen.respond({"prompt_token_ids": ids}, params, req.stream, req.include_usage)


def _room_left(state: ServerState, prompt_len: int) -> int:
    """OpenAI's chat default: generate up to the context length."""
    limit = state.max_model_len()
    if limit is None:
        return 256
    if prompt_len >= limit:
        raise APIError(400, f"prompt is {prompt_len} tokens; max_model_len={limit} leaves no room to generate",
                       param="messages", code="context_length_exceeded")
    return limit - prompt_len


async def models(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    card = {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "hybrid_engine",
            "max_model_len": state.max_model_len()}
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    stats = await asyncio.to_thread(state.llm.stats)
    ok = state.worker.alive
    body = {
        "status": "ok" if ok else "worker_dead",
        "model": state.model_name,
        "capture": {"policy": stats.get("capture", getattr(state.llm.config, "capture", None)),
                    **{k: stats.get(k) for k in CAPTURE_KEYS}},
        "queue": {"running": state.worker.running(), "queued": state.worker.queued(),
                  "max_queue": state.worker.max_queue},
        "kv_blocks_free": stats.get("kv_blocks_free"),
        "kv_blocks_total": stats.get("kv_blocks_total"),
    }
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    from prometheus_client import CONTENT_TYPE_LATEST

    payload = await asyncio.to_thread(state.metrics.render)
    return Response(payload, media_type=CONTENT_TYPE_LATEST)


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return _error_response(exc)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request handler", exc_info=exc)
        return _error_response(APIError(500, f"internal server error: {type(exc).__name__}: {exc}"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def create_app(llm: Any, *, served_model_name: str | None = None, max_queue: int = 64) -> FastAPI:
    """A FastAPI app serving `llm`. The engine worker starts with the app's lifespan and stops with it."""
    name = served_model_name or _default_model_name(llm)
    state = ServerState(llm, name, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        yield
        state.worker.stop()

    app = FastAPI(title="hybrid_engine", summary="OpenAI-compatible server", lifespan=lifespan)
    app.state.server = state
    _install_error_handlers(app)
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app


def _default_model_name(llm: Any) -> str:
    model = getattr(llm.config, "model", None)
    return model if isinstance(model, str) else type(model).__name__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid-engine serve", description="OpenAI-compatible HTTP server")
    p.add_argument("--model", default=None, help="checkpoint dir or preset (default: tiny-llama on CPU, "
                                                  "llama-2-7b-shape on GPU)")
    p.add_argument("--served-model-name", default=None, help="name clients pass as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for the engine before 429")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--capture", default=None, choices=["idle", "eager", "off"], help="CUDA-graph capture policy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    return p


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig keywords from the CLI; options left unset keep the engine's defaults."""
    names = ("dtype", "device", "max_model_len", "num_kv_blocks", "block_size", "attention_backend", "capture",
             "seed")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def main(argv: list[str] | None = None) -> int:
    """Load the model, then serve until SIGINT/SIGTERM. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.max_queue < 1:
        print(f"error: --max-queue={args.max_queue} must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # the server owns the process: its --log-level wins over the CLI's default
    import torch
    import uvicorn

    from hybrid_engine import LLM
    from hybrid_engine.errors import HybridEngineError

    model = args.model or ("llama-2-7b-shape" if torch.cuda.is_available() else "tiny-llama")
    try:
        llm = LLM(model, **engine_kwargs(args))
    except (ValueError, TypeError, HybridEngineError) as exc:
        print(f"error: could not load {model!r}: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(llm, served_model_name=args.served_model_name or model, max_queue=args.max_queue)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                access_log=not args.no_access_log, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run()
    finally:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
