"""Tensor parallelism on two GPUs (NCCL, graphs captured on both ranks): TP=2 gives TP=1's tokens on a small model,
and a killed worker ends the engine with a clear error in bounded time. The engines run in a child process with a
hard timeout, so that a hang fails this test instead of freezing the test run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA GPUs")]

SCRIPT = r'''
import json, os, signal, sys, time
from hybrid_engine import LLM, SamplingParams
from hybrid_engine.distributed.executor import WorkerDiedError

PROMPTS = [[1, 5, 9, 33, 7], list(range(3, 40)), [1, 300, 2, 17], [1, 42] * 30]
OPTS = dict(dtype="float32", max_model_len=256, max_num_seqs=4, prefill_buckets=(16, 32, 64))
SP = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
      SamplingParams(max_tokens=16, temperature=0.7, seed=3, ignore_eos=True)] * 2

def tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP)]

out = {}
llm = LLM("tiny-llama", **OPTS)
out["tp1"] = tokens(llm)
llm.close()
llm = LLM("tiny-llama", tensor_parallel_size=2, **OPTS)
out["graphs"] = llm.stats()["graphs_captured"]
out["method"] = llm.executor.comm.method
out["tp2"] = tokens(llm)
t0 = time.monotonic()
llm.close()
out["close_s"] = time.monotonic() - t0
llm = LLM("tiny-llama", tensor_parallel_size=2, **OPTS)  # a second group in the same process after the first left
stream = iter(llm.stream_deltas({"prompt_token_ids": PROMPTS[0]},
                                SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)))
next(stream)
os.kill(llm.executor.procs[0].pid, signal.SIGKILL)
t0 = time.monotonic()
try:
    for _ in stream:
        pass
    out["died"] = "no error"
except WorkerDiedError as exc:
    out["died"] = str(exc)
out["error_s"] = time.monotonic() - t0
try:
    llm.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=2))
    out["after"] = "accepted"
except WorkerDiedError as exc:
    out["after"] = str(exc)
t0 = time.monotonic()
llm.close()
out["close_dead_s"] = time.monotonic() - t0
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)
'''


@pytest.mark.parametrize("allreduce", ["nccl", "peer"])
def test_tp2_on_gpus_matches_tp1_and_a_killed_worker_ends_the_engine(allreduce):
    """With either all-reduce inside the graphs (the peer kernel's waits give up after PEER_TIMEOUT_S, after the
    engine has already reported the dead worker)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HYBRID_ENGINE_ALLREDUCE": allreduce}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["method"] == allreduce
    assert out["tp2"] == out["tp1"]
    assert out["graphs"] >= 6  # decode 1, 2, 4 and prefill 16, 32, 64, with the collectives inside, on both ranks
    assert out["close_s"] < 30
    assert "worker rank 1" in out["died"] and "shut down" in out["died"]
    assert out["error_s"] < 30 and "worker rank 1" in out["after"]
    assert out["close_dead_s"] < 30
