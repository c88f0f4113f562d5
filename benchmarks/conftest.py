"""pytest-benchmark suites: one engine per preset for the whole session, warmed up (every prompt length once, one
streamed request) and settled (no graph capture pending) before anything is timed.

    pytest benchmarks -m "not gpu" --benchmark-json=cpu.json      # tiny-llama on the CPU
    pytest benchmarks -m gpu --benchmark-json=gpu.json            # llama-2-7b-shape on a GPU
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WARM_LENGTHS = {"tiny-llama": (10, 50, 100, 200), "llama-2-7b-shape": (10, 50, 100, 200, 500)}


def pytest_addoption(parser):
    parser.addoption("--bench-rounds", type=int, default=30, help="timed rounds per benchmark (default 30)")
    parser.addoption("--bench-cpu-threads", type=int, default=1,
                     help="torch intra-op threads for CPU presets (default 1: on a shared machine a multi-threaded "
                          "op waits for its slowest thread, which makes medians swing)")


def pytest_benchmark_update_machine_info(config, machine_info):
    """The card goes into the JSON: ci/gate.py picks the baseline stored for it (ci/baselines/gpu-<card>.json)."""
    from hybrid_engine.bench.hardware import card_name

    machine_info["card"] = card_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="session")
def bench_rounds(request) -> int:
    return request.config.getoption("--bench-rounds")


@pytest.fixture(scope="session")
def engine(request):
    """engine(preset) -> (LLM, Prompts), built once per session."""
    from hybrid_engine import LLM
    from hybrid_engine.bench.measure import Prompts
    from hybrid_engine.bench.systems import HybridSystem

    built: dict[str, tuple] = {}

    def get(preset: str):
        if preset not in built:
            gpu = preset != "tiny-llama"
            if not gpu:
                torch.set_num_threads(request.config.getoption("--bench-cpu-threads"))
            llm = LLM(preset) if gpu else LLM(preset, device="cpu")
            prompts = Prompts(llm.tokenizer, llm.model_config.vocab_size, seed=0)
            system = HybridSystem(llm)
            for n in WARM_LENGTHS.get(preset, WARM_LENGTHS["llama-2-7b-shape"]):
                system.ttft_ids(prompts.ids_of(n))
                system.ttft_ids(prompts.ids_of(n))
            system.stream(prompts.ids_of(100), 16)
            system.settle(120.0)
            built[preset] = (llm, prompts)
        return built[preset]

    yield get
    for llm, _ in built.values():
        llm.close()
