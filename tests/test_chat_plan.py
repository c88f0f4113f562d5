"""tools/plan.py: OpenAI's tools / tool_choice / response_format fields checked (errors name the field), the
constraint each combination decodes under (checked by running llguidance's matcher over candidate replies), the
prompt, and the reply read back whole and streamed (the streamed pieces add up to the whole parse)."""
from __future__ import annotations

import json
import random

import pytest

from hybrid_engine.models.presets import build_tokenizer
from hybrid_engine.tools.plan import ChatPlan, RequestFieldError, closed_schema, response_format_params

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
          "additionalProperties": False}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
SUM = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


@pytest.mark.parametrize(("response_format", "param", "words"), [
    ({"type": "xml"}, "response_format", "type one of"),
    ("json", "response_format", "type one of"),
    ({"type": "json_schema"}, "response_format.json_schema", "needs json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": ANSWER}}, "response_format.json_schema.name", "None"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": ANSWER}}, "response_format.json_schema.name",
     "'a b'"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}}, "response_format.json_schema.schema",
     "JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER, "strict": "yes"}},
     "response_format.json_schema.strict", "'yes'"),
])
def test_bad_response_format_names_the_field(response_format, param, words):
    with pytest.raises(RequestFieldError, match=words) as info:
        response_format_params(response_format)
    assert info.value.param == param


def test_response_format_kinds():
    assert response_format_params(None) is None and response_format_params({"type": "text"}) is None
    assert response_format_params({"type": "json_object"}).kind == "json_object"
    fmt = response_format_params(SCHEMA_FORMAT)
    assert fmt.kind == "json_schema" and fmt.schema_dict() == ANSWER


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "tools\\[0\\].function.name"),
    ({"tools": [WEATHER, {"type": "retrieval"}]}, "tools", "tools\\[1\\]"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "duplicate function name 'get_weather'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not in tools \\['get_weather'\\]"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "'always'"),
    ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls", "'no'"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined with tool_choice='required'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
      "response_format": SCHEMA_FORMAT}, "response_format", "both force"),
])
def test_bad_fields_name_the_field(fields, param, words):
    with pytest.raises(RequestFieldError, match=words) as info:
        ChatPlan.build(**fields)
    assert info.value.param == param


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]}, "tools",
     "tools\\[0\\].function.parameters: invalid json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "objekt"}}}},
     "response_format", "invalid json_schema"),
])
def test_schemas_that_do_not_compile_name_the_field(fields, param, words):
    pytest.importorskip("llguidance")
    plan = ChatPlan.build(**fields)  # well-formed: only compiling finds the problem
    with pytest.raises(RequestFieldError, match=words) as info:
        plan.check()
    assert info.value.param == param


def _accepts(tokenizer, constraint, text):
    """Whether the constraint's grammar accepts `text` as a complete reply."""
    from hybrid_engine.structured import compiler_for

    matcher = compiler_for(tokenizer).compile(constraint).matcher()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.accept_tokens(ids) and matcher.is_accepting()


def test_constraint_for_each_combination():
    pytest.importorskip("llguidance")
    tok = build_tokenizer(300)
    assert ChatPlan.build([WEATHER], "auto").constraint() is None
    assert ChatPlan.build([WEATHER], "none", response_format=SCHEMA_FORMAT).constraint().kind == "json_schema"
    forced = ChatPlan.build([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}).constraint()
    assert _accepts(tok, forced, SUM) and not _accepts(tok, forced, CALL)
    assert not _accepts(tok, forced, f"{SUM}\n{SUM}")  # a named function is called once
    several = ChatPlan.build([WEATHER, ADD], "required").constraint()
    assert _accepts(tok, several, f"{CALL}\n{SUM}\n{SUM}")
    single = ChatPlan.build([WEATHER, ADD], "required", parallel_tool_calls=False).constraint()
    assert _accepts(tok, single, CALL) and not _accepts(tok, single, f"{CALL}\n{SUM}")


def test_auto_beside_a_format_is_the_format_or_calls():
    pytest.importorskip("llguidance")
    tok = build_tokenizer(300)
    plan = ChatPlan.build([WEATHER, ADD], "auto", response_format=SCHEMA_FORMAT)
    plan.check()
    either = plan.constraint()
    assert _accepts(tok, either, '{"answer": 42}') and _accepts(tok, either, f"{CALL}\n{SUM}")
    assert not _accepts(tok, either, '{"answer": "42"}') and not _accepts(tok, either, "The answer is 42.")
    assert not _accepts(tok, either, '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>')
    alone = ChatPlan.build([WEATHER], "auto", parallel_tool_calls=False, response_format={"type": "json_object"})
    assert _accepts(tok, alone.constraint(), '{"x": [1]}') and not _accepts(tok, alone.constraint(), f"{CALL}\n{CALL}")
    llama = ChatPlan.build([WEATHER], "auto", response_format=SCHEMA_FORMAT, parser="llama3_json").constraint()
    assert _accepts(tok, llama, '{"name": "get_weather", "parameters": {"city": "Oslo"}}')


def test_object_schemas_are_closed_where_they_do_not_say():
    schema = {"type": "object", "properties": {"pet": {"$ref": "#/$defs/Pet"}, "tags": {"type": "array", "items": {
        "type": "object", "properties": {"k": {"type": "string"}}}}, "extra": {"type": "object"}},
        "$defs": {"Pet": {"type": "object", "properties": {"legs": {"type": "integer"}},
                          "additionalProperties": True}}}
    closed = closed_schema(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["extra"]  # a free-form object stays free
    assert closed["$defs"]["Pet"]["additionalProperties"] is True  # what the schema says wins
    assert "additionalProperties" not in schema  # a copy


def test_forced_arguments_hold_no_extra_keys():
    pytest.importorskip("llguidance")
    tok = build_tokenizer(300)
    open_tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}
    forced = ChatPlan.build([open_tool], "required").constraint()
    assert _accepts(tok, forced, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert not _accepts(tok, forced, '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    fmt = {"type": "json_schema", "json_schema": {"name": "f", "schema": open_tool["function"]["parameters"]}}
    assert ChatPlan.build(response_format=fmt).constraint().schema_dict()["additionalProperties"] is False


def test_prompt_plain_and_with_tools():
    tok = build_tokenizer(300)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    plain = ChatPlan.build().prompt_ids(tok, messages)
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert plain == list(want["input_ids"] if hasattr(want, "keys") else want)
    offered = tok.decode(ChatPlan.build([WEATHER], "auto").prompt_ids(tok, messages))
    assert json.dumps(WEATHER) in offered and "<tool_call>" in offered
    assert "get_weather" not in tok.decode(ChatPlan.build([WEATHER], "none").prompt_ids(tok, messages))
    templated = ChatPlan.build([WEATHER, ADD], "auto").render(tok, messages, chat_template=TOOLS_TEMPLATE)
    assert templated.startswith("<|tools|>get_weather;add;<|user|>\nWeather in Oslo?")


def test_parse_whole_reply():
    content, calls = ChatPlan.build([WEATHER, ADD]).parse(f"Let me see.\n{CALL}\n{SUM}")
    assert content == "Let me see." and [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1, "b": 2}
    _, first_only = ChatPlan.build([WEATHER, ADD], parallel_tool_calls=False).parse(f"{CALL}\n{SUM}")
    assert [c["function"]["name"] for c in first_only] == ["get_weather"]
    assert ChatPlan.build([WEATHER], "none").parse(CALL) == (CALL, [])
    assert ChatPlan.build().parse("plain") == ("plain", [])
    _, llama = ChatPlan.build([WEATHER], parser="llama3_json").parse('{"name": "get_weather", '
                                                                     '"parameters": {"city": "Oslo"}}')
    assert llama[0]["function"]["name"] == "get_weather"


def _stream(plan, text, seed):
    """Feed `text` in random pieces; returns (content, calls assembled from the deltas, parser)."""
    rng, parser, pos, content, calls = random.Random(seed), plan.stream_parser(), 0, "", {}
    pieces = []
    while pos < len(text):
        step = rng.randint(1, 9)
        pieces.append(parser.feed(text[pos:pos + step]))
        pos += step
    pieces.append(parser.finish())
    for piece in pieces:
        content += piece.content
        for delta in piece.tool_calls:
            call = calls.setdefault(delta["index"], {"name": None, "arguments": ""})
            if "id" in delta:  # a call's first delta: id, type, name and (empty or whole) arguments
                assert call["name"] is None and delta["type"] == "function"
                call["name"], call["id"] = delta["function"]["name"], delta["id"]
            call["arguments"] += delta["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)], parser


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_stream_adds_up_to_the_whole_parse(seed, parser):
    text = (f"Checking.\n{CALL}\n{SUM}" if parser == "hermes"
            else '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": '
                 '{"city": "Oslo"}}')
    plan = ChatPlan.build([WEATHER, ADD], parser=parser)
    content, calls, stream_parser = _stream(plan, text, seed)
    whole_content, whole_calls = plan.parse(text)
    assert content == (whole_content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (w["function"]["name"], json.loads(w["function"]["arguments"])) for w in whole_calls]
    assert [c["id"] for c in calls] == [c["id"] for c in stream_parser.tool_calls]


def test_stream_without_tools_passes_text_through_and_single_call_mode_drops_the_rest():
    content, calls, _ = _stream(ChatPlan.build(), f"  {CALL}", 0)
    assert content == f"  {CALL}" and calls == []
    content, calls, parser = _stream(ChatPlan.build([WEATHER, ADD], parallel_tool_calls=False), f"{CALL}\n{SUM}", 1)
    assert [c["name"] for c in calls] == ["get_weather"] and len(parser.tool_calls) == 1
    content, calls, _ = _stream(ChatPlan.build([WEATHER], parser="llama3_json"), "It is sunny.", 2)
    assert content == "It is sunny." and calls == []
