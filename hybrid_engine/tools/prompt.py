"""Putting tools in front of the model: through the chat template when it renders `tools`, otherwise through a
default Hermes-style system prompt (the tools as JSON inside `<tools></tools>`, calls asked for as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which `parse_hermes_tool_calls` reads back)."""
from __future__ import annotations

import json
import logging
from typing import Any

from .parsers import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

logger = logging.getLogger(__name__)

_PROBE_TOOL = {"type": "function", "function": {
    "name": "zz_probe_tool_7f3a", "description": "Probe: does the template render tools?",
    "parameters": {"type": "object", "properties": {"zz_probe_arg": {"type": "string"}}}}}
_PROBE_MESSAGES = [{"role": "user", "content": "Hello"}]


def chat_template_supports_tools(tokenizer: Any, chat_template: str | None = None) -> bool:
    """True when the chat template renders `tools`: the prompt with a probe tool differs from the one without
    (a template that ignores `tools`, or fails with them, gives False)."""
    try:
        plain = _render(tokenizer, _PROBE_MESSAGES, None, chat_template)
        with_tools = _render(tokenizer, _PROBE_MESSAGES, [_PROBE_TOOL], chat_template)
    except Exception as exc:  # a template may raise anything on input it does not expect
        logger.debug("chat template failed while probing for tools support: %s", exc)
        return False
    return plain != with_tools


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            chat_template: str | None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=chat_template, **kwargs)


def hermes_tool_system_prompt(tools: list[dict[str, Any]], tool_choice: str = "auto") -> str:
    """The default tool prompt: what the tools are and how to call them. `tool_choice` ("auto", "required" or a
    function name) adds a line saying a call is expected."""
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    lines = [
        "You can call functions to help answer the user. The functions are described by JSON schemas inside "
        "<tools></tools>:",
        f"<tools>\n{listing}\n</tools>",
        f"To call a function, reply with a JSON object holding its name and arguments inside "
        f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} tags, one block per call:",
        f'{TOOL_CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n{TOOL_CALL_CLOSE}',
        "Results come back inside <tool_response></tool_response> tags.",
    ]
    if tool_choice == "required":
        lines.append("You must call at least one function now.")
    elif tool_choice not in ("auto", "none"):
        lines.append(f"You must call the function {tool_choice!r} now.")
    return "\n".join(lines)


def messages_with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                              tool_choice: str = "auto") -> list[dict[str, Any]]:
    """Messages for a template that ignores tools: the tool prompt joins the system message (one is added when
    there is none), assistant `tool_calls` become `<tool_call>` text, and `tool` messages become user messages
    wrapped in `<tool_response>` (templates without tool support know only system/user/assistant)."""
    out = [_plain_message(m) for m in messages]
    prompt = hermes_tool_system_prompt(tools, tool_choice)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    role, content = message.get("role"), message.get("content") or ""
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    if role == "assistant" and message.get("tool_calls"):
        blocks = [_call_text(call) for call in message["tool_calls"]]
        return {"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)}
    return {"role": role, "content": content}


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", {})
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    body = json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def messages_for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools: OpenAI's JSON-string `arguments` become dicts, the form
    transformers' chat templates expect."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": _arguments_dict(c["function"])}}
                     for c in m["tool_calls"]]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _arguments_dict(fn: dict[str, Any]) -> Any:
    args = fn.get("arguments", {})
    return json.loads(args) if isinstance(args, str) and args.strip() else (args or {})


def render_tool_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     tool_choice: str = "auto", chat_template: str | None = None) -> str:
    """The prompt text for a chat with tools: through the template when it renders tools, else with the default
    tool prompt. Without tools (or with tool_choice "none") it is the plain chat prompt."""
    supported = chat_template_supports_tools(tokenizer, chat_template)
    if supported:
        offered = tools if tools and tool_choice != "none" else None
        return _render(tokenizer, messages_for_template(messages), offered, chat_template)
    if not tools or tool_choice == "none":
        return _render(tokenizer, [_plain_message(m) for m in messages], None, chat_template)
    return _render(tokenizer, messages_with_tool_prompt(messages, tools, tool_choice), None, chat_template)
