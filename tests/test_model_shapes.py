"""`model_shapes`: a model's decode GEMM shapes, attention heads and dtype per tensor-parallel rank, from its config
alone (presets, checkpoint directories), never its weights."""
from __future__ import annotations

import pytest
import torch

from hybrid_engine.errors import ModelLoadError
from hybrid_engine.kernels.sweeps.cached_attention_sweep import AttentionShape
from hybrid_engine.models.shapes import model_shapes


def _nk(shapes) -> dict[str, tuple[int, int]]:
    return {s.name: (s.n, s.k) for s in shapes.gemm}


def test_llama_2_7b_shape_is_the_shipped_table_s_shapes():
    shapes = model_shapes("llama-2-7b-shape")
    assert _nk(shapes) == {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096),
                           "down": (4096, 11008), "lm_head": (32000, 4096)}
    assert shapes.gemm[0].heads == (32, 32, 128)
    assert shapes.attention == AttentionShape(32, 32, 128)
    assert shapes.dtype == torch.float16


def test_llama_2_7b_shape_on_two_ranks_splits_n_of_qkv_gate_up_head_and_k_of_o_down():
    shapes = model_shapes("llama-2-7b-shape", tensor_parallel_size=2, dtype="bfloat16")
    assert _nk(shapes) == {"qkv": (6144, 4096), "o": (4096, 2048), "gate_up": (11008, 4096),
                           "down": (4096, 5504), "lm_head": (16000, 4096)}
    assert shapes.attention == AttentionShape(16, 16, 128)
    assert shapes.dtype == torch.bfloat16


def test_tiny_llama_gqa_shapes_and_its_two_rank_shards():
    one = model_shapes("tiny-llama")  # hidden 64, 4 heads of 16, 2 KV heads, MLP 176, vocab 512
    assert _nk(one) == {"qkv": (128, 64), "o": (64, 64), "gate_up": (352, 64), "down": (64, 176),
                        "lm_head": (512, 64)}
    assert one.gemm[0].heads == (4, 2, 16) and one.attention == AttentionShape(4, 2, 16)
    two = model_shapes("tiny-llama", tensor_parallel_size=2)
    assert _nk(two) == {"qkv": (64, 64), "o": (64, 32), "gate_up": (176, 64), "down": (64, 88),
                        "lm_head": (256, 64)}
    assert two.attention == AttentionShape(2, 1, 16)


def test_an_uneven_vocabulary_rounds_the_head_shard_up():
    shapes = model_shapes("llama-3-70b-shape", tensor_parallel_size=8)
    assert _nk(shapes)["lm_head"] == (16032, 8192)  # ceil(128256 / 8): the last shard is padded
    assert shapes.attention == AttentionShape(8, 1, 128)


@pytest.mark.parametrize(("model", "size", "named"), [
    ("tiny-llama", 4, "tensor_parallel_size=4 must divide the model's num_key_value_heads=2"),
    ("llama-2-7b-shape", 3, "tensor_parallel_size=3 must divide the model's num_attention_heads=32"),
    ("tiny-llama", 0, "tensor_parallel_size=0 must be an int >= 1"),
])
def test_a_tensor_parallel_size_that_does_not_divide_is_named(model, size, named):
    with pytest.raises(ValueError, match=named):
        model_shapes(model, tensor_parallel_size=size)


def test_a_dtype_the_kernels_are_not_tuned_for_is_named():
    with pytest.raises(ValueError, match="dtype='float32'.*float16"):
        model_shapes("tiny-llama", dtype="float32")


def test_a_checkpoint_directory_needs_only_its_config(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, torch_dtype="bfloat16",
                architectures=["Qwen2ForCausalLM"]).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no weights to read
    shapes = model_shapes(str(tmp_path))
    assert _nk(shapes) == {"qkv": (192, 128), "o": (128, 128), "gate_up": (640, 128), "down": (128, 320),
                           "lm_head": (1000, 128)}
    assert shapes.dtype == torch.bfloat16  # the checkpoint's, as the engine picks it on a GPU


def test_a_missing_model_is_a_load_error_naming_it(tmp_path):
    with pytest.raises(ModelLoadError, match="nope"):
        model_shapes(str(tmp_path / "nope"))


@pytest.mark.parametrize(("model", "nk", "attention"), [
    ("llama-3-8b-shape", {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                          "lm_head": (128256, 4096)}, AttentionShape(32, 8, 128)),
    ("qwen2-7b-shape", {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
                        "lm_head": (152064, 3584)}, AttentionShape(28, 4, 128)),
    ("llama-3.2-1b-shape", {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
                            "down": (2048, 8192), "lm_head": (128256, 2048)}, AttentionShape(32, 8, 64)),
    ("smollm2-135m-shape", {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
                            "lm_head": (49152, 576)}, AttentionShape(9, 3, 64)),
])
def test_the_any_card_shape_presets_have_their_models_shapes(model, nk, attention):
    shapes = model_shapes(model)
    assert _nk(shapes) == nk and shapes.attention == attention and shapes.dtype == torch.float16


def test_shape_presets_keep_their_architecture_flags():
    from hybrid_engine.models.presets import preset_config

    qwen = preset_config("qwen2-7b-shape")
    assert qwen.model_type == "qwen2" and qwen.architectures == ["Qwen2ForCausalLM"] and not qwen.tie_word_embeddings
    assert preset_config("llama-3.2-1b-shape").tie_word_embeddings
    assert preset_config("smollm2-135m-shape").tie_word_embeddings
    assert not preset_config("llama-2-7b-shape").tie_word_embeddings


def test_a_shape_preset_with_tied_embeddings_loads_and_serves_on_the_cpu():
    from hybrid_engine import LLM, SamplingParams

    llm = LLM("smollm2-135m-shape", device="cpu", max_model_len=64)
    try:
        assert llm.model.args.tie_word_embeddings and llm.model.args.num_kv_heads == 3
        assert llm.model.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
        out = llm.generate({"prompt_token_ids": list(range(3, 20))}, SamplingParams(max_tokens=3, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 3
        assert all(0 <= t < 49152 for t in out[0].outputs[0].token_ids)
    finally:
        llm.close()
