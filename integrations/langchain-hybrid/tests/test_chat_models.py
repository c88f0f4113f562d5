"""ChatHybrid against the engine it wraps: chat template applied, usage metadata, streaming, LCEL."""
from __future__ import annotations

import asyncio

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_hybrid import ChatHybrid

MESSAGES = [SystemMessage("You are terse."), HumanMessage("Name a color.")]
DICTS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


class TokenRecorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


@pytest.fixture(scope="module")
def chat(engine):
    return ChatHybrid(llm=engine, max_tokens=16, temperature=0.0)


def test_is_a_chat_model_with_identifying_params(chat):
    assert isinstance(chat, BaseChatModel) and chat._llm_type == "hybrid-engine-chat"
    assert chat._identifying_params["model"] == "tiny-llama" and chat._identifying_params["max_tokens"] == 16
    assert chat._get_ls_params()["ls_provider"] == "hybrid_engine"


def test_invoke_applies_the_chat_template_and_reports_usage(chat, engine, greedy):
    template_ids = engine.tokenizer.apply_chat_template(DICTS, add_generation_prompt=True, tokenize=True)
    template_ids = template_ids["input_ids"] if hasattr(template_ids, "keys") else template_ids
    want = greedy(DICTS)
    msg = chat.invoke(MESSAGES)
    assert isinstance(msg, AIMessage) and msg.content == want.outputs[0].text
    assert want.prompt_token_ids == list(template_ids)
    assert msg.usage_metadata == {"input_tokens": len(template_ids), "output_tokens": 16,
                                  "total_tokens": len(template_ids) + 16}
    assert msg.response_metadata["finish_reason"] == "length"


CONVS = [MESSAGES, [HumanMessage("Hi!")], [HumanMessage("What is 2+2?")], [SystemMessage("Be kind."),
                                                                         HumanMessage("Hello")]]


def test_batch_equals_sequential_invoke_and_is_batched(chat, greedy, batched_rows):
    sequential = [chat.invoke(c).content for c in CONVS]
    assert sequential[:2] == [greedy(DICTS).outputs[0].text,
                              greedy([{"role": "user", "content": "Hi!"}]).outputs[0].text]
    before = batched_rows()
    assert [m.content for m in chat.batch(CONVS)] == sequential
    assert batched_rows() > before


def test_abatch_equals_sequential_invoke_and_is_batched(chat, batched_rows):
    sequential = [chat.invoke(c) for c in CONVS]
    before = batched_rows()
    got = asyncio.run(chat.abatch(CONVS))
    assert [m.content for m in got] == [m.content for m in sequential]
    assert [m.usage_metadata for m in got] == [m.usage_metadata for m in sequential]
    assert batched_rows() > before


def test_stream_chunks_callbacks_and_usage(chat, greedy):
    recorder = TokenRecorder()
    chunks = list(chat.stream(MESSAGES, config={"callbacks": [recorder]}))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert len([c for c in chunks if c.content]) >= 2
    total = sum(chunks[1:], chunks[0])
    assert total.content == greedy(DICTS).outputs[0].text
    assert total.usage_metadata["output_tokens"] == 16
    assert total.usage_metadata["input_tokens"] == len(greedy(DICTS).prompt_token_ids)
    assert recorder.tokens == [c.content for c in chunks]


def test_ainvoke_and_astream(chat, greedy):
    async def run():
        chunks = [c async for c in chat.astream(MESSAGES)]
        return await chat.ainvoke(MESSAGES), chunks

    msg, chunks = asyncio.run(run())
    assert msg.content == "".join(c.content for c in chunks) == greedy(DICTS).outputs[0].text
    assert len([c for c in chunks if c.content]) >= 2 and msg.usage_metadata["output_tokens"] == 16


def test_stop_sequence_honoured(chat, greedy):
    full = greedy(DICTS).outputs[0].text
    stop = full[6:9]
    want = full[:full.index(stop)]
    msg = chat.invoke(MESSAGES, stop=[stop])
    assert msg.content == want and msg.response_metadata["finish_reason"] == "stop"
    assert "".join(c.content for c in chat.stream(MESSAGES, stop=[stop])) == want


def test_lcel_chain(chat, greedy):
    prompt = ChatPromptTemplate.from_messages([("system", "You are terse."), ("human", "Name a {thing}.")])
    chain = prompt | chat | StrOutputParser()
    assert chain.invoke({"thing": "color"}) == greedy(DICTS).outputs[0].text
    assert "".join(chain.stream({"thing": "color"})) == greedy(DICTS).outputs[0].text


def test_construction_from_model_name(engine):
    chat = ChatHybrid(model="tiny-llama", engine_kwargs={"device": "cpu", "max_model_len": 64}, max_tokens=4,
                      temperature=0.0)
    assert chat.invoke("Hi").content == ChatHybrid(llm=engine, max_tokens=4, temperature=0.0).invoke("Hi").content


def test_bad_input(chat):
    with pytest.raises(ValueError, match="messages is empty"):
        chat.invoke([])
    with pytest.raises(ValueError, match="unsupported option.*frequency_penalty"):
        chat.invoke(MESSAGES, frequency_penalty=0.5)
    with pytest.raises(ValueError, match="'image_url' is not supported"):
        chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])])
