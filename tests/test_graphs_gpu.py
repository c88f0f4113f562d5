"""CUDA graphs on the GPU: replay == JIT == capture off, failure tolerance, pool size (marker gpu)."""
import pytest
import torch
from block_helpers import blocks_settled

from hybrid_engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu
BUCKETS = (16, 32, 64)


def _lengths():
    return sorted({max(1, b + d) for b in BUCKETS for d in (-1, 0, 1)})


@pytest.fixture(scope="module")
def engines():
    kw = dict(dtype="float32", device="cuda", prefill_buckets=BUCKETS, max_model_len=512)
    graph = LLM("tiny-llama", capture="eager", **kw)
    off = LLM("tiny-llama", capture="off", **kw)
    yield graph, off
    graph.close()


def test_all_graphs_captured(engines):
    graph, _ = engines
    s = graph.stats()
    # per decode bucket the whole step and its two split halves (structured output), per prefill bucket the plain
    # prefill and (prefix caching) the prefill after cached positions: policy "eager" captures them all at load
    expected = 3 * len(graph.graphs.decode_buckets) + 2 * len(BUCKETS)
    assert (s["graphs_captured"], s["graphs_failed"], s["graphs_pending"]) == (expected, 0, 0)
    assert 0 < s["graph_pool_bytes"] < 2**30


def test_replay_matches_jit_and_off(engines):
    graph, off = engines
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for n in _lengths():
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        before = graph.stats()["graph_steps"]
        a = graph.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids
        assert graph.stats()["graph_steps"] - before == 24 - (n > BUCKETS[-1])  # prefill + 23 decode replays
        b = off.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids
        assert a == b, f"length {n}"


def test_seeded_sampling_same_in_graph_and_jit(engines):
    graph, off = engines
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.8, top_k=40, seed=11)
    assert graph.generate("sampled", p)[0].outputs[0].token_ids == off.generate("sampled", p)[0].outputs[0].token_ids


def test_background_worker_and_forced_failure():
    llm = LLM("tiny-llama", dtype="float32", device="cuda", prefill_buckets=BUCKETS, capture="idle")
    # decode graphs at load; prefill buckets wait for an idle window
    assert llm.stats()["graphs"] == sorted(str(("decode", b)) for b in llm.graphs.decode_buckets)
    llm.graphs.fail_next_capture = True  # the first bucket capture fails
    p = SamplingParams(max_tokens=8, temperature=0)
    ids = list(range(3, 20))  # 17 tokens -> bucket 32, demanded first
    first = llm.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids
    assert llm.graphs.worker.wait_idle(timeout=300)
    s = llm.stats()
    assert s["graphs_failed"] == 1 and s["graphs_captured"] == 2 * len(BUCKETS) - 1 + len(llm.graphs.decode_buckets)
    failed = int(next(iter(s["graph_failures"])))
    ids = list(range(100, 100 + failed))  # shares no prefix with the first prompt: no cache hit
    jit_before = s["jit_steps"]
    a = llm.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids
    assert llm.stats()["jit_steps"] == jit_before + 1  # that bucket's prefill stays on the JIT path
    off = LLM("tiny-llama", dtype="float32", device="cuda", capture="off")
    assert a == off.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids
    assert blocks_settled(llm)
    llm.close()


def test_requests_during_background_captures_match_capture_off():
    """Requests that arrive while the worker captures (it pauses between layers while they run, with its capture
    open) get the same greedy tokens as an engine that never captures; every graph still ends up captured."""
    kw = dict(dtype="float32", device="cuda", prefill_buckets=(16, 32, 64, 128, 256), max_model_len=512)
    off = LLM("tiny-llama", capture="off", **kw)
    llm = LLM("tiny-llama", capture="idle", **kw)  # last: its worker must not capture while `off` loads
    worker = llm.graphs.worker
    worker.quiet_s = 0.0  # the next capture starts as soon as a request ends: the next request meets it
    started = []
    capture = worker._capture

    def observed(key):
        started.append(key)
        capture(key)

    worker._capture = observed
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    overlapped = 0
    for _ in range(30):
        ids = torch.randint(3, 500, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g).tolist()
        capturing = llm.stats()["capturing"]
        got = llm.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids
        overlapped += bool(capturing)
        assert got == off.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids, len(ids)
    assert worker.wait_idle(timeout=300)
    s = llm.stats()
    assert s["graphs_failed"] == 0 and s["graphs_captured"] == len(llm.graphs.decode_buckets) + 10 and len(started) == 10
    assert blocks_settled(llm)
    print(f"{overlapped} of 30 requests started while a capture was open")
    llm.close()
    off.close()


def test_sustained_load_captures_between_steps_and_matches_capture_off():
    """No idle window ever (the worker's quiet period is an hour): a long request keeps the engine busy while short
    ones arrive; the buckets they ask for are captured between two steps by the driving thread (starve_s = 0), and
    every answer, the long one included, equals an engine that never captures."""
    import threading

    kw = dict(dtype="float32", device="cuda", prefill_buckets=(16, 32, 64), max_model_len=512)
    off = LLM("tiny-llama", capture="off", **kw)
    llm = LLM("tiny-llama", capture="idle", **kw)
    worker = llm.graphs.worker
    worker.quiet_s, worker.starve_s = 3600.0, 0.0
    by_worker, capture = [], worker._capture

    def observed(key):
        by_worker.append(threading.current_thread() is worker._thread)
        capture(key)

    worker._capture = observed
    long_ids, long_p = list(range(3, 40)), SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # ids below the tiny preset's vocabulary of 512
    prompts = [list(range(100 + 50 * i, 100 + 50 * i + n)) for i, n in enumerate((20, 21, 50, 10, 22, 51, 11))]
    long_out = []
    stream = llm.stream_deltas({"prompt_token_ids": long_ids}, long_p)
    first = next(stream)  # the long request is running before the short ones arrive
    runner = threading.Thread(target=lambda: long_out.extend(t for d in stream for t in d.token_ids))
    runner.start()
    got = [llm.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids for ids in prompts]
    runner.join()
    captured = {k for k in worker.captured if not isinstance(k, tuple)}
    assert {32, 64, 16} <= captured  # prefill buckets, with no idle window: between steps
    assert len(by_worker) >= 3 and not any(by_worker)  # each by a thread driving the steps, none by the worker
    assert got == [off.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids for ids in prompts]
    assert [*first.token_ids, *long_out] == off.generate({"prompt_token_ids": long_ids}, long_p)[0].outputs[0].token_ids
    assert blocks_settled(llm)
    llm.close()
    off.close()


def test_prefix_cache_hits_replay_context_graphs_and_match_caching_off(engines):
    """A cached prefix with new tokens replays the ("prefill_ctx", bucket) graph, whatever the cached length, and
    gives the tokens of an engine with no caching and no graphs (padding in the bucket, start from the device)."""
    graph, _ = engines
    plain = LLM("tiny-llama", dtype="float32", device="cuda", capture="off", enable_prefix_caching=False,
                max_model_len=512)
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(7)
    head = torch.randint(3, 500, (200,), generator=g).tolist()
    graph.generate({"prompt_token_ids": head}, p)
    for cached, new in ((16, 1), (48, 15), (96, 17), (160, 33), (192, 64)):
        ids = head[:cached] + torch.randint(3, 500, (new,), generator=g).tolist()
        before = graph.stats()
        out = graph.generate({"prompt_token_ids": ids}, p)[0]
        after = graph.stats()
        assert out.num_cached_tokens == cached
        assert after["jit_steps"] == before["jit_steps"], (cached, new)  # the context graph, not the JIT path
        assert out.outputs[0].token_ids == plain.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids
    assert blocks_settled(graph)


def test_long_prompt_chunks_replay_graphs_and_match_no_graphs():
    """A long prompt arriving while another request decodes is prefilled in chunks: with the chunk size a bucket, its
    non-final chunks replay the ("prefill_ctx_part", bucket) graph (the first one at start 0) and its final chunk the
    ("prefill_ctx", bucket) graph, with no JIT step; both requests get the tokens an engine without graphs or caching
    gives them alone."""
    kw = dict(dtype="float32", device="cuda", prefill_buckets=BUCKETS, max_model_len=512, prefill_chunk_size=64)
    graph = LLM("tiny-llama", capture="eager", **kw)
    plain = LLM("tiny-llama", capture="off", enable_prefix_caching=False, **kw)
    try:
        assert ("prefill_ctx_part", 64) in graph.graphs.worker.captured
        g = torch.Generator().manual_seed(3)
        short = torch.randint(3, 500, (9,), generator=g).tolist()
        long = torch.randint(3, 500, (200,), generator=g).tolist()  # chunks of 64, 64, 64 and 8 tokens
        p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        want = [plain.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids for ids in (short, long)]
        stream = graph.stream_deltas({"prompt_token_ids": short}, p)
        got_short = list(next(stream).token_ids)  # decoding now
        before = graph.stats()
        got_long = graph.generate({"prompt_token_ids": long}, p)[0].outputs[0].token_ids
        got_short += [t for d in stream for t in d.token_ids]
        after = graph.stats()
        assert after["prefill_chunks"] - before["prefill_chunks"] == 4
        assert after["jit_steps"] == before["jit_steps"]
        assert [got_short, got_long] == want
        assert blocks_settled(graph)
    finally:
        graph.close()
        plain.close()


def test_serving_stream_is_current_only_while_enqueueing(engines):
    """The engine makes its stream current around its GPU work only: the caller's stream is current again after a
    request and while a stream of tokens is suspended between deltas, and StreamScope nests and restores."""
    from hybrid_engine.runtime.streams import StreamScope

    graph, _ = engines
    mine = torch.cuda.Stream()
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with torch.cuda.stream(mine):
        graph.generate({"prompt_token_ids": [5, 6, 7]}, p)
        assert torch.cuda.current_stream() == mine
        it = graph.stream_deltas({"prompt_token_ids": [5, 6, 7]}, p)
        next(it)
        assert torch.cuda.current_stream() == mine  # suspended mid-request
        list(it)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    scope = StreamScope(graph.stream_ctx)
    with scope:
        assert torch.cuda.current_stream() == graph.stream_ctx
        with StreamScope(mine), scope:
            assert torch.cuda.current_stream() == graph.stream_ctx
        assert torch.cuda.current_stream() == graph.stream_ctx
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_driver_calls_match_torch_calls_and_serve_from_a_fresh_thread(engines):
    """The critical path's driver calls (cuda_driver.py: staging copy, graph launch, token copy and event) give the
    same tokens as torch's calls, for graph replays and the JIT path, including on a thread that never touched CUDA
    before (the driver needs the primary context made current there)."""
    import threading

    from hybrid_engine.runtime import cuda_driver

    assert cuda_driver.available()
    graph, off = engines
    p = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=3, ignore_eos=True)
    ids = [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()}
           for n in (5, 31, 100)]  # two buckets and one past the largest (JIT)
    want = [o.outputs[0].token_ids for o in off.generate(ids, p)]
    prev = cuda_driver.set_enabled(False)
    try:
        torch_calls = [o.outputs[0].token_ids for o in graph.generate(ids, p)]
    finally:
        cuda_driver.set_enabled(prev)
    driver_calls = [o.outputs[0].token_ids for o in graph.generate(ids, p)]
    fresh: list = []
    t = threading.Thread(target=lambda: fresh.extend(o.outputs[0].token_ids for o in graph.generate(ids, p)))
    t.start()
    t.join()
    assert torch_calls == want and driver_calls == want and fresh == want
