"""pytest-benchmark suites: TTFT per prompt length and per-token latency of the engine, tiny-llama on the CPU,
llama-2-7b-shape on a GPU (marker `gpu`). Fresh random prompt ids every round.

- test_ttft: token ids on the host -> first generated token id on the host. ci/gate.py gates these medians
  (extra_info["metric"] == "ttft").
- test_per_token: one streamed decode step as a client sees it (the request keeps streaming across rounds; a fresh
  one starts before it runs out).
- test_generate: a whole request of N tokens, way (a) of hybrid_engine/bench/measure.py: per token = (its median - the TTFT median
  at the same length) / (N - 1).
"""
from __future__ import annotations

import pytest

from hybrid_engine import SamplingParams

CPU_LENGTHS = (10, 50, 100, 200)
GPU_LENGTHS = (10, 50, 100, 200, 500)
PROMPT_LEN = 100
CPU_TOKENS, GPU_TOKENS = 32, 128
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0.0)


def cases(cpu_lengths=CPU_LENGTHS, gpu_lengths=GPU_LENGTHS) -> list:
    """(preset, prompt_len): tiny-llama on the CPU, llama-2-7b-shape behind the gpu marker."""
    cpu = [pytest.param("tiny-llama", n, id=f"tiny-llama-L{n}") for n in cpu_lengths]
    gpu = [pytest.param("llama-2-7b-shape", n, id=f"llama-2-7b-shape-L{n}", marks=pytest.mark.gpu)
           for n in gpu_lengths]
    return cpu + gpu


@pytest.mark.parametrize(("preset", "prompt_len"), cases())
def test_ttft(benchmark, engine, bench_rounds, preset, prompt_len):
    llm, prompts = engine(preset)
    benchmark.group = f"ttft {preset}"
    benchmark.extra_info.update(metric="ttft", preset=preset, prompt_len=prompt_len, device=str(llm.device))

    def first_token(ids: list[int]) -> list[int]:
        return llm.generate([{"prompt_token_ids": ids}], FIRST_TOKEN)[0].outputs[0].token_ids

    tokens = benchmark.pedantic(first_token, setup=lambda: ((prompts.ids_of(prompt_len),), {}),
                                rounds=bench_rounds, warmup_rounds=2)
    assert len(tokens) == 1


class Stream:
    """A streamed request that pytest-benchmark advances one delta per round."""

    def __init__(self, llm, prompts, prompt_len: int, max_tokens: int) -> None:
        self.llm, self.prompts, self.prompt_len = llm, prompts, prompt_len
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.gen, self.left = None, 0

    def ready(self):
        if self.gen is None or self.left < 2:
            self.close()
            self.gen = self.llm.stream_deltas({"prompt_token_ids": self.prompts.ids_of(self.prompt_len)}, self.params)
            self.left = self.params.max_tokens - len(next(self.gen).token_ids)
        return (), {}

    def step(self):
        delta = next(self.gen)
        self.left -= len(delta.token_ids)
        return delta

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None


def _tokens(preset: str) -> int:
    return CPU_TOKENS if preset == "tiny-llama" else GPU_TOKENS


@pytest.mark.parametrize(("preset", "prompt_len"), cases((PROMPT_LEN,), (PROMPT_LEN,)))
def test_per_token(benchmark, engine, bench_rounds, preset, prompt_len):
    llm, prompts = engine(preset)
    benchmark.group = f"per token {preset}"
    benchmark.extra_info.update(metric="tpot_streamed", preset=preset, prompt_len=prompt_len, device=str(llm.device))
    stream = Stream(llm, prompts, prompt_len, _tokens(preset))
    try:
        delta = benchmark.pedantic(stream.step, setup=stream.ready, rounds=4 * bench_rounds, warmup_rounds=3)
    finally:
        stream.close()
    assert len(delta.token_ids) >= 1
    assert llm.stats()["request_in_flight"] is False


@pytest.mark.parametrize(("preset", "prompt_len"), cases((PROMPT_LEN,), (PROMPT_LEN,)))
def test_generate(benchmark, engine, bench_rounds, preset, prompt_len):
    llm, prompts = engine(preset)
    n = _tokens(preset)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    benchmark.group = f"generate {n} tokens {preset}"
    benchmark.extra_info.update(metric="generate", preset=preset, prompt_len=prompt_len, gen_tokens=n,
                                device=str(llm.device))

    def generate(ids: list[int]) -> list[int]:
        return llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids

    tokens = benchmark.pedantic(generate, setup=lambda: ((prompts.ids_of(prompt_len),), {}),
                                rounds=max(5, bench_rounds // 3), warmup_rounds=1)
    assert len(tokens) == n
