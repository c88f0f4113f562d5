"""Tool calling as pure functions (hybrid_engine.tools): tool prompt and template detection, output parsers
(whole and streamed), tool_choice checks, and forced calls whose arguments always validate (random-logit greedy
decoding through hybrid_engine.structured, no model)."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

from hybrid_engine.models.presets import build_tokenizer
from hybrid_engine.tools import (HermesToolStreamParser, chat_template_supports_tools, forced_tool_call_params,
                                 hermes_tool_system_prompt, parse_hermes_tool_calls, parse_llama3_json_tool_calls,
                                 parse_tool_calls, render_tool_chat, resolve_tool_choice, tool_call_schema,
                                 validate_tools)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def arguments(call):
    return json.loads(call["function"]["arguments"])


# --- prompt ---------------------------------------------------------------------------------------------------

def test_template_tools_support_is_detected():
    tok = build_tokenizer(300)
    assert not chat_template_supports_tools(tok)                       # the preset template ignores tools
    assert chat_template_supports_tools(tok, chat_template=TOOLS_TEMPLATE)
    assert not chat_template_supports_tools(tok, chat_template="{{ raise_exception('no tools') }}")


def test_smollm2_template_ignores_tools(smollm2_tokenizer):
    assert not chat_template_supports_tools(smollm2_tokenizer)


def test_default_tool_prompt_describes_tools_and_format(smollm2_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    prompt = render_tool_chat(smollm2_tokenizer, messages, TOOLS, "required")
    assert prompt.count("<|im_start|>system") == 1 and "Be brief." in prompt
    assert json.dumps(WEATHER) in prompt and json.dumps(ADD) in prompt
    assert '<tool_call>\n{"name": "<function name>", "arguments"' in prompt
    assert "You must call at least one function" in prompt
    assert "get_weather" not in render_tool_chat(smollm2_tokenizer, messages, TOOLS, "none")


def test_tool_history_is_rendered_without_template_support():
    tok = build_tokenizer(300)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    prompt = render_tool_chat(tok, messages, [ADD])
    assert '<|assistant|>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in prompt
    assert "<|user|>\n<tool_response>\n3\n</tool_response>" in prompt


def test_template_with_tools_support_gets_the_tools():
    prompt = render_tool_chat(build_tokenizer(300), [{"role": "user", "content": "hi"}], TOOLS,
                              chat_template=TOOLS_TEMPLATE)
    assert prompt.startswith("<|tools|>get_weather;add;") and "<tools>" not in prompt


def test_named_choice_prompt_line():
    assert "You must call the function 'add' now." in hermes_tool_system_prompt(TOOLS, "add")


# --- parsers ----------------------------------------------------------------------------------------------------

def test_hermes_several_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2.5}}</tool_call>')
    content, calls = parse_hermes_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert arguments(calls[0]) == {"city": "Oslo", "unit": "celsius"} and arguments(calls[1]) == {"a": 1, "b": 2.5}
    assert all(c["type"] == "function" and CALL_ID.match(c["id"]) for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_hermes_only_calls_has_no_content():
    content, calls = parse_hermes_tool_calls('<tool_call>{"name": "add", "parameters": {"a": 1, "b": 2}}</tool_call>')
    assert content is None and arguments(calls[0]) == {"a": 1, "b": 2}


@pytest.mark.parametrize("text", [
    "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1</tool_call>",   # broken JSON
    "<tool_call>{\"arguments\": {}}</tool_call>",                          # no name
    "<tool_call>[1, 2]</tool_call>",                                        # not an object
    "<tool_call>{\"name\": \"add\", \"arguments\": {}}",                     # never closed
    "plain answer, no calls",
])
def test_hermes_malformed_is_content(text):
    assert parse_hermes_tool_calls(text) == (text, [])


def test_llama3_json_forms():
    content, calls = parse_llama3_json_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert content is None and calls[0]["function"]["name"] == "add" and arguments(calls[0]) == {"a": 1, "b": 2}
    content, calls = parse_llama3_json_tool_calls(
        'Calling.<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}')
    assert content == "Calling." and [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    for text in ['{"name": "add", "parameters": {"a": 1', "The answer is 3.", '{"a": 1}', '{"name": "x"} tail']:
        assert parse_llama3_json_tool_calls(text) == (text, [])


def test_unknown_parser_is_named():
    with pytest.raises(ValueError, match="unknown tool-call parser 'mistral'"):
        parse_tool_calls("x", "mistral")


# --- streaming --------------------------------------------------------------------------------------------------

STREAM_TEXT = ('I will look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Sa\\"o <x>}",'
               ' "unit": "celsius", "days": [1, {"d": 2}]}}\n</tool_call>\n<tool_call>\n{"arguments": {"a": 1, '
               '"b": 2}, "name": "add"}\n</tool_call>\n<tool')


def stream(text, sizes):
    parser, deltas, pos = HermesToolStreamParser(), [], 0
    while pos < len(text):
        n = sizes[len(deltas) % len(sizes)]
        deltas.append(parser.feed(text[pos:pos + n]))
        pos += n
    deltas.append(parser.finish())
    return parser, deltas


@pytest.mark.parametrize("seed", range(8))
def test_stream_matches_whole_parse(seed):
    sizes = [1] if seed == 0 else [random.Random(seed).randint(1, 9) for _ in range(50)]
    parser, deltas = stream(STREAM_TEXT, sizes)
    content = "".join(d.content for d in deltas)
    whole_content, whole_calls = parse_hermes_tool_calls(STREAM_TEXT)
    assert content == whole_content == "I will look that up.\n\n\n<tool"
    firsts = [d for delta in deltas for d in delta.tool_calls if "id" in d]
    assert [(d["index"], d["type"], d["function"]["name"], d["function"]["arguments"]) for d in firsts[:1]] == [
        (0, "function", "get_weather", "")]
    assert [d["function"]["name"] for d in firsts] == ["get_weather", "add"]
    for index, call in enumerate(whole_calls):
        fragments = "".join(d["function"]["arguments"] for delta in deltas for d in delta.tool_calls
                            if d["index"] == index)
        assert json.loads(fragments) == arguments(call)
        assert json.loads(parser.tool_calls[index]["function"]["arguments"]) == arguments(call)


def test_stream_argument_fragments_come_before_the_block_closes():
    parser = HermesToolStreamParser()
    head = parser.feed('<tool_call>{"name": "add", "arguments": {"a": ')
    assert head.tool_calls[0]["function"]["name"] == "add" and head.tool_calls[1]["function"]["arguments"] == '{"a": '
    more = parser.feed("12")
    assert more.tool_calls == [{"index": 0, "function": {"arguments": "12"}}] and more.content == ""


def test_stream_malformed_block_becomes_content():
    parser = HermesToolStreamParser()
    text = "Hi <tool_call>not json</tool_call> bye"
    out = [parser.feed(ch) for ch in text] + [parser.finish()]
    assert "".join(d.content for d in out) == text and not any(d.tool_calls for d in out)


# --- tool_choice and definitions --------------------------------------------------------------------------------

def test_resolve_tool_choice():
    assert resolve_tool_choice(None, TOOLS) == "auto" and resolve_tool_choice(None, []) == "none"
    assert resolve_tool_choice("required", TOOLS) == "required"
    assert resolve_tool_choice({"type": "function", "function": {"name": "add"}}, TOOLS) == "add"
    with pytest.raises(ValueError, match=r"'mul', which is not in tools \['get_weather', 'add'\]"):
        resolve_tool_choice({"type": "function", "function": {"name": "mul"}}, TOOLS)
    with pytest.raises(ValueError, match="tool_choice must be"):
        resolve_tool_choice("always", TOOLS)
    with pytest.raises(ValueError, match="'required' needs at least one tool"):
        resolve_tool_choice("required", [])


@pytest.mark.parametrize("tools, words", [
    ([{"type": "function"}], "tools[0].function must be an object"),
    ([{"type": "retrieval", "function": {"name": "x"}}], "tools[0] must be an object with type 'function'"),
    ([ADD, {"type": "function", "function": {"name": "bad name"}}], "tools[1].function.name must match"),
    ([ADD, ADD], "tools[1]: duplicate function name 'add'"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "parameters must be a JSON schema"),
])
def test_malformed_tools_are_named(tools, words):
    with pytest.raises(ValueError) as info:
        validate_tools(tools)
    assert words in str(info.value)
    assert validate_tools(TOOLS) is TOOLS


def test_tool_call_schema_for_a_named_function():
    schema = tool_call_schema(TOOLS, "add")
    assert schema["properties"]["name"] == {"const": "add"} and schema["properties"]["arguments"]["required"]
    assert forced_tool_call_params(TOOLS, "auto") is None and forced_tool_call_params(TOOLS, "none") is None


# --- forced calls through the grammar (random logits, no model) --------------------------------------------------

def forced_decode(tokenizer, params, seed, max_steps=400):
    from hybrid_engine.structured import allocate_token_bitmask, apply_token_bitmask, compiler_for

    matcher = compiler_for(tokenizer).compile(params).matcher()
    bitmask = allocate_token_bitmask(1, matcher.vocab_size)
    gen, tokens = torch.Generator().manual_seed(seed), []
    for _ in range(max_steps):
        matcher.fill_bitmask(bitmask[0])
        logits = torch.randn(1, matcher.vocab_size, generator=gen)
        apply_token_bitmask(logits, bitmask)
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id or matcher.is_terminated():
            break
        assert matcher.accept(token), matcher.error()
        tokens.append(token)
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("choice, parallel, seed", [("required", False, 0), ("required", False, 1),
                                                    ("required", True, 2), ("get_weather", False, 3),
                                                    ("add", True, 4)])
def test_forced_hermes_call_validates(smollm2_tokenizer, choice, parallel, seed):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    text = forced_decode(smollm2_tokenizer, forced_tool_call_params(TOOLS, choice, parallel), seed)
    content, calls = parse_hermes_tool_calls(text)
    assert content is None and calls, text
    assert parallel or len(calls) == 1
    by_name = {t["function"]["name"]: t for t in TOOLS}
    for call in calls:
        assert choice == "required" or call["function"]["name"] == choice
        jsonschema.validate(arguments(call), by_name[call["function"]["name"]]["function"]["parameters"])


def test_forced_llama3_json_call_validates(smollm2_tokenizer):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    text = forced_decode(smollm2_tokenizer, forced_tool_call_params(TOOLS, "get_weather", fmt="llama3_json"), 5)
    content, calls = parse_llama3_json_tool_calls(text)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"], text
    jsonschema.validate(arguments(calls[0]), WEATHER["function"]["parameters"])
