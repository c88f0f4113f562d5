"""langchain_huggingface.HuggingFacePipeline over the hybrid pipeline: invoke and stream equal the stock pipeline's.

HuggingFacePipeline's streaming runs `pipeline(prompt, streamer=TextIteratorStreamer, stopping_criteria=...)` in a
thread, which reaches `pipe.model.generate(streamer=..., stopping_criteria=...)`: HybridModelForCausalLM's path.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("langchain_huggingface", reason="needs the test extra (langchain-huggingface)")
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import PromptTemplate  # noqa: E402
from langchain_huggingface import HuggingFacePipeline  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_engine import LLM, pipeline

GREEDY = dict(max_new_tokens=16, do_sample=False)


@pytest.fixture(scope="module")
def pipes():
    tokenizer = LLM("tiny-llama", device="cpu", max_model_len=64).tokenizer
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    # generation defaults set on the pipelines: HuggingFacePipeline only forwards per-call pipeline_kwargs
    hybrid = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu", **GREEDY)
    stock = pipeline("text-generation", model=model, tokenizer=tokenizer, engine="transformers", device="cpu",
                     **GREEDY)
    return HuggingFacePipeline(pipeline=hybrid), HuggingFacePipeline(pipeline=stock)


def test_invoke_and_batch_equal_stock(pipes):
    hybrid, stock = pipes
    assert hybrid.invoke("Hello there") == stock.invoke("Hello there")
    prompts = ["Once upon a time", "abc"]
    assert hybrid.batch(prompts) == stock.batch(prompts)


def test_stream_is_token_by_token_and_equals_stock(pipes):
    hybrid, stock = pipes
    chunks = list(hybrid.stream("Hello there"))
    assert sum(1 for c in chunks if c) >= 2
    assert "".join(chunks) == "".join(stock.stream("Hello there"))
    full = hybrid.invoke("Hello there", pipeline_kwargs={"return_full_text": False})
    assert "".join(chunks) == full


def test_stream_stop_token_goes_through_stopping_criteria(pipes):
    hybrid, stock = pipes
    tokenizer = hybrid.pipeline.tokenizer
    ids = hybrid.pipeline("Hello there", return_tensors=True)[0]["generated_token_ids"]
    stop_token = tokenizer.convert_ids_to_tokens(ids[len(tokenizer("Hello there")["input_ids"]) + 4])
    got = "".join(hybrid.stream("Hello there", stop=[stop_token]))
    assert got == "".join(stock.stream("Hello there", stop=[stop_token]))
    assert len(got) < len("".join(hybrid.stream("Hello there")))


def test_lcel_chain(pipes):
    hybrid, stock = pipes
    prompt = PromptTemplate.from_template("Q: {q}\nA:")
    assert (prompt | hybrid | StrOutputParser()).invoke({"q": "2+2?"}) == \
        (prompt | stock | StrOutputParser()).invoke({"q": "2+2?"})
