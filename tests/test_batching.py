"""Many requests at once on the CPU: batched decode gives each request the tokens it gets alone, preemption and
cancellation lose nothing, and the step loop's read-one-step-behind mode (the GPU's) gives the same tokens."""
import threading

import pytest
from block_helpers import blocks_settled

from hybrid_engine import LLM, SamplingParams

PROMPTS = [[1, 5, 9], [1, 77, 3, 200, 41, 8, 15], [1, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
           [1, 42] * 9, [1, 499, 498, 497], [1, 250, 12, 12, 12]]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llama", max_model_len=128, max_num_seqs=4)


def _all_free(llm):
    return blocks_settled(llm)


def _alone(llm, params):
    return [llm.generate({"prompt_token_ids": p}, sp)[0].outputs[0].token_ids for p, sp in zip(PROMPTS, params)]


def _together(llm, params):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


def _greedy(n=24):
    return [SamplingParams(max_tokens=n + 3 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]


def test_batched_greedy_equals_alone(llm):
    alone = _alone(llm, _greedy())
    together = _together(llm, _greedy())
    assert together == alone
    sizes = llm.stats()["decode_batch_sizes"]
    assert max(sizes) == 4 and len(sizes) > 1  # really batched (7 prompts over 4 rows), and the batch shrank
    assert _all_free(llm)


def test_seeded_sampling_repeats_whatever_the_batch(llm):
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    alone = _alone(llm, params)
    assert _together(llm, params) == alone
    assert len({tuple(t) for t in alone}) == len(PROMPTS)


def test_read_one_step_behind_gives_the_same_tokens(llm):
    """The GPU's mode: the next decode step is enqueued before the previous one is read, so finished sequences
    ride along one step, rows are compacted while a step is in flight, and stale tokens must be dropped."""
    want = _together(llm, _greedy())
    llm.core.lookahead = True
    try:
        stops = [SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[w[5]]) for w in want]
        got_stop = _together(llm, stops)
        got = _together(llm, _greedy())
    finally:
        llm.core.lookahead = False
    assert got == want
    assert got_stop == [w[:w.index(w[5]) + 1] for w in want]
    assert _all_free(llm)


def test_preemption_under_a_tiny_kv_cache_completes_every_request():
    small = LLM("tiny-llama", max_model_len=64, max_num_seqs=4, num_kv_blocks=6, block_size=16)
    roomy = LLM("tiny-llama", max_model_len=64, max_num_seqs=4)
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.8, seed=7, ignore_eos=True)] * 3
    prompts = [{"prompt_token_ids": p[:20]} for p in PROMPTS[:6]]
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    for lookahead in (False, True):
        small.core.lookahead = lookahead
        got = [o.outputs[0].token_ids for o in small.generate(prompts, params)]
        assert got == want
    assert small.stats()["preemptions"] > 0
    assert _all_free(small)


def test_cancelling_one_stream_leaves_the_others_unchanged(llm):
    params = _greedy()
    params[2] = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)  # still running when cancelled
    want = _alone(llm, params)
    streams = [llm.stream_deltas({"prompt_token_ids": p}, sp) for p, sp in zip(PROMPTS, params)]
    got = [[] for _ in streams]
    for step in range(40):
        for i, s in enumerate(streams):
            if i == 2 and step == 3:
                s.close()
            if i == 2 and step >= 3:
                continue
            for d in s:
                got[i].extend(d.token_ids)
                break
    for i, s in enumerate(streams):
        if i != 2:
            for d in s:
                got[i].extend(d.token_ids)
    assert [g for i, g in enumerate(got) if i != 2] == [w for i, w in enumerate(want) if i != 2]
    assert got[2] == want[2][:3]
    assert llm.stats()["requests_cancelled"] >= 1 and _all_free(llm)
    assert list(streams[2]) == []


def test_streams_from_several_threads_run_concurrently(llm):
    want = _alone(llm, _greedy())
    got = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def run(i):
        barrier.wait()
        got[i] = [t for d in llm.stream_deltas({"prompt_token_ids": PROMPTS[i]}, _greedy()[i]) for t in d.token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    before = sum(k * v for k, v in llm.stats()["decode_batch_sizes"].items() if k > 1)
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want
    assert sum(k * v for k, v in llm.stats()["decode_batch_sizes"].items() if k > 1) > before
    assert _all_free(llm)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch, fail_decode_step):
    fail_decode_step(llm, 3)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], _greedy()[:3])
    assert _all_free(llm)
    monkeypatch.undo()
    assert _together(llm, _greedy()) == _alone(llm, _greedy())


@pytest.mark.parametrize("lookahead", [False, True])
def test_long_prompt_beside_decoding_streams_is_prefilled_in_chunks(lookahead):
    # no prefix caching: the second run of the long prompt must prefill it all again (hits: test_prefix_cache.py)
    llm = LLM("tiny-llama", max_model_len=256, max_num_seqs=4, prefill_chunk_size=16, enable_prefix_caching=False)
    llm.core.lookahead = lookahead
    long_prompt = [1] + [(7 * i + 3) % 500 for i in range(69)]  # 70 tokens: 5 chunks of at most 16
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want_long = llm.generate({"prompt_token_ids": long_prompt}, greedy)[0].outputs[0].token_ids  # alone: whole
    want_short = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=40, temperature=0,
                                                                                  ignore_eos=True))
    assert llm.stats()["prefill_chunks"] == 0
    short = llm.stream_deltas({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=40, temperature=0,
                                                                                ignore_eos=True))
    got_short = list(next(short).token_ids)  # decoding now
    got_long = llm.generate({"prompt_token_ids": long_prompt}, greedy)[0].outputs[0].token_ids
    got_short += [t for d in short for t in d.token_ids]
    assert llm.stats()["prefill_chunks"] == 5
    assert got_long == want_long
    assert got_short == want_short[0].outputs[0].token_ids
    assert _all_free(llm)


def test_chunked_attention_matches_whole_prompt_attention():
    import torch

    from hybrid_engine.kernels.cached_prefill_attention import cached_prefill_attention_ref
    from hybrid_engine.kernels.prefill_attention import prefill_attention_ref
    from hybrid_engine.kernels.kv_store import store_kv_ref

    g = torch.Generator().manual_seed(5)
    n, hq, hkv, dim, bs = 37, 8, 2, 16, 8
    q, k, v = (torch.randn(n, h, dim, generator=g) for h in (hq, hkv, hkv))
    kc, vc = torch.zeros(9, bs, hkv, dim), torch.zeros(9, bs, hkv, dim)
    table = torch.tensor([4, 0, 7, 2, 8], dtype=torch.int32)
    slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in range(n)])
    store_kv_ref(k, v, kc, vc, slots)
    whole = prefill_attention_ref(q, k, v, 0.25)
    for start in (1, 16, 30):
        part = cached_prefill_attention_ref(q[start:], kc, vc, table, start, 0.25)
        torch.testing.assert_close(part, whole[start:], rtol=1e-5, atol=1e-5)


def test_closing_a_stream_another_thread_is_reading_ends_that_reader(llm):
    stream = llm.stream_deltas({"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=120, temperature=0,
                                                                                 ignore_eos=True))
    got, started = [], threading.Event()

    def read():
        for d in stream:
            got.extend(d.token_ids)
            started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    stream.close()
    reader.join(60)
    assert not reader.is_alive() and 0 < len(got) < 120
    assert _all_free(llm)
