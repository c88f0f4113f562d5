"""Chat requests with tools, for `LLM.chat`: the prompt (tools through the chat template when it renders them, else
the default Hermes tool prompt of tools/prompt.py), the grammar that forces a call for tool_choice "required" or a
named function (tools/forcing.py), and the calls parsed back out of the reply (tools/parsers.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..tools import forced_tool_call_params, parse_hermes_tool_calls, render_tool_chat, resolve_tool_choice
from ..tools import validate_tools

TOOL_CALL_FORMAT = "hermes"  # what the default tool prompt asks for and the forcing grammar writes


@dataclass(slots=True)
class ChatRequest:
    """A chat turn ready to generate: its prompt token ids, its sampling parameters (with the forcing grammar of a
    forced tool call) and whether tool calls are parsed from the reply."""

    prompt_ids: list[int]
    params: SamplingParams
    parse_tool_calls: bool


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages={messages!r:.200} must be a non-empty list of {{'role', 'content'}} dicts")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise ValueError(f"message {m!r:.200} must be a dict with 'role' and 'content' (or assistant "
                             "'tool_calls')")


def prepare_chat(tokenizer: Any, messages: list[dict], params: SamplingParams | None,
                 tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool,
                 chat_template: str | None = None) -> ChatRequest:
    """The prompt and parameters of a chat turn with `tools`; ValueError naming a malformed tool, an unknown
    tool_choice name, or a structured_output that a forced tool call would override."""
    check_messages(messages)
    params = params or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    if not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls={parallel_tool_calls!r} must be True or False")
    tools = validate_tools(list(tools)) if tools else []
    choice = resolve_tool_choice(tool_choice if tools or tool_choice != "auto" else None, tools)
    if not getattr(tokenizer, "chat_template", None) and chat_template is None:
        raise ValueError("the tokenizer has no chat_template; pass chat_template=... or plain prompts instead")
    if tools:
        text = render_tool_chat(tokenizer, messages, tools, choice, chat_template)
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=chat_template)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    forced = forced_tool_call_params(tools, choice, parallel_tool_calls, TOOL_CALL_FORMAT) if tools else None
    if forced is not None:
        if params.structured_output is not None:
            raise ValueError(f"tool_choice={choice!r} forces a tool call, which cannot be combined with "
                             "sampling_params.structured_output; drop one of them")
        params = dataclasses.replace(params, structured_output=forced)
    return ChatRequest(ids, params, bool(tools) and choice != "none")


def attach_tool_calls(output: RequestOutput) -> RequestOutput:
    """Set each completion's `tool_calls` from its text (kept unchanged); None where the reply holds no call."""
    for comp in output.outputs:
        _, calls = parse_hermes_tool_calls(comp.text)
        comp.tool_calls = calls or None
    return output
