"""The config read without transformers (models/light_config) builds the model transformers' config builds, and the
load that uses it (models/loader.load_overlapped) serves what the transformers-first load serves."""
import json
from concurrent.futures import Future

import pytest
import torch

from hybrid_engine.errors import ModelLoadError
from hybrid_engine.models import loader
from hybrid_engine.models.light_config import check_same_model, light_config, model_fields
from hybrid_engine.models.presets import PRESETS, build_hf_model, preset_config, preset_fields


def _transformers_config(fields):
    from transformers import AutoConfig

    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_reads_the_same_without_transformers(name):
    light = light_config(preset_fields(name))
    assert model_fields(light) == model_fields(preset_config(name))


CONFIGS = [
    # fields left to the class defaults: KV heads, head_dim, rope theta, position limit
    dict(model_type="llama", hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
         vocab_size=301),
    dict(model_type="llama", hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
         num_key_value_heads=2, head_dim=32, rope_theta=500000.0, max_position_embeddings=777, attention_bias=True,
         tie_word_embeddings=True, rms_norm_eps=1e-5, vocab_size=301),
    dict(model_type="llama", hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
         rope_scaling={"rope_type": "default", "rope_theta": 20000.0}, vocab_size=301),
    # Mistral: a sliding window by default
    dict(model_type="mistral", hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
         num_key_value_heads=2, vocab_size=301),
    dict(model_type="mistral", hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
         sliding_window=None, max_position_embeddings=999, vocab_size=301),
    # Qwen2: QKV bias; the window only with use_sliding_window
    dict(model_type="qwen2", hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
         num_key_value_heads=3, rope_theta=1000000.0, vocab_size=301),
    dict(model_type="qwen2", hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
         use_sliding_window=True, sliding_window=333, max_window_layers=0, vocab_size=301),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: f"{f['model_type']}-{len(f)}")
def test_config_json_reads_as_transformers_reads_it(fields):
    light = light_config(json.loads(json.dumps(fields)))
    assert light is not None
    assert model_fields(light) == model_fields(_transformers_config(fields))


@pytest.mark.parametrize("fields", [
    dict(model_type="gemma", hidden_size=96, num_attention_heads=6),
    dict(model_type="llama", hidden_size=96, num_attention_heads=6,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}),
    dict(model_type="llama", hidden_size=96, num_attention_heads=6, rope_scaling={"type": "linear", "factor": 2.0}),
])
def test_what_it_cannot_answer_is_left_to_transformers(fields):
    assert light_config(fields) is None


def test_a_difference_names_the_field():
    light = light_config(CONFIGS[0])
    full = _transformers_config({**CONFIGS[0], "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="args: .*num_kv_heads=6.* != .*num_kv_heads=3"):
        check_same_model(light, full, "some/dir")


def _checkpoint(tmp_path, name="tiny-llama"):
    model, tokenizer = build_hf_model(name)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def _greedy(llm, n=6):
    from hybrid_engine import SamplingParams

    out = llm.generate([{"prompt_token_ids": [5, 17, 99, 3, 250]}, "hello there"],
                       SamplingParams(max_tokens=n, temperature=0))
    return [o.outputs[0].token_ids for o in out]


def test_checkpoint_dir_loads_overlapped_and_serves_as_the_transformers_first_load(tmp_path, monkeypatch):
    from hybrid_engine import LLM

    path = _checkpoint(tmp_path)
    llm = LLM(path, device="cpu")
    try:
        assert "transformers_wait" in llm.load_phases_s  # the overlapped path ran
        assert type(llm.model_config).__name__ == "LlamaConfig"  # transformers' config once load is done
        assert llm.tokenizer is not None and llm.tokenizer.chat_template
        overlapped = _greedy(llm)
    finally:
        llm.close()
    monkeypatch.setattr(loader, "read_light_config", lambda path: None)
    llm = LLM(path, device="cpu")
    try:
        assert "transformers_wait" not in llm.load_phases_s
        assert _greedy(llm) == overlapped
    finally:
        llm.close()


def test_a_broken_tokenizer_fails_the_load_with_its_path(tmp_path):
    from hybrid_engine import LLM

    path = _checkpoint(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer from"):
        LLM(path, device="cpu")


def test_finish_refuses_a_config_that_builds_another_model():
    light = light_config(CONFIGS[0])
    model = loader.build_empty(light, 64)
    pending: Future = Future()
    pending.set_result((_transformers_config({**CONFIGS[0], "intermediate_size": 128}), None))
    loaded = loader.LoadedModel(model, light, None, "some/dir", 64, {}, pending, 0)
    with pytest.raises(ModelLoadError, match="intermediate_size=200.* != .*intermediate_size=128"):
        loaded.finish()


def test_the_tokenizer_count_read_first_must_hold(tmp_path):
    light = light_config(CONFIGS[0])
    model = loader.build_empty(light, 64)
    _, tokenizer = build_hf_model("tiny-llama")
    pending: Future = Future()
    pending.set_result((_transformers_config(CONFIGS[0]), tokenizer))
    loaded = loader.LoadedModel(model, light, None, "some/dir", 64, {}, pending, 100)
    assert loaded.tokenizer_size() == 100  # the count read first, while the tokenizer is still being made
    with pytest.raises(ModelLoadError, match="has 512 tokens where 100 were read"):
        loaded.finish()


def test_preset_tokenizer_count_is_known_before_it_is_built():
    loaded = loader.load("smollm2-135m-shape", None, torch.float32, torch.device("cpu"), 64, 0)
    assert loaded.pending is not None and loaded.tokenizer_len == PRESETS["smollm2-135m-shape"]["vocab_size"]
    loaded.finish()
    assert len(loaded.tokenizer) == loaded.tokenizer_len


def test_the_switch_turns_the_overlap_off_and_names_its_values(monkeypatch):
    monkeypatch.setenv("HYBRID_ENGINE_OVERLAP_TRANSFORMERS", "0")
    assert loader.load_overlapped("smollm2-135m-shape", None, None, torch.device("cpu"), 64, 0, (0, 1)) is None
    monkeypatch.setenv("HYBRID_ENGINE_OVERLAP_TRANSFORMERS", "maybe")
    with pytest.raises(ValueError, match=r"HYBRID_ENGINE_OVERLAP_TRANSFORMERS='maybe' must be 1 \(config read"):
        loader.load_overlapped("smollm2-135m-shape", None, None, torch.device("cpu"), 64, 0, (0, 1))
