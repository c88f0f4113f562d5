"""Grammar-constrained sampling on learned weights (SmolLM2-135M-Instruct, CPU): 100 samples at temperature 1.0
under a JSON schema all validate; regex and choice constraints hold; forced tool calls give arguments valid for
the tool's schema; unconstrained requests batched beside constrained ones get the tokens they get alone."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from hybrid_engine import GuidedDecodingParams, SamplingParams  # noqa: E402

PERSON = {  # short keys and bounded values: ~30 tokens a record, so 100 of them stay cheap on a CPU
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
                 "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "age", "role", "home", "tags"],
    "additionalProperties": False,
}
SAMPLES = 100


@pytest.fixture(scope="module")
def prompt(smollm2_llm):
    return {"prompt_token_ids": smollm2_llm.encode_chat(
        [{"role": "user", "content": "Describe a person as JSON."}])}


def test_json_schema_samples_at_temperature_1_all_validate(smollm2_llm, prompt):
    params = [SamplingParams(max_tokens=72, temperature=1.0, seed=s, structured_output=GuidedDecodingParams(
        json_schema=PERSON)) for s in range(SAMPLES)]
    outs = [o.outputs[0] for o in smollm2_llm.generate([prompt] * SAMPLES, params)]
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > SAMPLES // 2  # sampled: many different records


def test_choice_and_regex(smollm2_llm):
    question = "What is the capital of France? Answer with one word."
    capital = smollm2_llm.chat([{"role": "user", "content": question}], SamplingParams(
        max_tokens=8, temperature=0, structured_output=GuidedDecodingParams(choice=["London", "Paris", "Rome"])))
    assert capital.outputs[0].text == "Paris" and capital.outputs[0].finish_reason == "stop"
    date = r"(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]"
    outs = smollm2_llm.generate(
        [{"prompt_token_ids": smollm2_llm.encode_chat([{"role": "user", "content": "When did Apollo 11 land?"}])}] * 4,
        [SamplingParams(max_tokens=16, temperature=1.0, seed=s, structured_output=GuidedDecodingParams(regex=date))
         for s in range(4)])
    for o in outs:
        assert re.fullmatch(date, o.outputs[0].text), o.outputs[0].text


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_time"}}, "required"])
def test_forced_tool_call_arguments_validate(smollm2_llm, choice):
    """Two sampled calls (parallel_tool_calls=True, the repeating grammar, is covered on random logits in
    test_tools.py: a small model tends to repeat calls until max_tokens)."""
    tools = {"get_weather": WEATHER, "get_time": TIME}
    chat = [{"role": "user", "content": "Is it raining in Lyon?"}]
    outs = [smollm2_llm.chat(chat, SamplingParams(max_tokens=64, temperature=1.0, seed=seed), tools=list(
        tools.values()), tool_choice=choice, parallel_tool_calls=False).outputs[0] for seed in range(2)]
    for out in outs:
        assert out.finish_reason == "stop" and len(out.tool_calls) == 1, out.text
        name = out.tool_calls[0]["function"]["name"]
        assert name == "get_time" if isinstance(choice, dict) else name in tools
        jsonschema.validate(json.loads(out.tool_calls[0]["function"]["arguments"]),
                            tools[name]["function"]["parameters"])


def test_unconstrained_beside_constrained_equal_alone(smollm2_llm, prompt):
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    other = {"prompt_token_ids": smollm2_llm.encode_chat([{"role": "user", "content": "Name three colours."}])}
    alone = [smollm2_llm.generate(p, greedy)[0].outputs[0].token_ids for p in (prompt, other)]
    constrained = SamplingParams(max_tokens=72, temperature=1.0, seed=3,
                                 structured_output=GuidedDecodingParams(json_schema=PERSON))
    outs = smollm2_llm.generate([prompt, prompt, other, prompt], [greedy, constrained, greedy, constrained])
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    for o in (outs[1], outs[3]):
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)
