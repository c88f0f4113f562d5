"""OpenAI-compatible HTTP server: `hybrid-engine serve` / `python -m hybrid_engine.server`.

Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON or SSE streaming), GET /v1/models, /health,
/metrics (Prometheus). Requests run through the engine's async API (AsyncLLM), up to the engine's max_num_seqs at
once, batched by its scheduler; more wait in a bounded FIFO queue, and past the bound the server answers 429 with
Retry-After. A client that disconnects cancels its request and frees its KV blocks.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hybrid_engine.errors import require

require("fastapi", "server")
require("uvicorn", "server")
require("prometheus_client", "server")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from hybrid_engine.server.constraints import completion_constraint, encode_chat, plan_chat  # noqa: E402
from hybrid_engine.server.generation import Generation, ServerState  # noqa: E402
from hybrid_engine.server.limits import (  # noqa: E402
    DEFAULT_MAX_REQUEST_BYTES, RequestLimits, derived_max_prompt_chars, prompt_chars)
from hybrid_engine.server.protocol import (  # noqa: E402
    APIError, ChatCompletionRequest, CompletionRequest, bad_value, parse_request)
from hybrid_engine.tools.forcing import FORMATS  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CAPTURE_KEYS = ("graphs_captured", "graphs_pending", "graphs_failed", "graph_pool_bytes")


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    limits: RequestLimits = request.app.state.limits
    req = parse_request(CompletionRequest, await limits.read_body(request))
    state.check_model(req.model)
    prompt = req.engine_prompt()
    limits.check_prompt_chars(prompt_chars(prompt), "prompt")
    max_tokens = req.resolved_max_tokens() or DEFAULT_COMPLETION_MAX_TOKENS
    state.check_length(await state.count_prompt_tokens(prompt), max_tokens, "prompt")
    params = req.sampling_params(max_tokens, await asyncio.to_thread(completion_constraint, req))
    gen = Generation(state, request, "completions", chat=False)
    return await gen.respond(prompt, params, req.stream, req.include_usage)


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    limits: RequestLimits = request.app.state.limits
    req = parse_request(ChatCompletionRequest, await limits.read_body(request))
    state.check_model(req.model)
    limits.check_prompt_chars(req.content_chars(), "messages")
    plan = await asyncio.to_thread(plan_chat, req, state.tool_call_parser)
    try:
        ids = await asyncio.to_thread(encode_chat, state.llm, req.template_messages(), plan, state.chat_template)
    except ValueError as exc:
        raise bad_value(exc) from exc
    limit = state.max_model_len() or len(ids) + 256
    max_tokens = req.resolved_max_tokens() or max(limit - len(ids), 1)  # OpenAI: up to the context length
    state.check_length(len(ids), max_tokens, "messages")
    params = req.sampling_params(max_tokens, plan.constraint())
    gen = Generation(state, request, "chat", chat=True, plan=plan)
    return await gen.respond({"prompt_token_ids": ids}, params, req.stream, req.include_usage)


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
        "kv_blocks_cached": stats.get("kv_blocks_cached"),
        "kv_blocks_total": stats.get("kv_blocks_total"),
    }
    return JSONResponse(body, status_code=200 if ok else 503)


async def reset_prefix_cache(request: Request) -> JSONResponse:
    """Drop the cached KV blocks no request holds (as vLLM's POST /reset_prefix_cache): benchmarks and tests that
    compare answers with and without earlier requests' prefixes in the cache."""
    state: ServerState = request.app.state.server
    freed = await asyncio.to_thread(state.llm.reset_prefix_cache)
    return JSONResponse({"blocks_freed": freed})


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


def create_app(llm: Any, *, served_model_name: str | None = None, max_queue: int = 64,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_prompt_chars: int | None = None,
               chat_template: str | None = None, tool_call_parser: str = "hermes") -> FastAPI:
    """A FastAPI app serving `llm`. The engine worker starts with the app's lifespan and stops with it.

    Bodies over `max_request_bytes` are answered 413 unread; prompts over `max_prompt_chars` characters (default:
    the most that could fit max_model_len with the model's tokenizer) are answered 400 untokenized.
    `chat_template` (Jinja text) replaces the tokenizer's for every chat request; `tool_call_parser` ("hermes" or
    "llama3_json") is the tool-call syntax the prompt asks for and replies are parsed with."""
    name = served_model_name or _default_model_name(llm)
    limits = RequestLimits(max_request_bytes, max_prompt_chars or derived_max_prompt_chars(llm))
    state = ServerState(llm, name, max_queue, chat_template=chat_template, tool_call_parser=tool_call_parser)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        yield
        state.worker.stop()

    app = FastAPI(title="hybrid_engine", summary="OpenAI-compatible server", lifespan=lifespan)
    app.state.server = state
    app.state.limits = limits
    _install_error_handlers(app)
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"])
    return app


def _default_model_name(llm: Any) -> str:
    model = getattr(llm.config, "model", None)
    return model if isinstance(model, str) else type(model).__name__


def _int_list(text: str) -> tuple[int, ...]:
    """"1,16,32" -> (1, 16, 32); argparse reports the ValueError as an invalid value of the flag."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid-engine serve", description="OpenAI-compatible HTTP server")
    p.add_argument("--model", default=None, help="checkpoint dir or preset (default: tiny-llama on CPU, "
                                                  "llama-2-7b-shape on GPU)")
    p.add_argument("--served-model-name", default=None, help="name clients pass as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for the engine before 429")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"larger request bodies are answered 413 unread (default {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longer prompts are answered 400 before tokenizing (default: max_model_len x the longest "
                        "token in the vocabulary x 2)")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template used instead of the tokenizer's: a file path, or the template itself")
    p.add_argument("--tool-call-parser", default="hermes", choices=list(FORMATS),
                   help="tool-call syntax asked for and parsed: hermes (<tool_call> tags, the default tool prompt) "
                        "or llama3_json (Llama 3.1's JSON calls, for a template that renders tools that way)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="requests decoded together (default 32)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--capture", default=None, choices=["idle", "eager", "off"], help="CUDA-graph capture policy")
    p.add_argument("--prefill-weight-copy", default=None, choices=["auto", "on", "off"],
                   help="transposed copy of the QKV and gate/up weights for prefill (faster, more memory)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="GPUs each layer is split over (worker processes for ranks 1..; default 1)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV cache of repeated prompt prefixes (default: on)")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="decode projections whose per-row sums do not depend on the batch (default: on)")
    p.add_argument("--batched-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="prompts admitted together run as one forward pass (default: off)")
    p.add_argument("--decode-buckets", type=_int_list, default=None,
                   help="batch sizes with a decode graph, comma-separated (default 1,2,4,...)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    return p


def read_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a file's text, or the value itself when it is Jinja (holds "{{" or "{%"), as vLLM takes
    it; anything else is a ValueError naming the value."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template={value!r} is neither a readable file nor a Jinja template")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig keywords from the CLI; options left unset keep the engine's defaults."""
    names = ("dtype", "device", "max_model_len", "num_kv_blocks", "max_num_seqs", "block_size", "attention_backend",
             "capture", "prefill_weight_copy", "seed", "tensor_parallel_size", "enable_prefix_caching",
             "batch_invariant", "decode_buckets", "batched_prefill")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def main(argv: list[str] | None = None) -> int:
    """Load the model, then serve until SIGINT/SIGTERM. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    for flag in ("max_queue", "max_request_bytes", "max_prompt_chars"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"error: --{flag.replace('_', '-')}={value} must be >= 1", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # the server owns the process: its --log-level wins over the CLI's default
    import torch
    import uvicorn

    from hybrid_engine import LLM
    from hybrid_engine.errors import HybridEngineError

    try:
        chat_template = read_chat_template(args.chat_template)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = args.model or ("llama-2-7b-shape" if torch.cuda.is_available() else "tiny-llama")
    try:
        llm = LLM(model, **engine_kwargs(args))
    except (ValueError, TypeError, HybridEngineError) as exc:
        print(f"error: could not load {model!r}: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(llm, served_model_name=args.served_model_name or model, max_queue=args.max_queue,
                         max_request_bytes=args.max_request_bytes, max_prompt_chars=args.max_prompt_chars,
                         chat_template=chat_template, tool_call_parser=args.tool_call_parser)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                access_log=not args.no_access_log, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run()
    finally:
        llm.close()
    return 0

