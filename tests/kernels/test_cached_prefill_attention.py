"""Attention of new prompt tokens after cached positions (prefix-cache hits, prompt chunks), read from the paged
cache: the Triton kernel against the torch reference, and both against plain causal attention over the whole prompt;
the keys split across programs (SPLITS) and merged deterministically; the host rule that picks the config."""
import pytest
import torch
from kernel_helpers import GPU, assert_close, rand

from hybrid_engine.kernels import cached_prefill_attention as cpa
from hybrid_engine.kernels.cached_prefill_attention import (cached_config, cached_prefill_attention_ref,
                                                            cached_prefill_attention_triton)
from hybrid_engine.kernels.kv_store import store_kv_ref
from hybrid_engine.kernels.prefill_attention import prefill_attention_ref


def _paged(total, num_kv_heads, head_dim, block_size, dtype, device, seed):
    """K/V of `total` positions scattered over shuffled blocks of a paged cache with spare blocks; the block table
    is padded with a block that holds garbage (never read)."""
    blocks = -(-total // block_size)
    num_blocks = blocks + 3
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(num_blocks, generator=g)[:blocks + 2].to(torch.int32)
    k = rand(total, num_kv_heads, head_dim, dtype=torch.float32, device="cpu", seed=seed)
    v = rand(total, num_kv_heads, head_dim, dtype=torch.float32, device="cpu", seed=seed + 1)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, 7.0), torch.full(shape, -7.0)
    pos = torch.arange(total)
    store_kv_ref(k, v, k_cache, v_cache, table.long()[pos // block_size] * block_size + pos % block_size)
    to = dict(dtype=dtype, device=device)
    return k, v, k_cache.to(**to), v_cache.to(**to), table.to(device)


@pytest.mark.parametrize("start,n,valid", [(16, 1, 1), (37, 11, 11), (5, 33, 29), (480, 20, 20), (0, 17, 17)])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,block_size", [(4, 2, 64, 16), (3, 1, 40, 8)])
def test_cached_prefill_attention(device_dtype, start, n, valid, num_q_heads, num_kv_heads, head_dim, block_size):
    device, dtype = device_dtype
    total = start + valid
    k, v, k_cache, v_cache, table = _paged(total, num_kv_heads, head_dim, block_size, dtype, device, seed=start + n)
    q_all = rand(total, num_q_heads, head_dim, dtype=torch.float32, device="cpu", seed=3)
    # the references read the cache, which holds k and v rounded to its dtype: so does plain attention here
    k_held, v_held = k.to(dtype).float(), v.to(dtype).float()
    whole = prefill_attention_ref(q_all, k_held, v_held, head_dim ** -0.5)[start:start + valid]
    q = torch.zeros(n, num_q_heads, head_dim)
    q[:valid] = q_all[start:]
    start_t = torch.tensor([start], dtype=torch.int32)
    valid_t = torch.tensor([valid], dtype=torch.int32)
    ref_int = cached_prefill_attention_ref(q[:valid], k_cache.float().cpu(), v_cache.float().cpu(), table.cpu(),
                                           start, head_dim ** -0.5)
    ref_t = cached_prefill_attention_ref(q, k_cache.float().cpu(), v_cache.float().cpu(), table.cpu(), start_t,
                                         head_dim ** -0.5, valid_t)
    torch.testing.assert_close(ref_int, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_t[:valid], whole, rtol=1e-5, atol=1e-5)
    out = cached_prefill_attention_triton(q.to(device=device, dtype=dtype), k_cache, v_cache, table,
                                          start_t.to(device), head_dim ** -0.5, valid_t.to(device))
    assert_close(out[:valid], whole, dtype, "cached prefill attention")
    if valid < n:  # padding rows of a bucket: finite (whatever they hold, nothing reads them)
        assert torch.isfinite(out.float()).all()


def _split_case(device, dtype, start, n, num_q_heads, num_kv_heads, head_dim, block_size):
    """q of n new rows after `start` cached positions over a paged cache of random blocks with room to spare (the
    table reaches past the context, as the engine's does), and the fp32 reference."""
    capacity = start + n + 2 * block_size
    num_blocks = -(-capacity // block_size) + 2
    g = torch.Generator().manual_seed(start * 31 + n)
    table = torch.randperm(num_blocks, generator=g)[:num_blocks - 2].to(torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = rand(*shape, dtype=torch.float32, device="cpu", seed=start + n)
    v_cache = rand(*shape, dtype=torch.float32, device="cpu", seed=start + n + 1)
    q = rand(n, num_q_heads, head_dim, dtype=torch.float32, device="cpu", seed=n)
    ref = cached_prefill_attention_ref(q, k_cache, v_cache, table, start, head_dim ** -0.5)
    to = dict(dtype=dtype, device=device)
    return q.to(**to), k_cache.to(**to), v_cache.to(**to), table.to(device), ref


@pytest.mark.parametrize("start", [0, 7, 33, 100])
@pytest.mark.parametrize("n", [1, 5, 19])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,block_size",
                         [(4, 2, 24, 8), (2, 2, 16, 16), (2, 1, 16, 32)])
def test_split_keys_match_reference_and_each_other(device_dtype, start, n, num_q_heads, num_kv_heads, head_dim,
                                                   block_size):
    """SPLITS 1, 2, 3 against the reference (padding rows past valid_len finite), with each other, and a repeat
    call bitwise equal (the arrival counters are back at zero after each call, and the merge order is fixed).
    Cache blocks of 32 tokens hold two 16-key blocks: a key block starting inside a cache block."""
    device, dtype = device_dtype
    q, k_cache, v_cache, table, ref = _split_case(device, dtype, start, n, num_q_heads, num_kv_heads, head_dim,
                                                  block_size)
    valid = max(1, n - 3)
    start_t = torch.tensor([start], dtype=torch.int32, device=device)
    valid_t = torch.tensor([valid], dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    outs = {}
    for splits in (1, 2, 3):
        config = (16, 16, 4, 2, splits)
        out = cached_prefill_attention_triton(q, k_cache, v_cache, table, start_t, scale, valid_t, config=config)
        assert_close(out[:valid], ref[:valid], dtype, f"SPLITS={splits}")
        assert torch.isfinite(out.float()).all(), f"SPLITS={splits}: padding rows not finite"
        again = cached_prefill_attention_triton(q, k_cache, v_cache, table, start_t, scale, valid_t, config=config)
        assert torch.equal(out, again), f"SPLITS={splits}: a repeat call differs"
        outs[splits] = out[:valid].float()
    for splits in (2, 3):
        assert_close(outs[splits], outs[1], dtype, f"SPLITS={splits} vs 1")
    from_int = cached_prefill_attention_triton(q, k_cache, v_cache, table, start, scale, config=(16, 16, 4, 2, 3))
    assert_close(from_int, ref, dtype, "host int start")


@pytest.mark.parametrize("start,min_keys", [(7, 64), (100, 48), (100, 16), (0, 1000)])
def test_min_split_keys_leaves_later_splits_empty(device_dtype, start, min_keys):
    """A split walks at least `min_split_keys` keys: with one split active its program stores the output itself
    (no merge), with several the merge reads only the active ones. Every case matches the reference and repeats
    bitwise (the arrival counters stay balanced whichever path a call takes)."""
    device, dtype = device_dtype
    n, valid = 19, 17
    q, k_cache, v_cache, table, ref = _split_case(device, dtype, start, n, 4, 2, 24, 8)
    start_t = torch.tensor([start], dtype=torch.int32, device=device)
    valid_t = torch.tensor([valid], dtype=torch.int32, device=device)
    outs = []
    for _ in range(2):
        out = cached_prefill_attention_triton(q, k_cache, v_cache, table, start_t, 24 ** -0.5, valid_t,
                                              config=(16, 16, 4, 2, 4), min_split_keys=min_keys)
        assert_close(out[:valid], ref[:valid], dtype, f"start {start}, min_split_keys {min_keys}")
        assert torch.isfinite(out.float()).all()
        outs.append(out)
    assert torch.equal(outs[0], outs[1]), "a repeat call differs"
    with pytest.raises(ValueError, match="min_split_keys=-1"):
        cached_prefill_attention_triton(q, k_cache, v_cache, table, start_t, 1.0, config=(16, 16, 4, 2, 4),
                                        min_split_keys=-1)


def test_config_rule_scales_splits_and_stays_within_the_table(monkeypatch):
    """On the GPU the table's SPLITS hold for 32 heads on 132 SMs, grow for fewer heads or more SMs, and never
    exceed the blocks of keys the block table can hold; the CPU gets the interpreter's small config."""
    monkeypatch.setattr(cpa, "sm_count", lambda device: cpa.TUNED_SMS)
    monkeypatch.setattr(cpa, "tuned_configs", lambda *args: [])  # an untuned card
    cuda = torch.device("cuda")
    for max_t, cfg in cpa.CACHED_CONFIGS:
        t = min(max_t, 4096)
        assert cached_config(t, 1 << 20, cpa.TUNED_HEADS, cuda) == cfg
        assert cached_config(t, 1 << 20, cpa.TUNED_HEADS // 4, cuda)[4] == min(4 * cfg[4], cpa.MAX_SPLITS)
        assert cached_config(t, cfg[1], cpa.TUNED_HEADS, cuda)[4] == 1  # one BLOCK_N of keys: nothing to split
    monkeypatch.setattr(cpa, "sm_count", lambda device: 2 * cpa.TUNED_SMS)
    assert cached_config(144, 1 << 20, cpa.TUNED_HEADS, cuda)[4] == 2 * cached_config(144, 1 << 20, 64, cuda)[4]
    assert cached_config(144, 4096, 32, torch.device("cpu")) == cpa.CPU_CACHED_CONFIG


def test_a_tuned_card_uses_its_measured_configs(monkeypatch):
    """Entries measured on this card (kernels/tuning.py) for these heads win: the one for the smallest measured
    token count >= the new tokens, else the largest, with SPLITS scaled so that the grid keeps the measured
    programs for fewer or more query tiles; SPLITS still stays within the block table."""
    table = {"32,32,128,float16": [16, 128, 4, 3, 2], "144,32,128,float16": [64, 32, 4, 2, 4],
             "144,8,128,float16": [32, 32, 4, 2, 8]}
    monkeypatch.setattr(cpa.tuning, "entries", lambda family, device: table if family == "cached_attention" else {})
    cpa.tuned_configs.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert cpa.tuned_configs(32, 128, torch.float16, cuda) == [(32, (16, 128, 4, 3, 2)), (144, (64, 32, 4, 2, 4))]
        assert cached_config(20, 1 << 20, 32, cuda) == (16, 128, 4, 3, 2)
        assert cached_config(144, 1 << 20, 32, cuda) == (64, 32, 4, 2, 4)  # as measured
        assert cached_config(130, 1 << 20, 32, cuda) == (64, 32, 4, 2, 4)  # the same 3 query tiles of 64
        assert cached_config(100, 1 << 20, 32, cuda) == (64, 32, 4, 2, 6)  # 2 tiles: 2 x 6 programs as 3 x 4
        assert cached_config(64, 1 << 20, 32, cuda) == (64, 32, 4, 2, 12)
        assert cached_config(500, 1 << 20, 32, cuda) == (64, 32, 4, 2, 2)  # past the largest measured: 8 tiles
        assert cached_config(100, 64, 32, cuda)[4] == 2  # 64 positions of keys hold two BLOCK_N=32 blocks
        assert cached_config(100, 1 << 20, 8, cuda) == (32, 32, 4, 2, 10)  # 4 tiles of 32 rows, 5 measured
    finally:
        cpa.tuned_configs.cache_clear()


@pytest.mark.parametrize("config", [(16, 16, 4, 2, 0), (24, 16, 4, 2, 2), (16, 16, 3, 2, 2), (16, 16, 4, 2)])
def test_bad_config_is_a_value_error(config):
    q = torch.zeros(3, 2, 16)
    cache = torch.zeros(4, 8, 2, 16)
    with pytest.raises(ValueError):
        cached_prefill_attention_triton(q, cache, cache, torch.arange(4, dtype=torch.int32), 0, 0.25, config=config)


@pytest.mark.parametrize("splits", [None, 4])
@GPU[0]
@GPU[1]
def test_graph_replays_serve_every_start(splits):
    """One captured graph (LLaMA-shaped heads, fp16, 144 new tokens, a 2,048-position table) replayed for starts 0
    to 1,900 matches the reference each time. Captured the engine's way (`capture_graph`): warmed up with the split
    buffers reserved, then captured on the warm-up's stream."""
    from hybrid_engine.kernels._workspace import capture_graph

    device, dtype, n, heads, dim = "cuda", torch.float16, 144, 32, 128
    q, k_cache, v_cache, table, _ = _split_case(device, dtype, 1900, n, heads, heads, dim, 16)
    start_t = torch.zeros(1, dtype=torch.int32, device=device)
    valid_t = torch.tensor([130], dtype=torch.int32, device=device)
    config = None if splits is None else (64, 64, 4, 2, splits)
    graph, out = capture_graph(lambda: cached_prefill_attention_triton(q, k_cache, v_cache, table, start_t,
                                                                       dim ** -0.5, valid_t, config=config))
    for start in (0, 480, 1000, 1900, 1000):
        start_t.fill_(start)
        graph.replay()
        ref = cached_prefill_attention_ref(q[:130].float(), k_cache.float(), v_cache.float(), table, start,
                                           dim ** -0.5)
        assert_close(out[:130], ref, dtype, f"replay at start {start}")
