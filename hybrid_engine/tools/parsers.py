"""Model output → OpenAI `tool_calls`, for the two output forms open models use.

Hermes / Qwen2: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around them kept as
content. Llama 3.1: the whole reply is `{"name": ..., "parameters": {...}}` (several separated by ";"), optionally
after `<|python_tag|>`. Each parser returns (content, tool_calls); output it cannot read is returned as content
with no calls, never an exception.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

logger = logging.getLogger(__name__)

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    """An OpenAI-style tool call id ("call_" + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


def make_tool_call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    """An OpenAI `tool_calls` entry; `arguments` (a dict, or JSON text) is stored as a JSON string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def call_from_json(obj: Any) -> dict[str, Any] | None:
    """The tool call in a decoded `{"name": ..., "arguments"|"parameters": {...}}` object, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in ARGUMENT_KEYS if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return make_tool_call(obj["name"], args)


def parse_hermes_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Parse `<tool_call>` blocks; content is the text outside them (stripped; None if empty). A block that is not
    a JSON call object, or an unclosed `<tool_call>`, makes the whole text content with no calls."""
    if TOOL_CALL_OPEN not in text:
        return text, []
    calls, outside, pos = [], [], 0
    for block in _HERMES_BLOCK.finditer(text):
        call = _decode_call(block.group(1))
        if call is None:
            logger.debug("unreadable <tool_call> block: %r", block.group(1)[:200])
            return text, []
        outside.append(text[pos:block.start()])
        calls.append(call)
        pos = block.end()
    rest = text[pos:]
    if TOOL_CALL_OPEN in rest:
        return text, []
    content = ("".join(outside) + rest).strip()
    return content or None, calls


def _decode_call(body: str) -> dict[str, Any] | None:
    try:
        return call_from_json(json.loads(body))
    except json.JSONDecodeError:
        return None


def parse_llama3_json_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Parse Llama 3.1's JSON tool calls: `[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]`.

    Text before `<|python_tag|>` is kept as content; without the tag the reply must start with `{`."""
    head, tag, body = text.partition(PYTHON_TAG)
    if not tag:
        head, body = "", text
    if not body.lstrip().startswith("{"):
        return text, []
    calls = _decode_json_sequence(body)
    if not calls:
        return text, []
    return head.strip() or None, calls


def _decode_json_sequence(body: str) -> list[dict[str, Any]]:
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while True:
        pos = _skip(body, pos, " \t\r\n;")
        if pos == len(body):
            return calls
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return []
        call = call_from_json(obj)
        if call is None:
            return []
        calls.append(call)


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


PARSERS = {"hermes": parse_hermes_tool_calls, "llama3_json": parse_llama3_json_tool_calls}


def parse_tool_calls(text: str, parser: str = "hermes") -> tuple[str | None, list[dict[str, Any]]]:
    """Parse with a named parser ("hermes" or "llama3_json")."""
    if parser not in PARSERS:
        raise ValueError(f"unknown tool-call parser {parser!r}; choose one of {sorted(PARSERS)}")
    return PARSERS[parser](text)
