"""Prefix caching: hashed, reference-counted KV blocks reused across requests (CPU, fp32).

Greedy outputs must be the same with caching on and off whatever is shared, evicted, preempted, cancelled or
batched; a block a request holds is never handed to another; after every test each block is free or cached.
"""
import contextlib
import random
import threading

import pytest
from block_helpers import blocks_settled

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.engine.block_manager import BlockAllocator, BlockManager
from hybrid_engine.errors import HybridEngineError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
_ENGINES: list[LLM] = []


def _engine(**kw) -> LLM:
    llm = LLM("tiny-llama", **{"max_model_len": 256, "max_num_seqs": 4, **kw})
    _ENGINES.append(llm)
    return llm


@pytest.fixture(scope="module")
def on():
    return _engine()


@pytest.fixture(scope="module")
def off():
    return _engine(enable_prefix_caching=False)


@pytest.fixture(autouse=True)
def settled_after_each_test():
    yield
    for llm in _ENGINES:
        assert blocks_settled(llm), llm.stats()


@contextlib.contextmanager
def _tables_checked_every_step(llm):
    """After every engine step: each block's reference count is the number of running tables holding it, and a
    block a sequence may still write (past its registered, read-only blocks) is in no other table."""
    real, steps = llm.core.step, [0]

    def step():
        real()
        steps[0] += 1
        alloc, running = llm.scheduler.blocks.allocator, llm.scheduler.running
        held = [b for s in running for b in s.block_table]
        assert all(alloc.refs[b] == held.count(b) for b in set(held))
        assert sum(alloc.refs) == len(held)
        writable = [b for s in running for b in s.block_table[s.num_registered:]]
        assert len(writable) == len(set(writable)) and not set(writable) & set(alloc.hash_of)
        alloc.check()

    llm.core.step = step
    try:
        yield steps
    finally:
        del llm.core.step
    assert steps[0] > 0


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(n)]


def _tokens(llm, prompts, params=GREEDY):
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


def _one_by_one(llm, prompts, params=GREEDY):
    return [_tokens(llm, [p], params)[0] for p in prompts]


# ---- the block manager alone ----

def test_a_referenced_cached_block_is_never_handed_out():
    alloc = BlockAllocator(4)
    a = alloc.allocate(2)
    alloc.register(a[0], 11, 0, (1,))
    alloc.register(a[1], 12, 11, (2,))
    alloc.free(a)
    assert alloc.num_cached == 2 and alloc.num_free == 2
    alloc.acquire(a[:1])  # a hit: referenced again, no longer evictable
    got = alloc.allocate(3)  # the two free blocks, then the only evictable one
    assert a[0] not in got and a[1] in got and alloc.num_evicted == 1
    assert 12 not in alloc.by_hash and alloc.by_hash[11].block == a[0] and alloc.by_hash[11].holds(0, (1,))
    with pytest.raises(HybridEngineError, match="KV cache full"):
        alloc.allocate(1)
    alloc.check()
    alloc.free(got + [a[0]])
    with pytest.raises(HybridEngineError, match="freed twice"):
        alloc.free([a[0]])


def test_eviction_takes_a_sequences_tail_before_its_head():
    bm = BlockManager(6, 4)
    ids, known, table = list(range(1, 14)), [], []
    bm.admit(table, [], len(ids))
    bm.register(table, ids, known, 0, 3)
    bm.release(table)
    bm.allocator.allocate(3 + 1)  # 3 free blocks, then one eviction: the tail block (tokens 9..12)
    assert len(bm.cached_prefix(ids, known)) == 2


@pytest.mark.parametrize("known", [False, True], ids=["hashed", "hashes-known"])
def test_a_lookup_checks_tokens_not_only_hashes(known):
    """Block by block, and in the C-level passes over a conversation's known hashes: a registered block whose
    tokens or parent differ ends the hit there."""
    bm = BlockManager(8, 2)
    ids, table, hashes = [1, 2, 3, 4, 5, 6, 7, 8], [], []
    bm.admit(table, [], len(ids))
    bm.register(table, ids, hashes, 0, 4)
    given = (lambda: list(hashes)) if known else list
    assert bm.cached_prefix(ids, given()) == table[:3]  # the last token is always computed
    assert bm.cached_prefix(ids[:6], given()) == table[:2]
    bm.allocator.by_hash[hashes[1]].parent = 12345  # as if another prefix had collided on the second block's hash
    assert bm.cached_prefix(ids, given()) == table[:1]
    bm.allocator.by_hash[hashes[0]].tokens = (9, 9)
    assert bm.cached_prefix(ids, given()) == []
    bm.release(table)
    bm.allocator.check()


@pytest.mark.parametrize("then", ["nothing", "other-content", "same-content"])
def test_claimed_entries_are_checked_by_identity_and_stale_claims_are_not_trusted(then):
    """A conversation's next turn claims the entries its previous turn verified. The claims hold while those very
    entries are in the index; once the second block is evicted (and its hash registered again for other content,
    or for the same), the tokens are compared again."""
    bm = BlockManager(8, 2)
    alloc, ids = bm.allocator, [1, 2, 3, 4, 5, 6, 7]
    table, hashes, entries = [], [], []
    bm.admit(table, [], len(ids))
    bm.register(table, ids, hashes, 0, 3, entries)
    assert [e.block for e in entries] == table[:3] and entries[1].holds(hashes[0], (3, 4))
    table, claims = list(table), list(entries)
    bm.release(list(table))
    if then == "nothing":
        got = list(claims)
        assert bm.cached_prefix(ids, list(hashes), got) == table[:3] and all(a is b for a, b in zip(got, claims))
        return
    taken = alloc.allocate(alloc.num_free + 2)  # evicts the last two blocks (a sequence's tail goes first)
    assert alloc.num_evicted == 2 and table[0] in alloc.hash_of and table[1] not in alloc.hash_of
    tokens = (9, 9) if then == "other-content" else (3, 4)
    alloc.register(taken[0], hashes[1], hashes[0], tokens)  # hash 1 named again, by a new entry
    got = list(claims)
    hit = bm.cached_prefix(ids, list(hashes), got)
    assert hit == ([table[0]] if then == "other-content" else [table[0], taken[0]])
    assert [e.block for e in got] == hit and got[0] is claims[0]
    alloc.free(taken)
    alloc.check()


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_every_block_in_one_state(seed):
    """Admit (with hits), grow, register and release in random order: the allocator stays consistent, a hit is
    always the blocks registered for exactly those tokens, and no block is in two live tables. Some admissions come
    with the head's hashes known, some also with the entries an earlier admission of the same head verified (as a
    conversation's next turn has them from the prompt memo): claims that evictions may have made stale."""
    rng = random.Random(seed)
    bm = BlockManager(24, 4, salt=seed)
    heads = [[rng.randrange(3) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    live: list[tuple[list[int], list[int], list[int], int, list]] = []  # (table, ids, hashes, registered, entries)
    content: dict[int, tuple[int, ...]] = {}  # registered block -> the prefix its KV holds
    claims: dict[int, tuple[list[int], list]] = {}  # head -> the hashes and entries of its latest admission
    for _ in range(300):
        op = rng.random()
        if op < 0.4 and len(live) < 5:
            h = rng.randrange(len(heads))
            head, n = heads[h], len(heads[h]) // 4
            ids = head + [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
            known: list[int] = []
            entries: list = []
            way = rng.random()
            if way < 0.35 and h in claims:
                known, entries = claims[h][0][:n], claims[h][1][:n]
            elif way < 0.7:
                bm.hashes(ids, known, n)
            hit = bm.cached_prefix(ids, known, entries)
            assert [e.block for e in entries] == hit
            for j, b in enumerate(hit):
                assert content[b] == tuple(ids[:(j + 1) * 4])
            if bm.cost(hit, len(ids)) > bm.num_available:
                continue
            table: list[int] = []
            bm.admit(table, hit, len(ids))
            live.append((table, ids, known, len(hit), entries))
            claims[h] = (known, entries)
        elif op < 0.6 and live:
            i = rng.randrange(len(live))
            table, ids, known, done, entries = live[i]
            full = len(ids) // 4
            bm.register(table, ids, known, done, full, entries)
            for j in range(done, full):
                content.setdefault(table[j], tuple(ids[:(j + 1) * 4]))
            for j, e in enumerate(entries):  # the verified entries hold this sequence's blocks
                assert e.tokens == tuple(ids[j * 4:(j + 1) * 4]) and e.parent == (known[j - 1] if j else bm.root)
            live[i] = (table, ids, known, full, entries)
        elif op < 0.75 and live:
            table, ids, *_ = rng.choice(live)
            extra = [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
            if bm.missing(table, len(ids) + len(extra)) <= bm.num_available:
                ids.extend(extra)
                bm.grow(table, len(ids))
        elif live:
            table, *_ = live.pop(rng.randrange(len(live)))
            bm.release(table)
        bm.allocator.check()
        held = [b for t, *_ in live for b in t]
        for b in list(content):
            if b not in bm.allocator.hash_of:
                del content[b]  # evicted: its id may hold anything now
        assert all(bm.allocator.refs[b] == held.count(b) for b in set(held))
        tails = [b for t, ids, _, done, _ in live for b in t[done:]]
        assert len(tails) == len(set(tails)), "a block being written belongs to two sequences"
    for table, *_ in live:
        bm.release(table)
    assert bm.num_free + bm.num_cached == 24


# ---- the engine, tiny random model ----

def test_shared_prefixes_hit_and_give_the_same_tokens(on, off):
    system = _ids(1, 53)
    prompts = [system + _ids(10 + i, n) for i, n in enumerate((1, 7, 11, 16, 30))]
    prompts += [system[:48], system[:49], system + system[:32]]  # block-aligned: the last token is recomputed
    want = _one_by_one(off, prompts)
    assert _one_by_one(on, prompts) == want
    before = on.stats()["prefix_cache_hit_tokens"]
    assert _one_by_one(on, prompts) == want  # every prompt cached now, all but the block of its last token
    s = on.stats()
    assert s["prefix_cache_hit_tokens"] - before == sum((len(p) - 1) // 16 * 16 for p in prompts)
    assert 0 < s["prefix_cache_hit_rate"] <= 1 and s["kv_blocks_cached"] > 0
    assert off.stats()["prefix_cache_hit_tokens"] == 0 and off.stats()["kv_blocks_cached"] == 0


def test_cached_tokens_are_reported_per_request(on):
    prompt = _ids(2, 70)
    first = on.generate({"prompt_token_ids": prompt}, GREEDY)[0]
    second = on.generate({"prompt_token_ids": prompt + [5, 6]}, GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64 == second.metrics.cached_tokens
    assert second.metrics.prompt_tokens == 72


def test_decode_filled_blocks_are_reused_by_the_next_turn(on, off):
    history, prev, beyond_prompt = _ids(3, 20), None, False
    for turn in range(3):
        want = _tokens(off, [history])[0]
        out = on.generate({"prompt_token_ids": history}, GREEDY)[0]
        assert out.outputs[0].token_ids == want
        if prev is not None:  # the previous request wrote KV for its prompt and all but its last output token
            written = len(prev) + GREEDY.max_tokens - 1
            assert out.num_cached_tokens == min(written // 16, (len(history) - 1) // 16) * 16
            beyond_prompt |= out.num_cached_tokens > len(prev) // 16 * 16
        prev, history = history, history + want + _ids(30 + turn, 7)
    assert beyond_prompt  # blocks filled by decode steps were hit


def test_hits_inside_a_batch_while_others_decode(on, off):
    system = _ids(4, 40)
    _tokens(on, [system + [1]])  # cache the shared head
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [_ids(5, 9), system + _ids(6, 5), system + _ids(7, 21), system[:33]]
    params = [long, GREEDY, GREEDY, GREEDY]
    want = [_tokens(off, [p], sp)[0] for p, sp in zip(prompts, params)]
    first = on.stream_deltas({"prompt_token_ids": prompts[0]}, long)
    got0 = list(next(first).token_ids)  # decoding now
    hits = on.stats()["prefix_cache_hit_tokens"]
    rest = _tokens(on, prompts[1:], params[1:])
    got0 += [t for d in first for t in d.token_ids]
    assert [got0] + rest == want
    assert on.stats()["prefix_cache_hit_tokens"] - hits >= 3 * 32


def test_seeded_sampling_is_the_same_with_a_cache_hit(on, off):
    system = _ids(8, 45)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    prompts = [system + [7, 8, 9], system + [7, 8, 9]]
    assert _one_by_one(on, prompts, params) == _one_by_one(off, prompts, params)


def test_eviction_under_a_small_kv_cache_keeps_every_request_correct(off):
    small = _engine(max_model_len=96, num_kv_blocks=8, block_size=16)
    heads = [_ids(20 + i, 40) for i in range(3)]
    prompts = [heads[i % 3] + _ids(40 + i, 3 + i) for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = _one_by_one(off, prompts, params)
    with _tables_checked_every_step(small):
        assert _one_by_one(small, prompts, params) == want
        assert _tokens(small, prompts, params) == want  # together: preemption and eviction at once
    s = small.stats()
    assert s["prefix_cache_evictions"] > 0 and s["prefix_cache_hit_tokens"] > 0


def test_preemption_with_caching_completes_every_request(off):
    small = _engine(max_model_len=64, num_kv_blocks=6, block_size=16)
    head = _ids(9, 17)
    prompts = [head + _ids(50 + i, 2 + i) for i in range(6)]
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.8, seed=7, ignore_eos=True)] * 3
    want = [_tokens(off, [p], sp)[0] for p, sp in zip(prompts, params)]
    for lookahead in (False, True):
        small.core.lookahead = lookahead
        try:
            with _tables_checked_every_step(small):
                assert _tokens(small, prompts, params) == want
        finally:
            small.core.lookahead = False
    s = small.stats()
    assert s["preemptions"] > 0 and s["prefix_cache_hit_tokens"] > 0


def test_a_hit_with_a_long_rest_is_prefilled_in_chunks_beside_decodes(off):
    llm = _engine(prefill_chunk_size=16)
    head = _ids(11, 36)
    _tokens(llm, [head])
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [_ids(12, 5), head + _ids(13, 45)]
    want = [_tokens(off, [prompts[0]], long)[0], _tokens(off, [prompts[1]])[0]]
    first = llm.stream_deltas({"prompt_token_ids": prompts[0]}, long)
    got0 = list(next(first).token_ids)
    chunks = llm.stats()["prefill_chunks"]
    got1 = _tokens(llm, [prompts[1]])[0]
    got0 += [t for d in first for t in d.token_ids]
    assert [got0, got1] == want
    assert llm.stats()["prefill_chunks"] - chunks >= 3  # 45 + 4 uncached tokens after the 32 hit, 16 at a time


def test_cancelled_and_failed_requests_give_their_blocks_back(on, off, fail_decode_step):
    system = _ids(14, 50)
    stream = on.stream_deltas({"prompt_token_ids": system + [3]}, SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    assert any(on.scheduler.blocks.allocator.refs)
    stream.close()
    assert blocks_settled(on)
    fail_decode_step(on, 2)
    with pytest.raises(RuntimeError, match="injected"):
        _tokens(on, [system + [4]])
    assert blocks_settled(on)
    assert on.stats()["kv_blocks_cached"] == 0  # KV a failed step may have half written is not reused
    assert _tokens(on, [system + [4]]) == _tokens(off, [system + [4]])


def test_concurrent_callers_with_shared_prefixes(on, off):
    system = _ids(15, 35)
    prompts = [system + _ids(60 + i, 4 + i) for i in range(6)]
    want = _one_by_one(off, prompts)
    got: dict[int, list[int]] = {}

    def run(i):
        got[i] = _tokens(on, [prompts[i]])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(len(prompts))] == want


def test_reset_prefix_cache_frees_cached_blocks_only(on, off):
    prompt = _ids(16, 40)
    _tokens(on, [prompt])
    stream = on.stream_deltas({"prompt_token_ids": _ids(17, 40)}, SamplingParams(max_tokens=30, ignore_eos=True))
    next(stream)  # holds its blocks while the cache is reset
    held = sum(1 for r in on.scheduler.blocks.allocator.refs if r)
    assert on.reset_prefix_cache() > 0
    assert on.stats()["kv_blocks_cached"] == 0 and sum(1 for r in on.scheduler.blocks.allocator.refs if r) == held
    assert on.generate({"prompt_token_ids": prompt}, GREEDY)[0].num_cached_tokens == 0
    rest = [t for d in stream for t in d.token_ids]
    assert len(rest) == 29


def test_config_flag_and_stats(off):
    assert off.config.enable_prefix_caching is False and off.stats()["enable_prefix_caching"] is False
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM("tiny-llama", enable_prefix_caching="no")


# ---- SmolLM2 (learned weights) ----

@contextlib.contextmanager
def _caching_off(llm):
    blocks = llm.scheduler.blocks
    blocks.enable_caching = False
    try:
        yield
    finally:
        blocks.enable_caching = True


def test_smollm2_multi_turn_chat_hits_the_cache(smollm2_llm):
    """The chat's history re-rendered by the template each turn: its tokens up to the last answer are the previous
    request's, so the next request finds them cached; the replies equal those with caching off."""
    llm = smollm2_llm
    params = SamplingParams(max_tokens=12, temperature=0)
    messages = [{"role": "system", "content": "You are a concise assistant for a hardware shop."}]
    hits = []
    for q in ("What is a GPU?", "And a CPU?", "Which one trains neural networks faster?"):
        messages.append({"role": "user", "content": q})
        ids = llm.encode_chat(messages)
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        with _caching_off(llm):
            ref = llm.generate({"prompt_token_ids": ids}, params)[0]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids, q
        hits.append(out.num_cached_tokens)
        messages.append({"role": "assistant", "content": out.outputs[0].text})
    assert 0 < hits[1] < hits[2]
    assert blocks_settled(llm)


# ---- the GPU benchmark script, end to end on the CPU (tiny preset, small sizes) ----

def test_prefix_benchmark_runs_on_the_cpu(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prefix_bench.py"
    spec = importlib.util.spec_from_file_location("prefix_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "prefix.json"
    profile = tmp_path / "turn_host_profile.txt"
    assert bench.main(["--preset", "tiny-llama", "--small", "--runs", "2", "--host-profile", str(profile),
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    pc = res["systems"]["hybrid"]["prefix_cache"]
    assert pc["hit_tokens_per_request"] == pc["cached_tokens"] // 16 * 16 > 0
    turns = pc["multi_turn"]["turns"]
    assert len(pc["multi_turn_ttft_p50_ms"]) == len(pc["multi_turn_ttft_p50_ms_off"]) == turns - 1
    host = pc["multi_turn"]["host_before_prefill_p50_ms"]  # one conversation: each turn's host time was staged
    assert len(host) == turns and all(0 < h < t for h, t in zip(host[1:], pc["multi_turn_ttft_p50_ms"]))
    assert "host_before_prefill_p50_ms" not in pc["multi_turn_concurrent"]
    assert "cached_prefix" in profile.read_text()  # the turns' request path up to the prefill, cache lookup included
    assert pc["agreement"]["agreement"] == 1.0 and pc["agreement"]["cached_tokens_p50"] > 0  # fp32: identical
    assert set(res["systems"]["hybrid_prefix_caching_off"]["ttft_ms"]) == {"10", "50"}
    assert pc["stats"]["prefix_cache_hit_tokens"] > 0


def test_server_reports_cached_prompt_tokens_and_cache_metrics():
    pytest.importorskip("fastapi")
    import socket
    import time

    import httpx
    import uvicorn

    from hybrid_engine.server import create_app

    llm = _engine()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm, served_model_name="tiny"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        body = {"model": "tiny", "prompt": "word " * 40, "max_tokens": 3, "temperature": 0}
        first = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["usage"]
        second = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["usage"]
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        assert second["prompt_tokens_details"]["cached_tokens"] == (second["prompt_tokens"] - 1) // 16 * 16 > 0
        metrics = httpx.get(base + "/metrics", timeout=10).text
        hits = next(ln for ln in metrics.splitlines() if ln.startswith("hybrid_engine_prefix_cache_hit_tokens "))
        assert float(hits.split()[1]) == second["prompt_tokens_details"]["cached_tokens"]
        assert "hybrid_engine_kv_blocks_cached " in metrics and "hybrid_engine_prefix_cache_hit_rate " in metrics
    finally:
        server.should_exit = True
        thread.join(10)


class _EagerBuckets:
    """Stands in for GraphRunner on the CPU: a prefill "replays" its bucket by running the very step a graph
    captures (padded to the bucket, the context start read from the device buffer) eagerly; decode stays JIT."""

    def __init__(self, runner, buckets):
        self.runner, self.buckets, self.replayed = runner, buckets, []

    def _bucket(self, n):
        return next((b for b in self.buckets if b >= n), None)

    ready_prefill_bucket = ready_context_bucket = _bucket

    def ready_decode_bucket(self, rows):
        return None

    def replay_prefill(self, bucket):
        self._run(bucket, False)

    def replay_context_prefill(self, bucket):
        self._run(bucket, True)

    def _run(self, bucket, context):
        import torch

        self.replayed.append((context, bucket))
        with torch.inference_mode():
            self.runner.prefill_step(bucket, context=context)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_bucket_steps_after_a_cached_prefix_give_the_same_tokens(backend, off):
    """The step a ("prefill_ctx", bucket) graph captures, run eagerly: padded to its bucket, any cached start."""
    llm = _engine(attention_backend=backend, max_model_len=128)
    fake = llm.runner.graphs = _EagerBuckets(llm.runner, (16, 32, 64))
    head = _ids(18, 40)
    _tokens(llm, [head])
    prompts = [head[:16] + _ids(19, 1), head[:32] + _ids(20, 13), head + _ids(21, 31)]
    want = _one_by_one(off, prompts)
    assert _one_by_one(llm, prompts) == want
    # new tokens after the hit: 1, 13, and 71 - 32 = 39 (the head's third block also holds the first answer's tokens)
    assert [r for r in fake.replayed if r[0]] == [(True, 16), (True, 16), (True, 64)]
