"""API edges a new user hits first: errors name what the user passed, a missing checkpoint is an OSError as in
transformers, and a capture policy that cannot apply on a CPU says so."""
from __future__ import annotations

import logging

import pytest
import torch

from hybrid_engine import LLM, pipeline
from hybrid_engine.errors import ModelLoadError


@pytest.fixture(scope="module")
def llm():
    engine = LLM("tiny-llama", device="cpu", max_model_len=64)
    yield engine
    engine.close()


@pytest.mark.parametrize("path", ["/nope", "/nope/model-dir", "no-such-preset"])
def test_missing_model_is_an_oserror_naming_the_path(path):
    with pytest.raises(OSError, match=path) as info:
        LLM(path)
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, ValueError)
    assert "neither a preset" in str(info.value)


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_pipeline_names_max_new_tokens(llm, value):
    pipe = pipeline("text-generation", model=llm)
    with pytest.raises(ValueError, match=rf"^max_new_tokens={value} must be an int >= 1"):
        pipe("Hello", max_new_tokens=value)
    with pytest.raises(ValueError, match=rf"^max_new_tokens={value} "):
        pipe.model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=value)


def test_pipeline_valid_max_new_tokens_still_generates(llm):
    pipe = pipeline("text-generation", model=llm)
    out = pipe("Hello", max_new_tokens=3, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert len(out) == len(pipe.tokenizer("Hello")["input_ids"]) + 3


def test_eager_capture_on_cpu_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="hybrid_engine.engine"):
        engine = LLM("tiny-llama", device="cpu", max_model_len=64, capture="eager")
    try:
        warned = [r for r in caplog.records if "capture='eager'" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert engine.stats()["capture"] == "off"
    finally:
        engine.close()


def test_default_capture_on_cpu_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="hybrid_engine.engine"):
        LLM("tiny-llama", device="cpu", max_model_len=64).close()
    assert not [r for r in caplog.records if "capture" in r.getMessage()]


@pytest.mark.parametrize("ids, named", [([1, 2.5, 3], r"\[2\.5\]"), ([1, "7"], r"\['7'\]"), ([4, None], r"\[None\]"),
                                        ([1, -2, 3], r"\[-2\]"), ([1, 10**6], r"\[1000000\]"),
                                        ([1, 2**70], r"\[1180591620717411303424\]")])
def test_bad_prompt_token_ids_are_named(llm, ids, named):
    with pytest.raises(ValueError, match=named):
        llm.generate({"prompt_token_ids": ids})
    assert llm.stats()["kv_blocks_free"] + llm.stats()["kv_blocks_cached"] == llm.stats()["kv_blocks_total"]


def test_numpy_prompt_token_ids_are_plain_ints(llm):
    import numpy as np

    seq = llm.sequences({"prompt_token_ids": list(np.array([5, 9, 11], dtype=np.int64))})[0]
    assert seq.prompt_ids == [5, 9, 11] and all(type(t) is int for t in seq.prompt_ids)
    assert llm.sequences({"prompt_token_ids": (5, 9, 11)})[0].prompt_ids == [5, 9, 11]
