"""Tuning tables: the user's cache over the package's tables, per card, written atomically."""
import json

import pytest
import torch

from hybrid_engine.kernels import tuning


@pytest.fixture()
def tables(tmp_path, monkeypatch):
    user = tmp_path / "user"
    package = tmp_path / "package"
    package.mkdir()
    monkeypatch.setenv("HYBRID_ENGINE_TUNING_DIR", str(user))
    monkeypatch.setattr(tuning, "PACKAGE_DIR", package)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test Card")
    tuning._tables.cache_clear()
    yield package, user
    tuning._tables.cache_clear()


def test_user_entries_override_package_entries_for_that_card(tables):
    package, user = tables
    key = tuning.shape_key(4096, 4096, dtype=torch.float16)
    assert key == "4096,4096,float16"
    (package / "nvidia-test-card.json").write_text(json.dumps(
        {"tables": {"decode_gemm": {key: [16, 128, 1, 4, 2], "8,8,float16": [16, 64, 1, 4, 2]}}}))
    cuda = torch.device("cuda")
    assert tuning.lookup("decode_gemm", key, cuda) == [16, 128, 1, 4, 2]
    path = tuning.save("decode_gemm", {key: (32, 256, 2, 8, 3)}, "NVIDIA Test Card")
    assert path == user / "nvidia-test-card.json" and not list(user.glob("*.tmp"))
    assert tuning.lookup("decode_gemm", key, cuda) == [32, 256, 2, 8, 3]
    assert tuning.lookup("decode_gemm", "8,8,float16", cuda) == [16, 64, 1, 4, 2]  # package entry still seen
    assert tuning.lookup("decode_gemm", "1,1,float16", cuda) is None
    assert tuning.lookup("decode_gemm", key, torch.device("cpu")) is None  # CPU never reads GPU tables


def test_a_broken_table_is_ignored_not_fatal(tables):
    package, _ = tables
    (package / "nvidia-test-card.json").write_text("{not json")
    assert tuning.lookup("decode_gemm", "1,1,float16", torch.device("cuda")) is None
    tuning.save("decode_gemm", {"1,1,float16": [16, 64, 1, 4, 2]}, "NVIDIA Test Card")
    assert tuning.lookup("decode_gemm", "1,1,float16", torch.device("cuda")) == [16, 64, 1, 4, 2]
