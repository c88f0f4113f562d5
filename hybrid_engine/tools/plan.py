"""One chat request's tools and output format, checked once and then used three times: to render the prompt, to
build the constraint the engine decodes under, and to read the reply back (whole or streamed).

OpenAI's request fields map as follows. `response_format` {"type": "text" | "json_object" | "json_schema"} becomes
a `GuidedDecodingParams` (`response_format_params`). `tools` and `tool_choice` are checked by `definitions`; a
forced choice ("required" or a named function, which is called exactly once) is a grammar (`forcing`); "auto" beside a response format is a
grammar too: the reply is either JSON in that format or tool calls. A forced tool call beside a forced response
format is refused (the reply cannot be both). The server and the LangChain chat model share this module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..structured.params import GuidedDecodingParams
from .definitions import NAME_PATTERN, parameters_of, resolve_tool_choice, validate_tools
from .forcing import FORMATS, forced_tool_call_params, tool_call_schema
from .parsers import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, PYTHON_TAG, parse_tool_calls
from .prompt import render_tool_chat
from .streaming import HermesToolStreamParser, StreamDelta

# JSON laid out as json.dumps writes it (the form the tool prompt shows); see structured.compiler.JSON_DEFAULTS
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


class RequestFieldError(ValueError):
    """A bad request field; `param` names it (e.g. "tools", "response_format.json_schema.schema")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def response_format_params(response_format: Any) -> GuidedDecodingParams | None:
    """OpenAI's `response_format` as a constraint: None for {"type": "text"} (or None), any JSON object for
    {"type": "json_object"}, the schema for {"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}.
    The schema is enforced whether `strict` is true or not. Raises RequestFieldError naming the bad field."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in RESPONSE_FORMAT_TYPES:
        raise RequestFieldError("response_format", f"response_format must be an object with type one of "
                                f"{list(RESPONSE_FORMAT_TYPES)}, got {response_format!r:.200}")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecodingParams(json_object=True)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestFieldError("response_format.json_schema", "response_format type 'json_schema' needs "
                                f"json_schema: {{'name', 'schema', 'strict'}}, got {spec!r:.200}")
    name, schema, strict = spec.get("name"), spec.get("schema"), spec.get("strict")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RequestFieldError("response_format.json_schema.name", "response_format.json_schema.name must "
                                f"match {NAME_PATTERN.pattern}, got {name!r}")
    if not isinstance(schema, dict):
        raise RequestFieldError("response_format.json_schema.schema", "response_format.json_schema.schema "
                                f"must be a JSON schema object, got {schema!r:.200}")
    if strict is not None and not isinstance(strict, bool):
        raise RequestFieldError("response_format.json_schema.strict", "response_format.json_schema.strict "
                                f"must be true or false, got {strict!r}")
    return GuidedDecodingParams(json_schema=schema)


@dataclass(slots=True)
class ChatPlan:
    """The checked tools and format of one chat request; build with `ChatPlan.build`.

    tools: the offered tools (OpenAI shape). choice: "none", "auto", "required" or a function name.
    response_format: the format constraint, if any. parser: "hermes" or "llama3_json" (the tool-call syntax the
    prompt asks for and the parser reads)."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "none"
    parallel_tool_calls: bool = True
    response_format: GuidedDecodingParams | None = None
    parser: str = "hermes"

    @classmethod
    def build(cls, tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
              parallel_tool_calls: bool | None = None, response_format: Any = None,
              parser: str = "hermes") -> ChatPlan:
        """Check the OpenAI request fields; RequestFieldError names the first bad one. Does not compile anything
        (`check` does, with the grammar library)."""
        if parser not in FORMATS:
            raise ValueError(f"tool-call parser {parser!r} is not one of {list(FORMATS)}")
        try:
            tools = list(validate_tools([] if tools is None else tools))
        except ValueError as exc:
            raise RequestFieldError("tools", str(exc)) from exc
        try:
            choice = resolve_tool_choice(tool_choice, tools)
        except ValueError as exc:
            raise RequestFieldError("tool_choice", str(exc)) from exc
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise RequestFieldError("parallel_tool_calls",
                                    f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
        fmt = response_format_params(response_format)
        if fmt is not None and choice not in ("auto", "none"):
            raise RequestFieldError("response_format", f"response_format {fmt.kind!r} cannot be combined with "
                                    f"tool_choice={tool_choice!r}: both force the reply's form; use tool_choice "
                                    "'auto' or 'none' with a response format")
        return cls(tools, choice, parallel_tool_calls is not False, fmt, parser)

    @property
    def calls_tools(self) -> bool:
        """The model is offered tools (and its reply is parsed for calls)."""
        return bool(self.tools) and self.choice != "none"

    def check(self) -> None:
        """Compile-check every schema the request brings (tools' parameters, the response format, the combined
        constraint) through the grammar library; RequestFieldError names the bad one."""
        from ..structured.compiler import check_constraint

        for i, tool in enumerate(self.tools):
            try:
                check_constraint(GuidedDecodingParams(json_schema=parameters_of(tool)))
            except ValueError as exc:
                raise RequestFieldError("tools", f"tools[{i}].function.parameters: {exc}") from exc
        if self.response_format is not None:
            try:
                check_constraint(self.response_format)
            except ValueError as exc:
                raise RequestFieldError("response_format", f"response_format: {exc}") from exc
        constraint = self.constraint()
        if constraint is not None and constraint.kind == "grammar":
            try:
                check_constraint(constraint)
            except ValueError as exc:
                raise RequestFieldError("tools", f"the tool-call constraint does not compile: {exc}") from exc

    def constraint(self) -> GuidedDecodingParams | None:
        """What the reply is decoded under: a forced call, "format or calls", the format alone, or nothing. Object
        schemas are closed (`closed_schema`)."""
        if not self.calls_tools:
            return self._format()
        if self.choice != "auto":  # a named function is called once (as vLLM does); "required" may call several
            several = self.parallel_tool_calls and self.choice == "required"
            return forced_tool_call_params(self._closed_tools(), self.choice, several, self.parser)
        if self.response_format is None:
            return None
        return GuidedDecodingParams(grammar=self._answer_or_calls_grammar())

    def _format(self) -> GuidedDecodingParams | None:
        fmt = self.response_format
        if fmt is None or fmt.kind != "json_schema":
            return fmt
        return GuidedDecodingParams(json_schema=closed_schema(fmt.schema_dict()))

    def _closed_tools(self) -> list[dict[str, Any]]:
        return [{**t, "function": {**t["function"], "parameters": closed_schema(parameters_of(t))}}
                for t in self.tools]

    def _answer_or_calls_grammar(self) -> str:
        fmt = self._format()
        schema = fmt.schema_dict() if fmt is not None and fmt.kind == "json_schema" else {"type": "object"}
        answer = _lark_json({**schema, "x-guidance": schema.get("x-guidance", _JSON_LAYOUT)})
        if self.parser == "llama3_json":
            call = _lark_json({**tool_call_schema(self._closed_tools(), "auto", "parameters"),
                               "x-guidance": _JSON_LAYOUT})
            return f"start: answer | call\nanswer: {answer}\ncall: {call}\n"
        body = _lark_json({**tool_call_schema(self._closed_tools(), "auto"), "x-guidance": _JSON_LAYOUT})
        call = f"{json.dumps(TOOL_CALL_OPEN + chr(10))} {body} {json.dumps(chr(10) + TOOL_CALL_CLOSE)}"
        calls = 'call ("\\n" call)*' if self.parallel_tool_calls else "call"
        return f"start: answer | calls\nanswer: {answer}\ncalls: {calls}\ncall: {call}\n"

    def render(self, tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None) -> str:
        """The prompt text: tools through the chat template when it renders them, else the default tool prompt."""
        return render_tool_chat(tokenizer, messages, self.tools or None, self.choice, chat_template)

    def prompt_ids(self, tokenizer: Any, messages: list[dict[str, Any]],
                   chat_template: str | None = None) -> list[int]:
        """`render` tokenized (the template holds the special tokens, so none are added)."""
        return list(tokenizer(self.render(tokenizer, messages, chat_template), add_special_tokens=False)["input_ids"])

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a whole reply; without tools the text is all content."""
        if not self.calls_tools:
            return text, []
        content, calls = parse_tool_calls(text, self.parser)
        return content, calls if self.parallel_tool_calls else calls[:1]

    def stream_parser(self) -> ToolStreamParser:
        """A parser for this request's streamed reply (content passes straight through when no tools)."""
        return ToolStreamParser(self)


class ToolStreamParser:
    """`feed(text)` per streamed delta and `finish()` at the end, each returning the content and OpenAI
    `delta.tool_calls` entries to send now; `tool_calls` holds the complete calls."""

    def __init__(self, plan: ChatPlan) -> None:
        self.plan = plan
        self._hermes = HermesToolStreamParser() if plan.calls_tools and plan.parser == "hermes" else None
        self._held: str | None = "" if plan.calls_tools and plan.parser == "llama3_json" else None
        self._calls: list[dict[str, Any]] = []
        self._space = ""  # trailing whitespace of the content so far: sent only if more content follows

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        calls = self._hermes.tool_calls if self._hermes is not None else self._calls
        return calls if self.plan.parallel_tool_calls else calls[:1]

    def feed(self, text: str) -> StreamDelta:
        if self._hermes is not None:
            return self._shape(self._hermes.feed(text))
        if self._held is None:
            return StreamDelta(content=text)
        return self._feed_json(self._held + text)

    def finish(self) -> StreamDelta:
        if self._hermes is not None:
            return self._shape(self._hermes.finish())
        if not self._held:
            return StreamDelta()
        content, calls = self.plan.parse(self._held)
        self._held, self._calls = "", calls
        deltas = [{"index": i, **json.loads(json.dumps(call))} for i, call in enumerate(calls)]
        return StreamDelta(content=content or "", tool_calls=deltas)

    def _feed_json(self, held: str) -> StreamDelta:
        # Llama 3.1's calls are the whole reply, so they are known only at its end: hold a reply that may be one
        # (starts with "{" or the python tag), stream any other as content.
        head = held.lstrip()
        if head.startswith("{") or PYTHON_TAG.startswith(head) or head.startswith(PYTHON_TAG) or not head:
            self._held = held
            return StreamDelta()
        self._held = None
        return StreamDelta(content=held)

    def _shape(self, delta: StreamDelta) -> StreamDelta:
        # the whole-reply parse strips the content around calls; hold whitespace back so the stream adds up to it
        if delta.content:
            text = self._space + delta.content
            delta.content = text.rstrip()
            self._space = text[len(delta.content):]
        if not self.plan.parallel_tool_calls:
            delta.tool_calls = [d for d in delta.tool_calls if d["index"] == 0]
        return delta


def closed_schema(schema: Any) -> Any:
    """A copy of `schema` whose objects allow no properties beyond those listed, where it does not say otherwise
    (xgrammar's strict mode, which vLLM uses). Every output stays valid for the original schema, and a small model
    cannot wander off into extra keys (pydantic and LangChain write object schemas without additionalProperties)."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed_schema(v) if k in _SUBSCHEMA_KEYS else
               {n: closed_schema(s) for n, s in v.items()} if k in _SUBSCHEMA_MAPS and isinstance(v, dict) else v)
           for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:  # {"type": "object"} alone stays free-form
        out["additionalProperties"] = False
    return out


_SUBSCHEMA_KEYS = ("items", "anyOf", "oneOf", "allOf", "prefixItems", "not", "if", "then", "else")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def _lark_json(schema: dict[str, Any]) -> str:
    return f"%json {json.dumps(schema, ensure_ascii=False)}"
