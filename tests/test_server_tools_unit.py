"""The server's tool-call and response-format wire format against a scripted engine (no model, deterministic):
the reply text is fixed, so the JSON body, the SSE chunks and the constraint handed to the engine can be checked
exactly; bad fields are 400s naming them, before the engine sees the request."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from test_server_unit import FakeLLM, _post, _serving  # noqa: E402  (the scripted-engine harness)

from hybrid_engine.models.presets import build_tokenizer  # noqa: E402
from hybrid_engine.outputs import RequestMetrics, StreamDelta  # noqa: E402

pytestmark = pytest.mark.timeout(60)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
ASK = [{"role": "user", "content": "Weather in Oslo?"}]
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


class ScriptedLLM(FakeLLM):
    """Replies with `script` in pieces of 5 characters, one token each; records what it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = build_tokenizer(300)
        self.config.max_model_len = 4096
        self.script = CALL
        self.seen: list[tuple[Any, Any]] = []

    async def astream_deltas(self, prompt: Any, params: Any) -> AsyncIterator[StreamDelta]:
        self.seen.append((prompt, params))
        pieces = [self.script[i:i + 5] for i in range(0, len(self.script), 5)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            metrics = RequestMetrics(prompt_tokens=3, generated_tokens=len(pieces)) if last else None
            yield StreamDelta(piece, [i], "stop" if last else None, metrics)


@pytest.fixture()
def scripted() -> Iterator[tuple[ScriptedLLM, str]]:
    llm = ScriptedLLM()
    with _serving(llm, chat_template=TEMPLATE) as base:
        yield llm, base


def _sse(base: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=10) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_tool_calls_in_the_body(scripted: tuple[ScriptedLLM, str]) -> None:
    llm, base = scripted
    body = {"model": "fake", "messages": ASK, "tools": [WEATHER], "tool_choice": "required"}
    r = _post(base, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    prompt, params = llm.seen[-1]
    rendered = llm.tokenizer.decode(prompt["prompt_token_ids"])
    assert rendered.startswith("[system] You can call functions") and json.dumps(WEATHER) in rendered
    assert rendered.endswith("[user] Weather in Oslo?\n[assistant] ")  # the server's --chat-template
    assert params.structured_output.kind == "grammar" and "get_weather" in params.structured_output.grammar


def test_tool_calls_streamed_as_openai_streams_them(scripted: tuple[ScriptedLLM, str]) -> None:
    llm, base = scripted
    llm.script = "Let me check.\n" + CALL
    chunks = _sse(base, {"model": "fake", "messages": ASK, "tools": [WEATHER]})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": calls[0]["id"], "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"} for tc in calls[1:])
    assert len(calls) > 2 and "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Oslo"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert llm.seen[-1][1].structured_output is None  # "auto" (the default with tools): nothing forced


def test_tool_choice_none_and_plain_text_stay_content(scripted: tuple[ScriptedLLM, str]) -> None:
    llm, base = scripted
    r = _post(base, "/v1/chat/completions", {"model": "fake", "messages": ASK, "tools": [WEATHER],
                                             "tool_choice": "none"})
    message = r.json()["choices"][0]["message"]
    assert message["content"] == CALL and "tool_calls" not in message
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert "get_weather" not in llm.tokenizer.decode(llm.seen[-1][0]["prompt_token_ids"])


def test_response_format_becomes_the_constraint(scripted: tuple[ScriptedLLM, str]) -> None:
    llm, base = scripted
    llm.script = '{"a": 1}'
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    r = _post(base, "/v1/chat/completions", {"model": "fake", "messages": ASK, "response_format": fmt})
    assert r.json()["choices"][0]["message"]["content"] == '{"a": 1}'
    assert llm.seen[-1][1].structured_output.schema_dict() == {**schema, "additionalProperties": False}
    r = _post(base, "/v1/completions", {"model": "fake", "prompt": "x", "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and llm.seen[-1][1].structured_output.kind == "json_object"
    r = _post(base, "/v1/completions", {"model": "fake", "prompt": "x", "response_format": {"type": "text"}})
    assert r.status_code == 200 and llm.seen[-1][1].structured_output is None


@pytest.mark.parametrize(("path", "fields", "param", "words"), [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools",
     "tools[0].function.name"),
    ("/v1/chat/completions", {"tools": "get_weather"}, "tools", "valid array"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice", "'x', which is not in tools"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format", "both force"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integr"}}}}}},
     "response_format", "invalid json_schema"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "needs json_schema"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions", "not supported"),
])
def test_bad_fields_are_400_before_the_engine(scripted: tuple[ScriptedLLM, str], path: str, fields: dict,
                                              param: str, words: str) -> None:
    llm, base = scripted
    body = {"model": "fake", **({"messages": ASK} if "chat" in path else {"prompt": "x"}), **fields}
    r = _post(base, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert llm.seen == []


def test_chat_template_option_takes_a_file_or_the_template(tmp_path: Any) -> None:
    from hybrid_engine.server.app import build_parser, read_chat_template

    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert read_chat_template(str(path)) == TEMPLATE and read_chat_template(TEMPLATE) == TEMPLATE
    assert read_chat_template(None) is None
    with pytest.raises(ValueError, match="--chat-template='missing.jinja' is neither a readable file"):
        read_chat_template("missing.jinja")
    args = build_parser().parse_args(["--chat-template", str(path), "--tool-call-parser", "llama3_json"])
    assert (args.chat_template, args.tool_call_parser) == (str(path), "llama3_json")
