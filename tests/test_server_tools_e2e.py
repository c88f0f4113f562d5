"""Tool calls and structured output through the real server process on learned weights (SmolLM2-135M-Instruct),
spoken to with the official `openai` client: forced tool calls (named and "required"), a strict JSON schema, and
the same replies streamed as OpenAI streams them; bad tools, tool_choice and schemas answered 400 naming the
field while another request streams on unaffected. One server process for the module (greedy decoding, so a
streamed reply must equal the non-streamed one token for token)."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from test_server_e2e import Server  # noqa: E402  (the server-process harness of the plain e2e tests)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server_tools"), model=MODEL, max_model_len=1024,
                 extra=("--dtype", "float32", "--device", "cpu"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _chat(srv: Server, **kw: Any) -> Any:
    return srv.client.chat.completions.create(model=MODEL, temperature=0, **kw)


def _streamed(srv: Server, **kw: Any) -> tuple[str, dict[int, dict[str, Any]], list[Any], str | None]:
    """A streamed chat: (content, calls by index assembled from the deltas, the tool-call deltas, finish)."""
    content, calls, deltas, finish = "", {}, [], None
    for chunk in _chat(srv, stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            deltas.append(d)
            call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, deltas, finish


def _check_calls(message: Any, names: set[str]) -> list[tuple[str, dict[str, Any]]]:
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


def test_named_tool_choice_forces_a_valid_call_streamed_and_not(server: Server) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    resp = _chat(server, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=40)
    assert resp.choices[0].finish_reason == "tool_calls", resp
    calls = _check_calls(resp.choices[0].message, {"get_weather"})
    assert len(calls) == 1 and not resp.choices[0].message.content
    content, streamed, deltas, finish = _streamed(server, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                  max_tokens=40)
    assert finish == "tool_calls" and content == ""
    first = deltas[0]  # as OpenAI streams a call: index, id, type, name and empty arguments first
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                        "get_weather", "")
    assert first.id.startswith("call_") and all(d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2  # the arguments arrive in pieces, as they are generated
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == calls


def test_required_tool_choice_calls_one_of_the_tools(server: Server) -> None:
    resp = _chat(server, messages=[{"role": "user", "content": "What time is it in Rome?"}], tools=TOOLS,
                 tool_choice="required", parallel_tool_calls=False, max_tokens=40)
    assert resp.choices[0].finish_reason == "tool_calls"
    assert len(_check_calls(resp.choices[0].message, {"get_weather", "get_time"})) == 1


def test_auto_tool_choice_after_an_example_call(server: Server) -> None:
    """tool_choice "auto" (nothing forced): with one earlier call in the conversation as an example, the model
    writes a call of its own, which the server parses into tool_calls, streamed and not."""
    example = {"id": "call_1", "type": "function",
               "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "What time is it in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [example]},
                {"role": "user", "content": "What time is it in Paris?"}]
    resp = _chat(server, messages=messages, tools=TOOLS, tool_choice="auto", max_tokens=32)
    assert resp.choices[0].finish_reason == "tool_calls", resp
    calls = _check_calls(resp.choices[0].message, {"get_weather", "get_time"})
    content, streamed, _, finish = _streamed(server, messages=messages, tools=TOOLS, max_tokens=32)
    assert finish == "tool_calls" and content == (resp.choices[0].message.content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == calls


def test_strict_json_schema_streamed_and_not(server: Server) -> None:
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    resp = _chat(server, messages=messages, response_format=PERSON_FORMAT, max_tokens=40)
    assert resp.choices[0].finish_reason == "stop" and not resp.choices[0].message.tool_calls
    text = resp.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    content, calls, _, finish = _streamed(server, messages=messages, response_format=PERSON_FORMAT,
                                          max_tokens=40)
    assert (content, calls, finish) == (text, {}, "stop")


def test_completions_response_format(server: Server) -> None:
    resp = server.client.completions.create(model=MODEL, prompt="Three colors as JSON:", max_tokens=24,
                                            temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(resp.choices[0].text), dict)


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools", "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools",
     "tools[0].function.parameters: invalid json_schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice",
     "'get_news', which is not in tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": PERSON_FORMAT}, "response_format",
     "cannot be combined with tool_choice='required'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}}},
     "response_format", "invalid json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "type one of"),
]


def test_bad_input_is_400_naming_the_field_while_another_request_streams_on(server: Server) -> None:
    done: dict[str, Any] = {}
    started = threading.Event()

    def stream_in_flight() -> None:
        text = ""
        for chunk in _chat(server, messages=ASK, max_tokens=16, stream=True, extra_body={"ignore_eos": True}):
            started.set()
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            done["finish"] = (chunk.choices[0].finish_reason if chunk.choices else None) or done.get("finish")
        done["text"] = text

    worker = threading.Thread(target=stream_in_flight)
    worker.start()
    assert started.wait(120), server.log()
    for fields, param, words in BAD:
        r = httpx.post(f"{server.base}/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": ASK, "max_tokens": 4, **fields})
        assert r.status_code == 400, (fields, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        _chat(server, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    worker.join(240)
    assert done.get("finish") == "length" and done["text"], done  # the stream in flight ran to its end
