"""HybridLLM against the engine it wraps (real langchain-core, tiny-llama on the CPU, greedy)."""
from __future__ import annotations

import asyncio

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.language_models.llms import LLM as LangChainLLM
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from langchain_hybrid import HybridLLM

PROMPT = "Once upon a time"


class TokenRecorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


class AsyncTokenRecorder(AsyncCallbackHandler):
    def __init__(self):
        self.tokens = []

    async def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


@pytest.fixture(scope="module")
def llm(engine):
    return HybridLLM(llm=engine, max_tokens=16, temperature=0.0)


def test_is_a_langchain_llm_with_identifying_params(llm):
    assert isinstance(llm, LangChainLLM) and llm._llm_type == "hybrid-engine"
    assert llm._identifying_params == {"model": "tiny-llama", "max_tokens": 16, "temperature": 0.0, "top_k": 0,
                                       "top_p": 1.0, "seed": None, "stop": None}


def test_invoke_equals_engine_greedy(llm, greedy):
    assert llm.invoke(PROMPT) == greedy(PROMPT).outputs[0].text


def test_batch_and_token_usage(llm, greedy, batched_rows):
    prompts = [PROMPT, "The capital of France is"]
    before = batched_rows()
    assert llm.batch(prompts) == [greedy(p).outputs[0].text for p in prompts]
    assert batched_rows() > before  # one engine call for the list: decoded together
    result = llm.generate(prompts)
    assert result.llm_output["token_usage"]["completion_tokens"] == 32
    assert result.generations[0][0].generation_info == {"finish_reason": "length"}


def test_stream_token_by_token_with_callbacks(llm, greedy):
    recorder = TokenRecorder()
    chunks = list(llm.stream(PROMPT, config={"callbacks": [recorder]}))
    assert len([c for c in chunks if c]) >= 2
    assert "".join(chunks) == greedy(PROMPT).outputs[0].text
    assert recorder.tokens == chunks and len(recorder.tokens) == 16  # one callback per generated token


def test_ainvoke_and_astream(llm, greedy):
    recorder = AsyncTokenRecorder()

    async def run():
        chunks = [c async for c in llm.astream(PROMPT, config={"callbacks": [recorder]})]
        return await llm.ainvoke(PROMPT), chunks

    text, chunks = asyncio.run(run())
    assert text == "".join(chunks) == greedy(PROMPT).outputs[0].text
    assert len([c for c in chunks if c]) >= 2 and recorder.tokens == chunks


def test_abatch_equals_sequential_invoke_and_is_batched(llm, batched_rows):
    prompts = [PROMPT, "The capital of France is", "def main():", "1, 2, 3,"]
    sequential = [llm.invoke(p) for p in prompts]
    before = batched_rows()
    assert asyncio.run(llm.abatch(prompts)) == sequential
    assert batched_rows() > before


def test_astream_left_early_cancels_the_request(llm, engine, greedy):
    async def first_two():
        got = []
        async for chunk in llm.astream(PROMPT):
            got.append(chunk)
            if len(got) == 2:
                break
        return got

    cancelled = engine.stats()["requests_cancelled"]
    assert len(asyncio.run(first_two())) == 2
    assert llm.invoke(PROMPT) == greedy(PROMPT).outputs[0].text  # the engine is free again
    stats = engine.stats()
    assert stats["requests_cancelled"] == cancelled + 1
    assert stats["kv_blocks_free"] + stats["kv_blocks_cached"] == stats["kv_blocks_total"]  # none held


def test_stop_sequence_honoured(llm, greedy):
    full = greedy(PROMPT).outputs[0].text
    stop = full[8:11]
    want = full[:full.index(stop)]
    assert llm.invoke(PROMPT, stop=[stop]) == want
    assert "".join(llm.stream(PROMPT, stop=[stop])) == want
    assert HybridLLM(llm=llm.llm, max_tokens=16, temperature=0.0, stop=[stop]).invoke(PROMPT) == want


def test_per_call_options(llm, greedy):
    assert llm.invoke(PROMPT, max_tokens=5) == greedy(PROMPT, 5).outputs[0].text
    a = llm.invoke(PROMPT, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    assert a == llm.invoke(PROMPT, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    with pytest.raises(ValueError, match="unsupported option.*num_beams"):
        llm.invoke(PROMPT, num_beams=2)
    with pytest.raises(ValueError, match="temperature"):
        llm.invoke(PROMPT, temperature=-1.0)


def test_lcel_chain(llm, greedy):
    chain = PromptTemplate.from_template("Tell me about {topic}.") | llm | StrOutputParser()
    assert chain.invoke({"topic": "caches"}) == greedy("Tell me about caches.").outputs[0].text


def test_construction_from_model_name_and_errors(engine):
    built = HybridLLM(model="tiny-llama", engine_kwargs={"device": "cpu", "max_model_len": 64}, max_tokens=4,
                      temperature=0.0)
    assert built.llm.max_model_len == 64 and built.invoke("Hi") == HybridLLM(
        llm=engine, max_tokens=4, temperature=0.0).invoke("Hi")
    with pytest.raises(ValueError, match="pass llm="):
        HybridLLM()
    with pytest.raises(ValueError, match="engine_kwargs"):
        HybridLLM(llm=engine, engine_kwargs={"device": "cpu"})
    with pytest.raises(ValueError, match="prompt is empty"):
        HybridLLM(llm=engine).invoke("")
