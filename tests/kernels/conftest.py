"""Kernel tests: Triton kernels vs their fp32 torch references.

Without CUDA the Triton kernels run under the interpreter; TRITON_INTERPRET must be set before any kernel is
jitted (the kernels are jitted lazily on first launch, and this file is imported before any test module).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from kernel_helpers import DEVICE_DTYPES  # noqa: E402

from hybrid_engine.kernels._triton import interpreter_active  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    raise RuntimeError("tests/kernels on the CPU need TRITON_INTERPRET=1 before triton is first imported (something, "
                       "e.g. transformers, imported it earlier): run with TRITON_INTERPRET=1 in the environment")


@pytest.fixture(params=DEVICE_DTYPES)
def device_dtype(request):
    return request.param


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Every torch.empty / empty_like in these tests returns poison (NaN, or -7 for integers), so an output
    element a kernel forgot to write fails the comparison instead of passing on lucky zeros."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
