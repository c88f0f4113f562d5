"""Paged decode attention (split-K) and causal prefill attention: Triton vs fp32 torch reference."""
import pytest
import torch
from kernel_helpers import GPU, assert_close, rand

from hybrid_engine.kernels.decode_attention import (decode_attention_ref, decode_attention_triton,
                                                    decode_launch_config)
from hybrid_engine.kernels.kv_store import store_kv_ref
from hybrid_engine.kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton

# (query heads, kv heads): GQA ratios 1, 4, 8
HEADS = [(4, 4), (8, 2), (8, 1)]


def paged_case(device, dtype, block_size, num_q_heads, num_kv_heads, head_dim, seq_lens, seed=0):
    """A shuffled block pool where unused pool entries and table tails hold poison-free random junk."""
    batch = len(seq_lens)
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 1  # one spare column, like a graph's fixed width
    num_blocks = batch * max_blocks + 2
    k_cache = rand(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device, seed=seed + 1)
    v_cache = rand(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed)
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    q = rand(batch, num_q_heads, head_dim, dtype=dtype, device=device, seed=seed + 3)
    return (q, k_cache, v_cache, block_tables.to(device=device, dtype=torch.int32),
            torch.tensor(seq_lens, device=device, dtype=torch.int32))


def decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale):
    return decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens, scale)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_decode_attention(device_dtype, block_size, head_dim, num_q_heads, num_kv_heads):
    device, dtype = device_dtype
    seq_lens = [1, 45] if device == "cpu" else [1, 45, 700, 2048]
    args = paged_case(device, dtype, block_size, num_q_heads, num_kv_heads, head_dim, seq_lens)
    scale = head_dim ** -0.5
    assert_close(decode_attention_triton(*args, scale), decode_reference(*args, scale), dtype, "decode")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_split_counts_agree(num_splits):
    """Any split count gives the same answer, including splits that get no tokens (seq_len 1)."""
    args = paged_case("cpu", torch.float32, 16, 4, 2, 64, [1, 33])
    want = decode_reference(*args, 0.125)
    assert_close(decode_attention_triton(*args, 0.125, num_splits=num_splits), want, torch.float32, "splits")


def test_decode_launch_depends_only_on_shapes():
    """Graph safety: the split count comes from (kv heads, max_blocks), never from seq_lens values or the batch."""
    cfg = decode_launch_config(32, 256, 16, torch.device("cpu"))
    assert cfg == decode_launch_config(32, 256, 16, torch.device("cpu"))
    assert cfg[0] >= 1 and cfg[2] >= 0


@pytest.mark.parametrize("num_splits,single_split", [(4, 32), (3, 1000)])
def test_decode_attention_single_split_up_to_a_length(num_splits, single_split):
    """A sequence of at most single_split keys runs as one split (no merge), longer ones split: the same answer."""
    args = paged_case("cpu", torch.float32, 16, 8, 2, 64, [1, 20, 32, 33, 47, 100], seed=7)
    want = decode_reference(*args, 0.125)
    plain = decode_attention_triton(*args, 0.125, num_splits=num_splits, single_split=single_split, prefetch=False)
    assert_close(plain, want, torch.float32, "single split")
    prefetched = decode_attention_triton(*args, 0.125, num_splits=num_splits, single_split=single_split, prefetch=True)
    assert torch.equal(prefetched, plain)  # the next block loaded early: same arithmetic, same order


def test_decode_merge_walks_splits_in_chunks():
    """A GQA group of 8 heads of dim 128 merges 4 splits per load: 5 active splits take two loads."""
    from hybrid_engine.kernels.decode_attention import MERGE_ELEMENTS

    assert MERGE_ELEMENTS // (8 * 128) < 5
    args = paged_case("cpu", torch.float32, 16, 8, 1, 128, [80, 33, 1], seed=9)
    assert_close(decode_attention_triton(*args, 0.125, num_splits=5), decode_reference(*args, 0.125),
                 torch.float32, "chunked merge")


@pytest.mark.parametrize("single_split,prefetch", [(16, False), (48, True)])
def test_single_split_rule_keeps_rows_batch_invariant(single_split, prefetch):
    """With sequences on both sides of the single-split length (one program, or splits and a merge), each row is
    bit-identical alone and in the batch: the rule reads only the row's own length."""
    q, kc, vc, tables, lens = paged_case("cpu", torch.float32, 16, 8, 2, 64, [47, 5, 90, 1, 48, 49], seed=11)
    kw = dict(num_splits=3, single_split=single_split, prefetch=prefetch)
    batched = decode_attention_triton(q, kc, vc, tables, lens, 0.125, **kw)
    assert_close(batched, decode_reference(q, kc, vc, tables, lens, 0.125), torch.float32, "single-split rule")
    for i in range(q.shape[0]):
        alone = decode_attention_triton(q[i:i + 1], kc, vc, tables[i:i + 1], lens[i:i + 1], 0.125, **kw)
        assert torch.equal(alone, batched[i:i + 1]), i


@pytest.mark.parametrize("attention", [decode_attention_triton, decode_attention_ref])
def test_decode_attention_is_batch_invariant(attention):
    """A sequence's output is bit-identical alone and in a batch with other lengths (fixed reduction order)."""
    q, kc, vc, tables, lens = paged_case("cpu", torch.float32, 16, 8, 2, 64, [37, 5, 90, 1, 64], seed=3)
    batched = attention(q, kc, vc, tables, lens, 0.125)
    for i in range(q.shape[0]):
        alone = attention(q[i:i + 1], kc, vc, tables[i:i + 1], lens[i:i + 1], 0.125)
        assert torch.equal(alone, batched[i:i + 1]), i


def test_decode_matches_prefill_last_row():
    """Store a prompt's k/v, decode its last token: equals causal prefill's last row."""
    tokens, hq, hkv, dim, bs = 21, 8, 2, 64, 16
    q = torch.randn(tokens, hq, dim)
    k, v = torch.randn(tokens, hkv, dim), torch.randn(tokens, hkv, dim)
    kc, vc = torch.zeros(4, bs, hkv, dim), torch.zeros(4, bs, hkv, dim)
    table = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    slots = torch.tensor([int(table[0, t // bs]) * bs + t % bs for t in range(tokens)])
    store_kv_ref(k, v, kc, vc, slots)
    full = prefill_attention_ref(q, k, v, 0.125)
    got = decode_attention_triton(q[-1:].contiguous(), kc, vc, table, torch.tensor([tokens], dtype=torch.int32),
                                  0.125)
    assert_close(got, full[-1:], torch.float32, "decode vs prefill")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("tokens", [1, 19])
def test_prefill_attention(device_dtype, head_dim, num_q_heads, num_kv_heads, tokens):
    device, dtype = device_dtype
    if device == "cuda":
        tokens = {1: 1, 19: 333}[tokens]
    q = rand(tokens, num_q_heads, head_dim, dtype=dtype, device=device, seed=1)
    k = rand(tokens, num_kv_heads, head_dim, dtype=dtype, device=device, seed=2)
    v = rand(tokens, num_kv_heads, head_dim, dtype=dtype, device=device, seed=3)
    scale = head_dim ** -0.5
    want = prefill_attention_ref(q.float(), k.float(), v.float(), scale)
    assert_close(prefill_attention_triton(q, k, v, scale), want, dtype, "prefill")


@pytest.mark.parametrize("valid", [1, 13, 32])
def test_prefill_attention_padded_bucket(valid):
    """A padded bucket of 32 with the real length in a device tensor: real rows exact, padded rows finite."""
    bucket, hq, hkv, dim = 32, 4, 1, 64
    q, k, v = torch.randn(bucket, hq, dim), torch.randn(bucket, hkv, dim), torch.randn(bucket, hkv, dim)
    got = prefill_attention_triton(q, k, v, 0.125, torch.tensor([valid], dtype=torch.int32))
    want = prefill_attention_ref(q[:valid], k[:valid], v[:valid], 0.125)
    assert_close(got[:valid], want, torch.float32, "real rows")
    assert torch.isfinite(got).all()


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("tokens", [10, 100, 500])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["triton", "sdpa", "xformers"])
def test_prefill_backends_gpu(tokens, dtype, case):
    """Each prefill backend (xformers where installed) against the fp32 reference, LLaMA-2-7B head shape."""
    if case == "xformers":
        pytest.importorskip("xformers.ops")
    from hybrid_engine.kernels import get_ops

    ops = get_ops("cuda", case)
    q = rand(tokens, 32, 128, dtype=dtype, device="cuda", seed=1)  # GQA 4
    k = rand(tokens, 8, 128, dtype=dtype, device="cuda", seed=2)
    v = rand(tokens, 8, 128, dtype=dtype, device="cuda", seed=3)
    want = prefill_attention_ref(q.float(), k.float(), v.float(), 128 ** -0.5)
    assert_close(ops.prefill_attention(q, k, v, 128 ** -0.5), want, dtype, case)



@pytest.mark.parametrize("tokens,valid,num_q_heads,num_kv_heads,head_dim", [
    (21, 21, 4, 2, 32), (33, 29, 4, 4, 32), (7, 3, 6, 2, 64), (1, 1, 2, 1, 32), (9, 6, 4, 2, 16)])
def test_prefill_attention_rope_fused(device_dtype, tokens, valid, num_q_heads, num_kv_heads, head_dim):
    """One launch = rope + KV-cache store + causal attention: output and both caches equal the unfused reference,
    padding rows (slot -1) write nothing, q/k views of one fused qkv buffer (strided rows) work. head_dim 16 takes
    the unfused fallback (tl.dot needs 16 columns per rotated half)."""
    from hybrid_engine.kernels.prefill_attention import prefill_attention_rope_ref, prefill_attention_rope_triton

    device, dtype = device_dtype
    qkv = rand(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device, seed=7)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split(
        [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))
    positions = torch.arange(tokens, device=device) + 3
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.arange(64).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1).to(device)
    block_size, blocks = 8, 8
    slots = torch.randperm(blocks * block_size, generator=torch.Generator().manual_seed(3))[:tokens].to(device)
    slots[valid:] = -1
    valid_len = torch.tensor([valid], dtype=torch.int32, device=device)
    caches = [torch.zeros(blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(4)]
    got = prefill_attention_rope_triton(q.clone(), k.clone(), v, positions, cos_sin, caches[0], caches[1], slots,
                                        head_dim ** -0.5, valid_len)
    want = prefill_attention_rope_ref(q.float().clone(), k.float().clone(), v.float(), positions, cos_sin,
                                      caches[2], caches[3], slots, head_dim ** -0.5, valid_len)
    assert_close(got[:valid], want[:valid], dtype, "fused prefill output")
    assert_close(caches[0], caches[2], dtype, "k cache")
    assert_close(caches[1], caches[3], dtype, "v cache")
    assert torch.isfinite(got).all()


def test_decode_splits_merge_in_one_launch_and_leave_the_counters_at_zero():
    """Several splits merged by the last-arriving program of each (sequence, kv head): right for every active count
    (1: stored directly; 2, 3: merged), GQA groups included, again on a second call through the same reused
    workspace (the merger resets the counters)."""
    from hybrid_engine.kernels import _workspace

    _workspace.clear_split_buffers()
    args = paged_case("cpu", torch.float32, 16, 8, 2, 64, [1, 20, 33, 47], seed=5)
    want = decode_reference(*args, 0.125)
    for _ in range(2):
        assert_close(decode_attention_triton(*args, 0.125, num_splits=3), want, torch.float32, "fused merge")
    (key,) = [k for k in _workspace._SPLIT_BUFFERS if "decode_attention" in k]
    assert int(_workspace._SPLIT_BUFFERS[key][1].abs().sum()) == 0
