"""The request fields that shape a reply (`tools`, `tool_choice`, `parallel_tool_calls`, `response_format`),
checked before the request takes a queue slot: a malformed tool, an unknown tool name, a schema that does not
compile or a forced call beside a forced format is a 400 naming the field; the engine never sees it.

The checks compile schemas (milliseconds to a second for a large one), so handlers run them off the event loop.
"""
from __future__ import annotations

from typing import Any

from hybrid_engine.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from hybrid_engine.structured.params import GuidedDecodingParams
from hybrid_engine.tools.plan import ChatPlan, RequestFieldError, response_format_params


def plan_chat(req: ChatCompletionRequest, parser: str) -> ChatPlan:
    """The request's checked tools and format (400 naming the bad field)."""
    try:
        plan = ChatPlan.build(req.tools, req.tool_choice, req.parallel_tool_calls, req.response_format, parser)
        plan.check()
    except RequestFieldError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
    return plan


def completion_constraint(req: CompletionRequest) -> GuidedDecodingParams | None:
    """The constraint of a completion request's `response_format` (400 naming the bad field)."""
    try:
        constraint = response_format_params(req.response_format)
        if constraint is not None:
            ChatPlan(response_format=constraint).check()
    except RequestFieldError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
    return constraint


def encode_chat(llm: Any, messages: list[dict[str, Any]], plan: ChatPlan, chat_template: str | None) -> list[int]:
    """Prompt ids: the engine's own chat encoding without tools; with tools or a server-wide `--chat-template`,
    the tools-aware rendering (the template's tools support, or the default tool prompt with tool messages and
    calls written as text)."""
    if not plan.tools and chat_template is None:
        return list(llm.encode_chat(messages))
    tokenizer = getattr(llm, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("tools: this model has no tokenizer to render tools or a chat template with")
    return plan.prompt_ids(tokenizer, messages, chat_template)
