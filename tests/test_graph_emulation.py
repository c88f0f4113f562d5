"""The scheduler and runner under what a GPU with graphs sees, on the CPU: every graph bucket "captured" and replayed
eagerly at its bucket size (decode padded to its batch bucket, prefills to their length bucket, a long prompt's
non-final chunks through the chunk graph), the token read-back one step behind (look-ahead), several agent
conversations at once on threads, prefix caching on. On the CPU each enqueued step has run when the host returns,
which is the order one stream gives, so anything wrong here is a logic error, not a race.

After every engine step, from the host: layer 0's K in the paged cache at every known position of every running
sequence, and in every block registered in the prefix cache, equals rope(W_k . rmsnorm(embed(token)), position)
(layer 0's K depends on the token and its position only); every row's token on the device is inside the vocabulary.
"""
from __future__ import annotations

import random
import threading
from collections import Counter

import torch

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.runtime.graphs import decode_buckets

BUCKETS = (16, 32, 48, 64, 96, 128)
CHUNK = 32


class EagerGraphs:
    """GraphRunner's serving side with every bucket captured: a replay runs the captured step eagerly, at the bucket
    size, on the runner's buffers (what the graph would do)."""

    def __init__(self, runner, max_num_seqs: int, buckets: tuple[int, ...] | None = None) -> None:
        self.runner, self.replays = runner, Counter()
        self.decode_buckets = decode_buckets(max_num_seqs, buckets)

    def _bucket(self, n: int) -> int | None:
        return next((b for b in BUCKETS if b >= n), None)

    ready_prefill_bucket = ready_context_bucket = _bucket

    def ready_part_bucket(self, n: int) -> int | None:
        return CHUNK if n <= CHUNK else None

    def ready_decode_bucket(self, rows: int) -> int | None:
        return next((b for b in self.decode_buckets if b >= rows), None)

    def ready_split_bucket(self, rows: int) -> None:
        return None

    def _run(self, key, fn) -> None:
        self.replays[key[0]] += 1
        with torch.inference_mode():
            fn()

    def replay_prefill(self, b):
        self._run(("prefill", b), lambda: self.runner.prefill_step(b))

    def replay_context_prefill(self, b):
        self._run(("ctx", b), lambda: self.runner.prefill_step(b, context=True))

    def replay_context_part(self, b):
        self._run(("part", b), lambda: self.runner.prefill_step(b, context=True, final=False))

    def replay_decode(self, b):
        self._run(("decode", b), lambda: self.runner.decode_step(b))

    def capture_if_starved(self):  # every bucket is "captured" already
        pass

    def notify_busy(self):
        pass

    def notify_idle(self):
        pass


def _layer0_k(llm, tokens: list[int], positions: list[int]) -> torch.Tensor:
    m, ops = llm.model, llm.ops
    layer, a = m.layers[0], m.args
    with torch.inference_mode():
        x = ops.rms_norm(m.embed_tokens(torch.tensor(tokens)), layer.input_layernorm, a.rms_norm_eps)
        qkv = torch.nn.functional.linear(x, layer.qkv_proj.weight, layer.qkv_proj.bias)
        q, k, _ = qkv.view(-1, a.num_heads + 2 * a.num_kv_heads, a.head_dim).split(
            [a.num_heads, a.num_kv_heads, a.num_kv_heads], dim=1)
        return ops.rope(q.clone(), k.clone(), torch.tensor(positions), m.cos_sin_cache)[1]


def _check(llm, errors: list[str], tag: str) -> None:
    bs, kc = llm.kv.block_size, llm.model.layers[0].k_cache
    toks = llm.runner.buf.tokens
    if int(toks.max()) >= llm.model.args.vocab_size or int(toks.min()) < 0:
        errors.append(f"{tag}: a device token outside the vocabulary: {toks.tolist()}")
    for seq in llm.scheduler.running:
        ids = seq.prompt_ids + seq.output_ids
        n = 0 if seq.in_prefill else min(seq.kv_len, len(ids))
        if n:
            slots = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(n)])
            wrong = (kc.view(-1, *kc.shape[2:])[slots] - _layer0_k(llm, ids[:n], list(range(n)))).abs() > 1e-3
            if wrong.any():
                errors.append(f"{tag}: {seq.request_id}: wrong K at positions "
                              f"{wrong.any(-1).any(-1).nonzero().flatten().tolist()[:8]}")
    alloc, root = llm.scheduler.blocks.allocator, llm.scheduler.blocks.root
    for entry in list(alloc.by_hash.values()):
        depth, parent = 0, entry.parent
        while parent != root and parent in alloc.by_hash:
            depth, parent = depth + 1, alloc.by_hash[parent].parent
        if parent == root:
            want = _layer0_k(llm, list(entry.tokens), list(range(depth * bs, depth * bs + bs)))
            if (kc[entry.block] - want).abs().max() > 1e-3:
                errors.append(f"{tag}: cached block {entry.block} (depth {depth}) holds wrong K")


def test_agent_conversations_with_emulated_graphs_keep_every_kv_right():
    llm = LLM("tiny-llama", max_model_len=512, max_num_seqs=8, prefill_chunk_size=CHUNK, prefill_buckets=BUCKETS)
    llm.core.lookahead = True
    graphs = llm.runner.graphs = EagerGraphs(llm.runner, 8)
    errors: list[str] = []
    steps = [0]
    real_step = llm.core.step

    def step() -> None:
        real_step()
        steps[0] += 1
        _check(llm, errors, f"step {steps[0]}")

    llm.core.step = step
    vocab = llm.model.args.vocab_size
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    fails: list[str] = []

    def conversation(c: int) -> None:
        rng = random.Random(c)
        history = [rng.randrange(3, vocab) for _ in range(70)]
        try:
            for _ in range(4):
                history += [rng.randrange(3, vocab) for _ in range(24)]
                answer = [t for d in llm.stream_deltas({"prompt_token_ids": history}, params) for t in d.token_ids]
                assert len(answer) == 12
                history += answer
        except Exception as e:  # noqa: BLE001 - reported below
            fails.append(f"conversation {c}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=conversation, args=(c,)) for c in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = llm.stats()
    assert fails == [] and errors[:5] == []
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["prefill_chunks"] > 0
    assert graphs.replays["decode"] > 0 and graphs.replays["ctx"] > 0 and graphs.replays["part"] > 0
    llm.close()


def test_chosen_decode_buckets_pad_one_row_and_keep_its_tokens():
    """decode_buckets=(4,): a lone sequence decodes in the 4-row graph, its 3 padding rows at position 0 of the
    scratch block; its greedy tokens equal the unpadded engine's, and no real block is written by a padding row."""
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(5, 40))}
    plain = LLM("tiny-llama", max_model_len=256, max_num_seqs=8)
    want = plain.generate(prompt, params)[0].outputs[0].token_ids
    plain.close()
    llm = LLM("tiny-llama", max_model_len=256, max_num_seqs=8, decode_buckets=(4,))
    graphs = llm.runner.graphs = EagerGraphs(llm.runner, 8, llm.config.decode_buckets)
    assert graphs.decode_buckets == [4, 8]
    errors: list[str] = []
    real_step = llm.core.step

    def step() -> None:
        real_step()
        _check(llm, errors, "step")

    llm.core.step = step
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == want
    assert errors == [] and graphs.replays["decode"] >= 9
    llm.close()
