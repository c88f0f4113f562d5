"""Attention of new prompt tokens after cached positions (prefix-cache hits, prompt chunks), read from the paged
cache: the Triton kernel against the torch reference, and both against plain causal attention over the whole prompt."""
import pytest
import torch
from kernel_helpers import assert_close, rand

from hybrid_engine.kernels.kv_store import store_kv_ref
from hybrid_engine.kernels.prefill_attention import (cached_prefill_attention_ref, cached_prefill_attention_triton,
                                                     prefill_attention_ref)


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
    whole = prefill_attention_ref(q_all, k, v, head_dim ** -0.5)[start:start + valid]
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
