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

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 2},
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
    params = [SamplingParams(max_tokens=96, temperature=1.0, seed=s, structured_output=GuidedDecodingParams(
        json_schema=PERSON)) for s in range(SAMPLES)]
    outs = [o.outputs[0] for o in smollm2_llm.generate([prompt] * SAMPLES, params)]
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > SAMPLES // 2  # sampled: many different records


def test_choice_and_regex(smollm2_llm):
    capital = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(
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
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.mark.parametrize("choice, parallel", [({"type": "function", "function": {"name": "get_weather"}}, False),
                                              ("required", False), ("required", True)])
def test_forced_tool_call_arguments_validate(smollm2_llm, choice, parallel):
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for seed in range(2):
        out = smollm2_llm.chat([{"role": "user", "content": "Is it raining in Lyon?"}],
                               SamplingParams(max_tokens=64, temperature=1.0, seed=seed), tools=list(tools.values()),
                               tool_choice=choice, parallel_tool_calls=parallel).outputs[0]
        assert out.finish_reason == "stop" and out.tool_calls, out.text
        assert parallel or len(out.tool_calls) == 1
        for call in out.tool_calls:
            name = call["function"]["name"]
            assert name == "get_weather" if isinstance(choice, dict) else name in tools
            jsonschema.validate(json.loads(call["function"]["arguments"]), tools[name]["function"]["parameters"])


def test_unconstrained_beside_constrained_equal_alone(smollm2_llm, prompt):
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    other = {"prompt_token_ids": smollm2_llm.encode_chat([{"role": "user", "content": "Name three colours."}])}
    alone = [smollm2_llm.generate(p, greedy)[0].outputs[0].token_ids for p in (prompt, other)]
    constrained = SamplingParams(max_tokens=64, temperature=1.0, seed=3,
                                 structured_output=GuidedDecodingParams(json_schema=PERSON))
    outs = smollm2_llm.generate([prompt, prompt, other, prompt], [greedy, constrained, greedy, constrained])
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    for o in (outs[1], outs[3]):
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)
