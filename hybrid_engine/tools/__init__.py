"""Tool calling as pure functions: tool definitions and `tool_choice` checked, tools put in the prompt (the chat
template when it renders them, else a default Hermes-style system prompt), model output parsed into OpenAI
`tool_calls` (Hermes/Qwen2 tags, Llama 3.1 JSON; streamed or whole), and constraints that force a valid call for
`tool_choice` "required" or a named function (compiled by `hybrid_engine.structured`)."""
from .definitions import resolve_tool_choice, tool_names, tools_for_choice, validate_tools
from .forcing import forced_tool_call_params, tool_call_schema
from .parsers import (make_tool_call, parse_hermes_tool_calls, parse_llama3_json_tool_calls, parse_tool_calls)
from .prompt import (chat_template_supports_tools, hermes_tool_system_prompt, messages_with_tool_prompt,
                     render_tool_chat)
from .streaming import HermesToolStreamParser, StreamDelta

__all__ = ["validate_tools", "resolve_tool_choice", "tool_names", "tools_for_choice", "tool_call_schema",
           "forced_tool_call_params", "make_tool_call", "parse_tool_calls", "parse_hermes_tool_calls",
           "parse_llama3_json_tool_calls", "chat_template_supports_tools", "hermes_tool_system_prompt",
           "messages_with_tool_prompt", "render_tool_chat", "HermesToolStreamParser", "StreamDelta"]
