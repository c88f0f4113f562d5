"""Chat requests with tools, for `LLM.chat`: one `tools.plan.ChatPlan` (the same checks, prompt, forcing grammar
and parsing as the server and the LangChain chat model) turned into prompt ids and sampling parameters."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..tools.plan import ChatPlan


@dataclass(slots=True)
class ChatRequest:
    """A chat turn ready to generate: its prompt token ids, its sampling parameters (with the forcing grammar of a
    forced tool call) and the plan that parses tool calls back out of the reply."""

    prompt_ids: list[int]
    params: SamplingParams
    plan: ChatPlan


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
    plan = ChatPlan.build(list(tools) if tools else None, tool_choice if tools or tool_choice != "auto" else None,
                          parallel_tool_calls)
    if not getattr(tokenizer, "chat_template", None) and chat_template is None:
        raise ValueError("the tokenizer has no chat_template; pass chat_template=... or plain prompts instead")
    ids = plan.prompt_ids(tokenizer, messages, chat_template)
    forced = plan.constraint()
    if forced is not None:
        if params.structured_output is not None:
            raise ValueError(f"tool_choice={plan.choice!r} forces a tool call, which cannot be combined with "
                             "sampling_params.structured_output; drop one of them")
        params = dataclasses.replace(params, structured_output=forced)
    return ChatRequest(ids, params, plan)


def attach_tool_calls(output: RequestOutput, plan: ChatPlan) -> RequestOutput:
    """Set each completion's `tool_calls` from its text (kept unchanged); None where the reply holds no call."""
    if plan.calls_tools:
        for comp in output.outputs:
            comp.tool_calls = plan.parse(comp.text)[1] or None
    return output
