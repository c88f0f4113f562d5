"""The direct safetensors reader (models/safetensors_reader) gives the tensors the safetensors library gives, and a
checkpoint loads through it to the same model; malformed files fail naming what is wrong."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybrid_engine.errors import ModelLoadError
from hybrid_engine.models import loader
from hybrid_engine.models.safetensors_reader import Reader, read_header


def _tensors():
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(37, 53, generator=g).half(),
        "b.bias": torch.randn(101, generator=g).bfloat16(),
        "c": torch.randn(3, 5, 7, generator=g),
        "d.ids": torch.randint(-9, 9, (13,), generator=g, dtype=torch.int64),
        "e.flags": torch.rand(11, generator=g) > 0.5,
        "f.empty": torch.zeros(0, 4, dtype=torch.float16),
        "g.scalar": torch.tensor(2.5, dtype=torch.float64),
        "h.bytes": torch.randint(0, 255, (1000,), generator=g, dtype=torch.uint8),
    }


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 64, 7])  # whole tensors, and chunks that split them unevenly
def test_reads_what_the_library_reads(tmp_path, chunk_bytes):
    path = str(tmp_path / "x.safetensors")
    save_file(_tensors(), path, metadata={"format": "pt"})
    reader = Reader(torch.device("cpu"), chunk_bytes=chunk_bytes, readers=3)
    try:
        got = dict(reader.tensors(path))
    finally:
        reader.close()
    with safe_open(path, framework="pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def test_header_in_file_order_and_checked(tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file(_tensors(), path)
    entries = read_header(path)
    assert [e.start for e in entries] == sorted(e.start for e in entries)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read()
    (tmp_path / "cut.safetensors").write_bytes(data[:size - 10])
    with pytest.raises(ValueError, match="data_offsets .* within the file's"):
        read_header(str(tmp_path / "cut.safetensors"))
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="shorter than the 8-byte header length"):
        read_header(str(tmp_path / "tiny.safetensors"))


def test_checkpoint_loads_the_same_through_either_reader(tmp_path, monkeypatch):
    from hybrid_engine import LLM, SamplingParams
    from hybrid_engine.models.presets import build_hf_model

    model, tokenizer = build_hf_model("tiny-llama")
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards, an index
    tokenizer.save_pretrained(tmp_path)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    outs, weights = {}, {}
    for choice in ("direct", "safetensors"):
        monkeypatch.setenv("HYBRID_ENGINE_CHECKPOINT_READER", choice)
        llm = LLM(str(tmp_path), device="cpu")
        try:
            weights[choice] = {k: v.clone() for k, v in llm.model.state_dict().items()}
            out = llm.generate([{"prompt_token_ids": [5, 9, 200, 3]}, "a b c"], SamplingParams(max_tokens=8,
                                                                                                temperature=0))
            outs[choice] = [o.outputs[0].token_ids for o in out]
        finally:
            llm.close()
    assert outs["direct"] == outs["safetensors"]
    for k, v in weights["safetensors"].items():
        assert torch.equal(weights["direct"][k], v), k


def test_a_truncated_shard_names_its_file(tmp_path):
    from hybrid_engine.models.presets import build_hf_model

    model, _ = build_hf_model("tiny-llama")
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    args = loader.build_empty(model.config, 64).args
    with pytest.raises(ModelLoadError, match=r"cannot read checkpoint file .*model\.safetensors.*data_offsets"):
        list(loader.checkpoint_tensors([str(f)], args, torch.device("cpu")))


def test_the_switch_names_its_values(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_ENGINE_CHECKPOINT_READER", "fast")
    args = loader.build_empty(loader.preset_config("tiny-llama"), 64).args
    with pytest.raises(ValueError, match="HYBRID_ENGINE_CHECKPOINT_READER='fast' must be direct"):
        list(loader.checkpoint_tensors([], args, torch.device("cpu")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096, 1000])
def test_reads_onto_the_card_what_the_library_reads(tmp_path, chunk_bytes):
    path = str(tmp_path / "x.safetensors")
    save_file(_tensors(), path)
    reader = Reader(torch.device("cuda"), chunk_bytes=chunk_bytes, chunks=3, readers=2)
    try:
        got = {k: v.cpu() for k, v in reader.tensors(path)}
    finally:
        reader.close()
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            assert torch.equal(got[k], f.get_tensor(k)), k
