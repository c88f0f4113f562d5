import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def engine():
    """One tiny-llama engine on the CPU, shared by the tests (concurrent requests are batched)."""
    from hybrid_engine import LLM

    llm = LLM("tiny-llama", device="cpu", max_model_len=256)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def greedy(engine):
    """Reference greedy generation straight from the engine: (prompt or messages, max_tokens) -> RequestOutput."""
    from hybrid_engine import SamplingParams

    def run(prompt, max_tokens=16):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        if isinstance(prompt, list):
            return engine.chat(prompt, params)
        return engine.generate(prompt, params)[0]

    return run


@pytest.fixture()
def batched_rows(engine):
    """Rows decoded in steps of more than one row so far (grows only when requests were decoded together)."""
    return lambda: sum(k * v for k, v in engine.stats()["decode_batch_sizes"].items() if k > 1)
