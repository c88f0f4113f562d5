"""Tool calling and structured output for `ChatHybrid`: LangChain messages to and from OpenAI's tool-call shape,
`tool_choice` normalization, and the output parsers behind `with_structured_output`."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.messages.tool import ToolCall, ToolCallChunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.base import OutputParserLike
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

_ROLES: dict[type, str] = {HumanMessage: "user", AIMessage: "assistant", SystemMessage: "system",
                           ToolMessage: "tool"}
REPLY_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
STRUCTURED_METHODS = ("json_schema", "function_calling", "json_mode")


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> chat-template dicts ({"role", "content"}, plus an assistant's OpenAI `tool_calls`
    and a tool message's `tool_call_id`); only text content is supported."""
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    return [_chat_dict(m) for m in messages]


def _chat_dict(message: BaseMessage) -> dict[str, Any]:
    role = message.role if isinstance(message, ChatMessage) else _ROLES.get(type(message))
    if role is None:
        role = next((r for cls, r in _ROLES.items() if isinstance(message, cls)), None)
    if role is None:
        raise ValueError(f"message type {type(message).__name__} is not supported; use Human/AI/System/Tool/"
                         "ChatMessage")
    out: dict[str, Any] = {"role": role, "content": _text(message)}
    if isinstance(message, AIMessage) and message.tool_calls:
        out["tool_calls"] = [{"id": c.get("id") or f"call_{i}", "type": "function",
                              "function": {"name": c["name"], "arguments": json.dumps(c["args"])}}
                             for i, c in enumerate(message.tool_calls)]
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    return out


def _text(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block["text"])
        elif isinstance(block, dict) and block.get("type") in ("tool_call", "tool_use"):
            continue  # an assistant's call, also in message.tool_calls
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"content block of type {kind!r} is not supported; the engine takes text only")
    return "".join(parts)


def lc_tool_calls(calls: list[dict[str, Any]]) -> list[ToolCall]:
    """OpenAI tool calls (arguments as JSON text, as the engine's parsers write them) -> LangChain ToolCalls."""
    return [ToolCall(name=c["function"]["name"], args=json.loads(c["function"]["arguments"]), id=c["id"])
            for c in calls]


def lc_tool_call_chunks(deltas: list[dict[str, Any]]) -> list[ToolCallChunk]:
    """OpenAI `delta.tool_calls` entries -> LangChain ToolCallChunks (merged by index when chunks are added)."""
    return [ToolCallChunk(name=d.get("function", {}).get("name"), args=d.get("function", {}).get("arguments"),
                          id=d.get("id"), index=d["index"]) for d in deltas]


def openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Python functions, pydantic models, `@tool`s or OpenAI tool dicts -> OpenAI tool definitions."""
    return [convert_to_openai_tool(t) for t in tools]


def normalize_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> Any:
    """LangChain's tool_choice forms -> OpenAI's: a tool name -> {"type": "function", ...}; "any" and True ->
    "required" (True with one tool: that tool); "auto", "none", "required" and dicts unchanged."""
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True:
        return _named(tools[0]["function"]["name"]) if len(tools) == 1 else "required"
    if tool_choice == "any":
        return "required"
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
        return _named(tool_choice)
    return tool_choice


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def structured_output_parts(schema: Any, method: str) -> tuple[dict[str, Any], OutputParserLike]:
    """The bind() keywords and the output parser of `with_structured_output(schema, method=...)`."""
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"method={method!r} is not one of {list(STRUCTURED_METHODS)}")
    pydantic_schema = isinstance(schema, type) and is_basemodel_subclass(schema)
    if method == "function_calling":
        tool = convert_to_openai_tool(schema)
        name = tool["function"]["name"]
        bind = {"tools": [tool], "tool_choice": _named(name), "parallel_tool_calls": False}
        parser: OutputParserLike = (PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic_schema
                                    else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        return bind, parser
    if method == "json_mode":
        bind = {"response_format": {"type": "json_object"}}
    else:
        json_schema = convert_to_json_schema(schema)
        name = str(json_schema.get("title") or "response")
        bind = {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": _schema_name(name), "schema": json_schema,
                                                    "strict": True}}}
    return bind, (PydanticOutputParser(pydantic_object=schema) if pydantic_schema else JsonOutputParser())


def _schema_name(title: str) -> str:
    name = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in title)[:64]
    return name or "response"


def with_raw(llm: Runnable, parser: OutputParserLike) -> Runnable:
    """{"raw": AIMessage, "parsed": object | None, "parsing_error": Exception | None}, as LangChain's chat models
    return with include_raw=True."""
    def parse(x: dict[str, Any]) -> Any:
        return parser.invoke(x["raw"])

    parsed = RunnablePassthrough.assign(parsed=parse, parsing_error=lambda _: None)
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")
