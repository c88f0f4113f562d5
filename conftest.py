"""Repository-wide pytest setup: runs before any test module (tests/, benchmarks/, integrations/) imports triton."""
import os

import torch

# Triton fixes interpreter mode at its first import (transformers imports it): decide before anything else does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
