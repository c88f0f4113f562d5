"""OpenAI tool definitions and `tool_choice`, checked: a malformed tool or an unknown tool name raises ValueError
naming the entry and what is allowed (a server answers 400 with the message)."""
from __future__ import annotations

import re
from typing import Any

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def validate_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check OpenAI-style tools (`{"type": "function", "function": {"name", "description"?, "parameters"?}}`);
    returns them unchanged. Duplicate names are refused (a call could not say which one it means)."""
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = _check_tool(i, tool)
        if name in seen:
            raise ValueError(f"tools[{i}]: duplicate function name {name!r}")
        seen.add(name)
    return tools


def _check_tool(i: int, tool: Any) -> str:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ValueError(f"tools[{i}] must be an object with type 'function', got {tool!r:.200}")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ValueError(f"tools[{i}].function must be an object, got {fn!r:.200}")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"tools[{i}].function.name must match {NAME_PATTERN.pattern}, got {name!r}")
    if "description" in fn and not isinstance(fn["description"], str):
        raise ValueError(f"tools[{i}].function.description must be a string, got {fn['description']!r:.200}")
    params = fn.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(params, dict):
        raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object, got {params!r:.200}")
    return name


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    """The function names of (validated) tools, in order."""
    return [t["function"]["name"] for t in tools]


def parameters_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema (an empty-object schema when it declares none)."""
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


def resolve_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> str:
    """Normalize `tool_choice` to "none", "auto", "required" or a function name.

    Accepts None (→ "auto" with tools, "none" without), the three strings, and
    `{"type": "function", "function": {"name": ...}}`; an unknown name raises ValueError listing the tools."""
    tools = tools or []
    if tool_choice is None:
        return "auto" if tools else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs at least one tool in tools")
        return tool_choice
    name = _named_choice(tool_choice)
    if name not in tool_names(tools):
        raise ValueError(f"tool_choice names function {name!r}, which is not in tools {tool_names(tools)}")
    return name


def _named_choice(tool_choice: Any) -> str:
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or tool_choice.get("type") != "function" or not isinstance(fn.get("name"), str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r:.200}")
    return fn["name"]


def tools_for_choice(tools: list[dict[str, Any]], choice: str) -> list[dict[str, Any]]:
    """The tools a resolved choice lets the model call: none, all, or the named one."""
    if choice == "none":
        return []
    if choice in ("auto", "required"):
        return list(tools)
    return [t for t in tools if t["function"]["name"] == choice]
