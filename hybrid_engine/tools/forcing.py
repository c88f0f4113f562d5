"""Grammars that force a tool call (`tool_choice` "required" or a named function): the output can only be a call
to an offered tool whose arguments validate against that tool's parameters schema. They are constraints for
`hybrid_engine.structured` (building them needs no grammar library; compiling them does)."""
from __future__ import annotations

import json
from typing import Any

from ..structured.params import GuidedDecodingParams
from .definitions import parameters_of, tools_for_choice
from .parsers import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# JSON as json.dumps writes it, the form the tool prompt shows (llguidance's per-schema options)
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FORMATS = ("hermes", "llama3_json")


def tool_call_schema(tools: list[dict[str, Any]], choice: str, arguments_key: str = "arguments") -> dict[str, Any]:
    """JSON schema of one call `{"name": <tool>, <arguments_key>: <its parameters>}` to a tool that `choice`
    ("required", "auto" or a function name, see `resolve_tool_choice`) allows."""
    allowed = tools_for_choice(tools, choice)
    if not allowed:
        raise ValueError(f"tool_choice {choice!r} allows no tool to call (tools: "
                         f"{[t['function']['name'] for t in tools]})")
    variants = [_call_variant(tool, arguments_key) for tool in allowed]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _call_variant(tool: dict[str, Any], arguments_key: str) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": tool["function"]["name"]}, arguments_key: parameters_of(tool)},
            "required": ["name", arguments_key], "additionalProperties": False}


def forced_tool_call_params(tools: list[dict[str, Any]], choice: str, parallel_tool_calls: bool = True,
                            fmt: str = "hermes") -> GuidedDecodingParams | None:
    """The constraint for a resolved `tool_choice`; None for "auto" and "none" (nothing forced).

    fmt "hermes": one or (with parallel_tool_calls) more `<tool_call>\\n{...}\\n</tool_call>` blocks separated by
    newlines, read back by `parse_hermes_tool_calls`; fmt "llama3_json": one bare `{"name", "parameters"}` object,
    read back by `parse_llama3_json_tool_calls`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}; choose one of {list(FORMATS)}")
    if choice in ("auto", "none"):
        return None
    if fmt == "llama3_json":
        return GuidedDecodingParams(json_schema={**tool_call_schema(tools, choice, "parameters"),
                                                 "x-guidance": _JSON_LAYOUT})
    schema = json.dumps({**tool_call_schema(tools, choice), "x-guidance": _JSON_LAYOUT}, ensure_ascii=False)
    call = f"{json.dumps(TOOL_CALL_OPEN + chr(10))} %json {schema} {json.dumps(chr(10) + TOOL_CALL_CLOSE)}"
    repeat = ' ("\\n" call)*' if parallel_tool_calls else ""
    return GuidedDecodingParams(grammar=f"start: call{repeat}\ncall: {call}\n")
