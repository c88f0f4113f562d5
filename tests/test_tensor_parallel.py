"""Tensor parallelism on the CPU: two ranks (this process and one worker process) over gloo. The sharded model gives
TP=1's tokens, bad shapes are refused with the constraint named, and a worker that dies ends the engine with a
clear error in bounded time."""
import os
import signal
import time

import pytest
import torch
from block_helpers import blocks_settled

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.distributed.executor import WorkerDiedError
from hybrid_engine.distributed.sharding import slice_bounds, take_shard
from hybrid_engine.models.llama import ModelArgs

PROMPTS = [[1, 5, 9, 33, 7], list(range(3, 40)), [1, 300, 2, 17], [1, 42] * 30]
OPTS = dict(device="cpu", max_model_len=160, max_num_seqs=4, prefill_chunk_size=16)


def _args(**kw):
    base = dict(vocab_size=7, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=2, rms_norm_eps=1e-5, qkv_bias=False, tie_word_embeddings=False, max_position_embeddings=16)
    return ModelArgs(**{**base, **kw})


def _tokens(llm, params):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


def _params():
    greedy = [SamplingParams(max_tokens=10 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    sampled = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7 + i, ignore_eos=True)
               for i in range(len(PROMPTS))]
    return greedy, sampled


@pytest.fixture(scope="module")
def reference():
    llm = LLM("tiny-llama", **OPTS)
    greedy, sampled = _params()
    # one prompt alone while others decode exercises the chunked prefill (37 and 60 tokens > chunk 16)
    out = _tokens(llm, greedy), _tokens(llm, sampled)
    llm.close()
    return out


@pytest.fixture(scope="module")
def tp2():
    llm = LLM("tiny-llama", tensor_parallel_size=2, **OPTS)
    yield llm
    llm.close()


def test_tp2_tokens_equal_tp1(tp2, reference):
    greedy, sampled = _params()
    assert _tokens(tp2, greedy) == reference[0]
    assert _tokens(tp2, sampled) == reference[1]
    s = tp2.stats()
    assert blocks_settled(tp2)
    assert s["prefix_cache_hit_tokens"] > 0  # the second run's prompts hit: prefill_from ran on every rank
    assert s["tensor_parallel_size"] == 2


def test_tp2_streams_and_chunks_like_tp1(tp2, reference):
    """A long prompt arriving while another decodes is prefilled in chunks on every rank."""
    greedy, _ = _params()
    tp2.reset_prefix_cache()  # the long prompt ran in the test before: with its blocks cached it would not chunk
    first = tp2.stream_deltas({"prompt_token_ids": PROMPTS[0]}, greedy[0])
    got0 = list(next(iter(first)).token_ids)
    long = tp2.generate({"prompt_token_ids": PROMPTS[3]}, greedy[3])[0].outputs[0].token_ids
    got0 += [t for d in first for t in d.token_ids]
    assert got0 == reference[0][0] and long == reference[0][3]
    assert tp2.stats()["prefill_chunks"] > 0


def test_shard_slices_and_padding():
    full = torch.arange(7 * 3).view(7, 3).float()
    a0, a1 = _args().sharded(0, 2), _args().sharded(1, 2)
    assert a0.num_heads == 2 and a0.num_kv_heads == 1 and a0.intermediate_size == 6 and a0.vocab_shard == 4
    s0, s1 = take_shard(a0, "embed_tokens.weight", None, full), take_shard(a1, "embed_tokens.weight", None, full)
    assert torch.equal(s0, full[:4]) and torch.equal(s1[:3], full[4:]) and not s1[3].any()
    assert slice_bounds(a1, "embed_tokens.weight", None) == (0, 4, 7)
    assert torch.equal(take_shard(a1, "embed_tokens.weight", None, full[4:]), s1)  # read as a slice, then padded
    down = torch.randn(8, 12)
    assert torch.equal(take_shard(a1, "layers.0.down_proj.weight", None, down), down[:, 6:])
    k = torch.randn(4, 8)  # k_proj: 2 KV heads x head_dim 2
    assert torch.equal(take_shard(a1, "layers.0.qkv_proj.weight", 1, k), k[2:])
    norm = torch.randn(8)
    assert take_shard(a1, "layers.0.input_layernorm", None, norm) is norm


@pytest.mark.parametrize("field, value, name", [("num_heads", 3, "num_attention_heads"),
                                                ("num_kv_heads", 1, "num_key_value_heads"),
                                                ("intermediate_size", 9, "intermediate_size")])
def test_shapes_that_do_not_split_are_refused(field, value, name):
    with pytest.raises(ValueError, match=f"tensor_parallel_size=2 must divide the model's {name}={value}"):
        _args(**{field: value}).sharded(0, 2)


def test_bad_tensor_parallel_options():
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        LLM("tiny-llama", device="cpu", tensor_parallel_size=0)
    from hybrid_engine.models.presets import build_hf_model

    hf_model, _ = build_hf_model("tiny-llama", torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="preset name, checkpoint directory or .gguf path"):
        LLM(hf_model, device="cpu", tensor_parallel_size=2)


def test_killed_worker_ends_the_engine_with_a_clear_error(tp2):
    """Last in this module: it ends the module's engine (one tensor-parallel engine per process at a time)."""
    llm = tp2
    try:
        stream = llm.stream_deltas({"prompt_token_ids": PROMPTS[0]},
                                   SamplingParams(max_tokens=140, temperature=0, ignore_eos=True))
        it = iter(stream)
        next(it)
        os.kill(llm.executor.procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker rank 1 .* the engine has shut down"):
            for _ in it:
                pass
        assert time.monotonic() - t0 < 30
        with pytest.raises(WorkerDiedError):
            llm.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=2))
    finally:
        t0 = time.monotonic()
        llm.close()
        assert time.monotonic() - t0 < 30


def test_cli_and_server_take_the_tensor_parallel_size():
    from hybrid_engine.server.app import build_parser, engine_kwargs

    assert engine_kwargs(build_parser().parse_args(["--model", "tiny-llama", "--tensor-parallel-size", "2"]))[
        "tensor_parallel_size"] == 2
    assert "tensor_parallel_size" not in engine_kwargs(build_parser().parse_args(["--model", "tiny-llama"]))


def test_tp2_reads_its_shard_of_a_safetensors_checkpoint(tmp_path, reference):
    """Each rank reads only its rows / columns of the split weights (safetensors slices) and gets TP=1's tokens.
    Its own engine after the module's: runs last (the module's engine has been closed by the kill test)."""
    from hybrid_engine.models.presets import build_hf_model

    hf_model, _ = build_hf_model("tiny-llama", torch.float32, "cpu", 0)
    hf_model.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **OPTS)
    try:
        greedy, _ = _params()
        assert _tokens(llm, greedy) == reference[0]
    finally:
        llm.close()


def test_tp2_constrained_and_prefix_hits_equal_tp1():
    """Grammar-constrained rows (split decode halves, masks sent to the worker) and prefix-cache hits (prefill from
    an offset) on two ranks give TP=1's tokens."""
    pytest.importorskip("llguidance")
    from hybrid_engine.structured import GuidedDecodingParams

    def run(llm):
        sp = [SamplingParams(max_tokens=12, temperature=0.9, seed=5,
                             structured_output=GuidedDecodingParams(regex=r"[a-f]{3,8}")),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)]
        shared = [1] + list(range(100, 160))  # 61 tokens: three full blocks cached after the first request
        first = [o.outputs[0].token_ids for o in llm.generate([{"prompt": "pick"}, {"prompt_token_ids": shared}], sp)]
        again = llm.generate({"prompt_token_ids": shared + [7, 8]}, sp[1])[0]
        return first, again.outputs[0].token_ids, llm.stats()["prefix_cache_hit_tokens"]

    one = LLM("tiny-llama", **OPTS)
    want = run(one)
    one.close()
    two = LLM("tiny-llama", tensor_parallel_size=2, **OPTS)
    try:
        got = run(two)
    finally:
        two.close()
    assert got == want and want[2] >= 48


def test_an_engine_never_closed_ends_its_workers_when_collected():
    import gc

    llm = LLM("tiny-llama", tensor_parallel_size=2, **OPTS)
    procs = list(llm.executor.procs)
    assert llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=3)).__len__() == 1
    del llm
    gc.collect()
    for proc in procs:
        assert proc.wait(timeout=30) is not None
    import torch.distributed as dist

    assert not dist.is_initialized()  # the group was left: a new engine can make its own


def test_tp2_batched_prefill_equals_tp1(reference):
    """Batched prefill on both ranks (the call broadcast like the other prefills): TP=1's tokens."""
    greedy, sampled = _params()
    llm = LLM("tiny-llama", tensor_parallel_size=2, batched_prefill=True, **OPTS)
    try:
        calls, real = [], llm.runner.prefill_batch
        llm.runner.prefill_batch = lambda items: calls.append(len(items)) or real(items)
        assert _tokens(llm, greedy) == reference[0]
        assert _tokens(llm, sampled) == reference[1]
        assert calls and blocks_settled(llm)
    finally:
        llm.close()


def test_row_parallel_partials_are_summed_in_float32_and_rounded_once():
    """A rank's O / down projection (DecoderLayer._row_parallel) with a communicator that adds the other rank's
    partial: summed in float32 (HYBRID_ENGINE_TP_SUM=float32) the float16 result is one card's projection (one
    rounding of the float32 sum) up to float32 summation order; summed natively (the default) each partial is rounded
    first and many elements differ."""
    from types import SimpleNamespace

    from hybrid_engine.kernels.gemm import linear_torch
    from hybrid_engine.models.llama import DecoderLayer

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 96, generator=gen).half()
    w = (torch.randn(64, 96, generator=gen) * 0.2).half()
    one_card = linear_torch(x, w, out_dtype=torch.float32).half()  # float32 sum, rounded once

    class Comm:
        def __init__(self, sum_dtype):
            self.sum_dtype = sum_dtype

        def all_reduce(self, t, out_dtype=None):  # rank 0's partial + rank 1's, in the partial's dtype, rounded
            return (t + linear_torch(x[:, 48:], w[:, 48:], out_dtype=t.dtype)).to(out_dtype or t.dtype)

    mismatches = {}
    for name, sum_dtype in (("float32", torch.float32), ("native", None)):
        layer = SimpleNamespace(comm=Comm(sum_dtype))  # rank 0 of a layer: only its communicator is read
        got = DecoderLayer._row_parallel(layer, linear_torch, x[:, :48], w[:, :48])
        assert got.dtype == torch.float16
        mismatches[name] = (got != one_card).float().mean().item()
        assert (got.float() - one_card.float()).abs().max() <= 2 * torch.finfo(torch.float16).eps * one_card.abs().max()
    assert mismatches["float32"] < 0.02 < mismatches["native"], mismatches


def test_bad_tp_sum_dtype_is_named(monkeypatch):
    import torch.distributed as dist

    from hybrid_engine.distributed.comm import Communicator

    monkeypatch.setenv("HYBRID_ENGINE_TP_SUM", "fp8")
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"HYBRID_ENGINE_TP_SUM='fp8' is not allowed; use one of \['float32', "):
        Communicator(torch.device("cpu"))


def test_an_all_reduce_that_gave_up_ends_the_engine(monkeypatch):
    """A peer all-reduce that stopped waiting for a rank (its pinned host word set) makes the executor's health
    check fail the engine with WorkerDiedError, and every later check too; a bad method name is named."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from hybrid_engine.distributed.comm import Communicator
    from hybrid_engine.distributed.executor import TensorParallelExecutor

    word = [False]
    executor = object.__new__(TensorParallelExecutor)  # its state only: no workers started
    executor.error, executor.procs, executor.conns = None, [], []
    executor.comm = SimpleNamespace(peer=SimpleNamespace(abandoned_any=lambda: word[0]))
    executor.check()  # healthy
    word[0] = True
    for _ in range(2):
        with pytest.raises(WorkerDiedError, match="waited more than 10 s .* gave up"):
            executor.check()
    monkeypatch.setenv("HYBRID_ENGINE_ALLREDUCE", "fast")
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"HYBRID_ENGINE_ALLREDUCE='fast' is not allowed; .*'peer'"):
        Communicator(torch.device("cpu"))
