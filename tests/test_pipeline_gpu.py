"""The hybrid pipeline on a CUDA GPU (float32, so greedy tokens can be compared exactly with transformers)."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TextIteratorStreamer

from hybrid_engine import pipeline
from hybrid_engine.models.presets import build_tokenizer

pytestmark = pytest.mark.gpu
GREEDY = dict(max_new_tokens=24, do_sample=False)
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def pipes():
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to("cuda")
    tokenizer = build_tokenizer(512)
    hybrid = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cuda", dtype=torch.float32)
    stock = pipeline("text-generation", model=model, tokenizer=tokenizer, engine="transformers", device="cuda")
    return hybrid, stock


def test_runs_on_the_gpu(pipes):
    hybrid, _ = pipes
    assert hybrid.device.type == "cuda" and hybrid.model.llm.stats()["device"].startswith("cuda")


@pytest.mark.parametrize("inputs", ["Hello there", ["a b c", "The quick brown fox"], CHAT])
def test_greedy_equals_transformers_on_gpu(pipes, inputs):
    hybrid, stock = pipes
    for _ in range(2):  # the second call may replay captured graphs
        assert hybrid(inputs, **GREEDY) == stock(inputs, **GREEDY)


def test_text_iterator_streamer_on_gpu(pipes):
    hybrid, stock = pipes
    streamer = TextIteratorStreamer(hybrid.tokenizer, skip_prompt=True, timeout=60)
    result = []
    worker = threading.Thread(target=lambda: result.append(
        hybrid("Hello there", streamer=streamer, return_full_text=False, **GREEDY)))
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == result[0][0]["generated_text"] == stock("Hello there", return_full_text=False,
                                                             **GREEDY)[0]["generated_text"]
