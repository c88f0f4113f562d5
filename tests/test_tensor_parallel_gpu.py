"""Tensor parallelism on two GPUs (NCCL, graphs captured on both ranks): TP=2 gives TP=1's greedy tokens on a small
model, and a killed worker ends the engine with a clear error in bounded time."""
import os
import signal
import time

import pytest
import torch

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.distributed.executor import WorkerDiedError

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA GPUs")]
PROMPTS = [[1, 5, 9, 33, 7], list(range(3, 40)), [1, 300, 2, 17], [1, 42] * 30]
OPTS = dict(dtype="float32", max_model_len=256, max_num_seqs=4, prefill_buckets=(16, 32, 64))


def _tokens(llm):
    sp = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=16, temperature=0.7, seed=3, ignore_eos=True)] * 2
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp)]


def test_tp2_on_gpus_matches_tp1_and_survives_nothing_when_a_worker_dies():
    ref_llm = LLM("tiny-llama", **OPTS)
    ref = _tokens(ref_llm)
    ref_llm.close()
    llm = LLM("tiny-llama", tensor_parallel_size=2, **OPTS)
    try:
        assert llm.stats()["graphs_captured"] >= 3  # every bucket captured at load, with the collectives inside
        assert _tokens(llm) == ref
        stream = iter(llm.stream_deltas({"prompt_token_ids": PROMPTS[0]},
                                        SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)))
        next(stream)
        os.kill(llm.executor.procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker rank 1"):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 30
        with pytest.raises(WorkerDiedError):
            llm.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=2))
    finally:
        t0 = time.monotonic()
        llm.close()
        assert time.monotonic() - t0 < 60
