"""Greedy parity with transformers on identical weights (CPU, float32)."""
import pytest
import torch
from block_helpers import blocks_settled
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.models.presets import build_tokenizer, fill_random_

VOCAB = 384
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=120, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    return {
        "llama-mha": LlamaConfig(**COMMON, num_key_value_heads=4),
        "llama3-gqa": LlamaConfig(**COMMON, num_key_value_heads=1, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
        "mistral": MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
        "qwen2": Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    }


@pytest.fixture(scope="module", params=list(_configs()))
def checkpoint(request, tmp_path_factory):
    cfg = _configs()[request.param]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    fill_random_(model, 0.08, seed=1)
    if cfg.model_type == "qwen2":  # non-zero q/k/v biases so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    build_tokenizer(VOCAB).save_pretrained(path)
    return request.param, model, path


def _hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_greedy_tokens_match_transformers(checkpoint):
    name, model, path = checkpoint
    llm = LLM(str(path), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(7)
    params = SamplingParams(max_tokens=64, temperature=0.0)
    for length in (1, 7, 33, 100):
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        ours = llm.generate({"prompt_token_ids": ids}, params)[0]
        assert ours.prompt_token_ids == ids
        assert ours.outputs[0].token_ids == _hf_greedy(model, ids, 64), f"{name} L={length}"
    text = "The quick brown fox jumps over the lazy dog. " * 2
    ours = llm.generate(text, params)[0]
    ids = llm.tokenizer(text)["input_ids"]
    assert ours.prompt_token_ids == ids
    assert ours.outputs[0].token_ids == _hf_greedy(model, ids, 64)
    assert blocks_settled(llm)


def test_architecture_flags(checkpoint):
    name, model, path = checkpoint
    llm = LLM(str(path), device="cpu")
    args = llm.model.args
    assert args.qkv_bias == (name == "qwen2")
    assert args.tie_word_embeddings == (name == "qwen2")
    if args.tie_word_embeddings:
        assert llm.model.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    assert args.num_kv_heads == model.config.num_key_value_heads
