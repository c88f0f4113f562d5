"""The engine on learned weights: SmolLM2-135M-Instruct (GGUF) against transformers reading the same file.

CPU, float32, greedy. Each prompt is rendered with the model's chat template and compared over 64 new tokens
(EOS ignored on both sides, so every prompt compares the full 64).
"""
import random

import pytest
import torch

from hybrid_engine import SamplingParams

NEW_TOKENS = 64
CHATS = {
    "fact": [{"role": "user", "content": "What is the capital of France?"}],
    "haiku": [{"role": "user", "content": "Write a haiku about the sea."}],
    "system": [{"role": "system", "content": "You answer like a pirate."},
               {"role": "user", "content": "How do I boil an egg?"}],
    "multi-turn": [{"role": "user", "content": "Name a planet."},
                   {"role": "assistant", "content": "Mars."},
                   {"role": "user", "content": "How far is it from the Sun?"}],
    "code": [{"role": "user", "content": "Write a Python function that reverses a string."}],
}


def _random_chat(seed: int, tokenizer) -> list[dict]:
    """A question made of vocabulary words drawn at random: a prompt nobody tuned the test around."""
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]).strip() for i in rng.sample(range(1000, 20000), 400))
             if w.isalpha() and len(w) > 3][:12]
    return [{"role": "user", "content": "Explain " + " ".join(words) + "?"}]


def _hf_greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", [*CHATS, "random-words-1", "random-words-2"])
def test_greedy_tokens_equal_transformers(smollm2_llm, smollm2_hf, name):
    assert smollm2_llm.dtype == torch.float32 and smollm2_llm.device.type == "cpu"
    chat = CHATS[name] if name in CHATS else _random_chat(int(name[-1]), smollm2_llm.tokenizer)
    ids = smollm2_llm.encode_chat(chat)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    ours = smollm2_llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
    ref = _hf_greedy(smollm2_hf, ids)
    assert len(ref) == NEW_TOKENS
    assert ours == ref, (smollm2_llm.tokenizer.decode(ours), smollm2_llm.tokenizer.decode(ref))


def test_answers_a_question(smollm2_llm):
    """Learned weights, not noise: the chat template is applied and the model stops at its end-of-turn token."""
    out = smollm2_llm.chat(CHATS["fact"], SamplingParams(max_tokens=32, temperature=0.0))
    assert "Paris" in out.outputs[0].text and out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("inputs", ["Tell me about CUDA graphs",
                                    [{"role": "user", "content": "What is a KV cache?"}]])
def test_pipeline_matches_stock_pipeline(smollm2_pipe, smollm2_ref_pipe, inputs):
    ours = smollm2_pipe(inputs, max_new_tokens=40)
    ref = smollm2_ref_pipe(inputs, max_new_tokens=40)
    assert ours == ref
    text = ours[0]["generated_text"]
    assert (text[-1]["content"] if isinstance(text, list) else text).strip()
