"""Batched prefill (EngineConfig.batched_prefill): prompts admitted in one step run as one forward pass. On the CPU
in fp32 every sequence's tokens equal the engine's without batching (fresh prompts, prefix-cache hits, seeded
sampling, prompts arriving while others decode), groups respect the token budget, and every block comes back."""
from __future__ import annotations

import pytest

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.config import EngineConfig
from hybrid_engine.engine.core import EngineCore

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _prompts(n: int, base: int = 11, step: int = 9, prefix: list[int] | None = None) -> list[dict]:
    return [{"prompt_token_ids": (prefix or []) + [3 + (i * 37 + j * 11) % 500 for j in range(base + step * i)]}
            for i in range(n)]


def _engine(batched: bool, **kw) -> LLM:
    return LLM("tiny-llama", max_model_len=256, batched_prefill=batched, **kw)


def _spy(llm: LLM) -> list[list[tuple[int, int]]]:
    """Records each prefill_batch call as [(new tokens, cached start), ...]."""
    calls, real = [], llm.runner.prefill_batch

    def spy(items):
        calls.append([(len(it.ids), it.start) for it in items])
        return real(items)

    llm.runner.prefill_batch = spy
    return calls


def _all_back(llm: LLM) -> bool:
    s = llm.stats()
    return s["kv_blocks_free"] + s["kv_blocks_cached"] == s["kv_blocks_total"] and s["requests_running"] == 0


@pytest.fixture(scope="module")
def reference():
    llm = _engine(False)
    yield llm
    llm.close()


def _alone(llm: LLM, prompts: list[dict], params: SamplingParams = GREEDY) -> list[list[int]]:
    llm.reset_prefix_cache()
    return [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]


def test_a_list_of_prompts_prefills_in_one_pass_with_the_same_tokens(reference):
    prompts = _prompts(5)
    want = _alone(reference, prompts)
    llm = _engine(True)
    calls = _spy(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == want
    assert calls == [[(len(p["prompt_token_ids"]), 0) for p in prompts]]
    s = llm.stats()
    assert s["prefill_batches"] == 1 and s["prefill_batched_sequences"] == 5 and s["jit_steps"] >= 1
    assert _all_back(llm)
    llm.close()


def test_prefix_cache_hits_prefill_their_rest_in_the_batch(reference):
    system = [3 + (7 * j) % 400 for j in range(40)]  # two and a half 16-token blocks
    prompts = _prompts(4, base=5, step=3, prefix=system)
    llm = _engine(True)
    llm.generate({"prompt_token_ids": system + [9, 9, 9]}, GREEDY)  # fills the cache with the system prompt
    calls = _spy(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert calls and all(start == 32 for _, start in calls[0])  # two full blocks reused by every prompt
    assert got == _alone(reference, prompts)
    assert _all_back(llm)
    llm.close()


def test_seeded_sampling_repeats_in_a_batch(reference):
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.9, seed=100 + i) for i in range(3)]
    prompts = _prompts(3)
    want = [reference.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    llm = _engine(True)
    calls = _spy(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want and len(calls) == 1
    llm.close()


def test_prompts_arriving_while_others_decode_are_grouped_within_the_chunk_budget(reference):
    """With a stream decoding, batches hold at most prefill_chunk_size new tokens: 3 prompts of 12 tokens under a
    budget of 32 make one batch of two and one prefill alone."""
    running = {"prompt_token_ids": [5] * 20}
    prompts = [{"prompt_token_ids": [3 + (i * 13 + j) % 400 for j in range(12)]} for i in range(3)]
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    want_running = _alone(reference, [running], long)[0]
    want = _alone(reference, prompts)
    llm = _engine(True, prefill_chunk_size=32)
    calls = _spy(llm)
    stream = llm.stream_deltas(running, long)
    first = next(stream).token_ids
    others = [llm.stream_deltas(p, GREEDY) for p in prompts]  # queued: the next step admits all three
    got = [[t for d in s for t in d.token_ids] for s in others]
    rest = [t for d in stream for t in d.token_ids]
    assert first + rest == want_running and got == want
    assert calls == [[(12, 0), (12, 0)]]
    assert _all_back(llm)
    llm.close()


def test_groups_keep_to_the_budget_and_need_two():
    class S:
        def __init__(self, n):
            self.prefill_len, self.prefilled = n, 0

    seqs = [S(12), S(12), S(12), S(40), S(5)]
    groups = EngineCore._groups(seqs, 32)
    assert [[s.prefill_len for s in g] for g in groups] == [[12, 12]]  # [12], [40], [5] alone: not batched
    assert [len(g) for g in EngineCore._groups(seqs, None)] == [5]


def test_batched_prefill_takes_a_bool():
    with pytest.raises(ValueError, match="batched_prefill='yes' must be True or False"):
        EngineConfig(batched_prefill="yes")


def test_preempted_sequences_recompute_through_batches_with_the_same_tokens():
    """A tiny KV cache forces preemption: recomputed sequences (prompt + tokens so far) come back through batched
    prefills too, and every request still gets the tokens of an engine with room and no batching; blocks return."""
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.8, seed=7, ignore_eos=True)] * 3
    prompts = [{"prompt_token_ids": [3 + (i * 41 + j * 7) % 500 for j in range(20)]} for i in range(6)]
    roomy = LLM("tiny-llama", max_model_len=64, max_num_seqs=4)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    roomy.close()
    small = LLM("tiny-llama", max_model_len=64, max_num_seqs=4, num_kv_blocks=6, block_size=16, batched_prefill=True)
    calls = _spy(small)
    for lookahead in (False, True):
        small.core.lookahead = lookahead
        assert [o.outputs[0].token_ids for o in small.generate(prompts, params)] == want
    assert small.stats()["preemptions"] > 0 and calls
    assert _all_back(small)
    small.close()
