"""ChatHybrid tool calling and structured output: bind_tools (functions, pydantic models, @tools), tool calls
whole and streamed, with_structured_output, and LangGraph's prebuilt ReAct agent to the end of its loop.

Checks that need no generation run on tiny-llama; the rest on SmolLM2-135M-Instruct (learned weights, greedy,
loaded once for the module), where "required" and named tool choices and response formats are grammar-enforced,
so a reply must parse and validate whatever the small model would have said.
"""
from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_hybrid import ChatHybrid
from langchain_hybrid.chat_models import to_chat_dicts

pytestmark = pytest.mark.timeout(300)
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str = Field(max_length=12, description="City name")
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


def get_time(city: str) -> str:
    """Current time in a city.

    Args:
        city: City name.
    """
    return "12:00"


WEATHER_REPORTS: list[dict] = []


@tool
def weather(city: str) -> str:
    """Look up the current weather in a city."""
    WEATHER_REPORTS.append({"city": city})
    return f"It is 21 degrees and sunny in {city}."


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


PET = {"title": "Pet", "description": "A pet.", "type": "object",
       "properties": {"species": {"type": "string", "maxLength": 10}, "legs": {"type": "integer", "maximum": 8}},
       "required": ["species", "legs"], "additionalProperties": False}


ASK = [HumanMessage("What is the weather in Paris?")]


@pytest.fixture(scope="module")
def tiny(engine):
    return ChatHybrid(llm=engine, max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def smol():
    from hybrid_engine import LLM
    from hybrid_engine.models.presets import packaged_gguf

    try:
        packaged_gguf("smollm2-135m-instruct")
    except Exception as exc:
        pytest.skip(f"SmolLM2 GGUF not installed: {exc}")
    llm = LLM("smollm2-135m-instruct", device="cpu", dtype="float32", max_model_len=1024)
    yield ChatHybrid(llm=llm, max_tokens=40, temperature=0.0)
    llm.close()


def test_bind_tools_converts_functions_models_and_tools(tiny):
    bound = tiny.bind_tools([GetWeather, get_time, weather], tool_choice="get_time")
    tools = bound.kwargs["tools"]
    assert [t["function"]["name"] for t in tools] == ["GetWeather", "get_time", "weather"]
    assert tools[0]["function"]["parameters"]["properties"]["city"]["maxLength"] == 12
    assert tools[1]["function"]["parameters"]["required"] == ["city"]
    assert bound.kwargs["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert tiny.bind_tools([weather], tool_choice="any").kwargs["tool_choice"] == "required"
    assert tiny.bind_tools([weather], tool_choice=True).kwargs["tool_choice"]["function"]["name"] == "weather"


def test_bind_tools_refuses_bad_tools_and_names(tiny):
    with pytest.raises(ValueError, match="'get_news', which is not in tools"):
        tiny.bind_tools([weather], tool_choice="get_news")
    with pytest.raises(ValueError, match="tools\\[0\\].function.parameters: invalid json_schema"):
        tiny.bind_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}])
    with pytest.raises(ValueError, match="method='xml'"):
        tiny.with_structured_output(Person, method="xml")


def test_structured_output_binds_the_schema_and_parses(tiny):
    class Pet(TypedDict):
        """A pet."""

        species: str
        legs: int

    chain = tiny.with_structured_output(Pet)
    fmt = chain.first.kwargs["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Pet" and fmt["json_schema"]["strict"]
    assert fmt["json_schema"]["schema"]["required"] == ["species", "legs"]
    assert chain.last.invoke(AIMessage('{"species": "cat", "legs": 4}')) == {"species": "cat", "legs": 4}
    person = tiny.with_structured_output(Person, method="function_calling")
    assert person.first.kwargs["tool_choice"] == {"type": "function", "function": {"name": "Person"}}
    call = {"name": "Person", "args": {"name": "Ada", "age": 36}, "id": "call_1", "type": "tool_call"}
    assert person.last.invoke(AIMessage("", tool_calls=[call])) == Person(name="Ada", age=36)


def test_include_raw_reports_a_parsing_error_instead_of_raising():
    from langchain_core.runnables import RunnableLambda

    from langchain_hybrid._tools import structured_output_parts, with_raw

    _, parser = structured_output_parts(Person, "json_schema")
    good = with_raw(RunnableLambda(lambda _: AIMessage('{"name": "Ada", "age": 36}')), parser).invoke("x")
    assert good["parsed"] == Person(name="Ada", age=36) and good["parsing_error"] is None
    bad = with_raw(RunnableLambda(lambda _: AIMessage("not JSON")), parser).invoke("x")
    assert bad["parsed"] is None and "not JSON" in str(bad["parsing_error"]) and bad["raw"].content == "not JSON"


def test_chat_template_and_tools_reach_the_prompt(engine):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    chat = ChatHybrid(llm=engine, max_tokens=4, temperature=0.0, chat_template=template)
    prompt, params, _ = chat._request([HumanMessage("Hi")], None, {})
    assert engine.tokenizer.decode(prompt["prompt_token_ids"]) == "[user] Hi\n[assistant] "
    assert params.structured_output is None
    prompt, params, plan = chat._request([HumanMessage("Hi")], None, {
        "tools": [convert_to_openai_tool(weather)], "tool_choice": "required"})
    text = engine.tokenizer.decode(prompt["prompt_token_ids"])
    assert text.startswith("[system] You can call functions") and '"name": "weather"' in text
    assert params.structured_output.kind == "grammar" and plan.choice == "required"


def test_tool_messages_become_openai_dicts():
    call = {"name": "weather", "args": {"city": "Oslo"}, "id": "call_7", "type": "tool_call"}
    dicts = to_chat_dicts([SystemMessage("s"), HumanMessage("q"), AIMessage("", tool_calls=[call]),
                           ToolMessage("sunny", tool_call_id="call_7")])
    assert dicts[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}
    assert dicts[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_7"}


def test_forced_tool_call_streamed(smol):
    """Streamed: tool_call_chunks (name and id first, then argument pieces) that add up to one valid call. (The
    whole-reply path is the agent test's first turn.)"""
    chunks = list(smol.bind_tools([GetWeather, get_time], tool_choice="GetWeather").stream(ASK))
    pieces = [tc for c in chunks for tc in c.tool_call_chunks]
    assert pieces[0]["name"] == "GetWeather" and pieces[0]["id"].startswith("call_") and pieces[0]["index"] == 0
    assert len(pieces) > 2 and all(p["name"] is None and p["index"] == 0 for p in pieces[1:])
    total = sum(chunks[1:], chunks[0])
    assert [c["name"] for c in total.tool_calls] == ["GetWeather"] and not total.content
    GetWeather.model_validate(total.tool_calls[0]["args"])  # the grammar kept the arguments inside the schema
    assert total.response_metadata["finish_reason"] == "tool_calls"


def test_structured_output_json_schema_and_function_calling(smol):
    ask = [HumanMessage("Describe a person.")]
    person = smol.with_structured_output(Person).invoke(ask)
    assert isinstance(person, Person)
    pet = smol.with_structured_output(PET).invoke([HumanMessage("Describe a pet.")])
    assert isinstance(pet, dict)
    jsonschema.validate(pet, PET)
    raw = smol.with_structured_output(Person, method="function_calling", include_raw=True).invoke(ask)
    assert isinstance(raw["parsed"], Person) and raw["parsing_error"] is None
    assert raw["raw"].tool_calls[0]["name"] == "Person"


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")  # LangGraph 1.x: still the prebuilt agent
def test_langgraph_react_agent_runs_its_loop(smol):
    """The prebuilt ReAct agent over the real model: the first turn is forced to call the tool (the small model
    would not reliably choose to), the turn after the tool result answers in text, and the agent ends."""
    prebuilt = pytest.importorskip("langgraph.prebuilt")

    def model(state, runtime):
        answered = isinstance(state["messages"][-1], ToolMessage)
        if answered:  # a short text answer ends the loop
            return smol.bind_tools([weather], tool_choice="none", max_tokens=12)
        return smol.bind_tools([weather], tool_choice="weather")

    agent = prebuilt.create_react_agent(model, [weather])
    WEATHER_REPORTS.clear()
    result = agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]}, {"recursion_limit": 6})
    messages = result["messages"]
    calls = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    assert len(calls) == 1 and calls[0].tool_calls[0]["name"] == "weather"
    assert WEATHER_REPORTS == [calls[0].tool_calls[0]["args"]] and WEATHER_REPORTS[0]["city"]
    tool_results = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(tool_results) == 1 and tool_results[0].tool_call_id == calls[0].tool_calls[0]["id"]
    assert "21 degrees" in tool_results[0].content
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content
    assert json.dumps(WEATHER_REPORTS)  # args were plain JSON values
