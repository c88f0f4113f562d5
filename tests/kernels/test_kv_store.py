"""KV store: each token to its flat slot, -1 writes nothing, every other slot untouched."""
import pytest
import torch
from kernel_helpers import assert_close, rand

from hybrid_engine.kernels.kv_store import store_kv_ref, store_kv_triton

POISON = 123.0


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 128), (8, 64)])
def test_store_kv(device_dtype, block_size, num_kv_heads, head_dim):
    device, dtype = device_dtype
    num_blocks, tokens = 5, 7
    k = rand(tokens, num_kv_heads, head_dim, dtype=dtype, device=device, seed=1)
    v = rand(tokens, num_kv_heads, head_dim, dtype=dtype, device=device, seed=2)
    slots = torch.tensor([3, block_size, -1, 4 * block_size + block_size - 1, 2, -1, 2 * block_size + 5],
                         device=device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, POISON, dtype=dtype, device=device)
    v_cache = torch.full(shape, POISON, dtype=dtype, device=device)
    want_k = torch.full(shape, POISON)
    want_v = torch.full(shape, POISON)
    store_kv_ref(k.float().cpu(), v.float().cpu(), want_k, want_v, slots.cpu())
    store_kv_triton(k, v, k_cache, v_cache, slots)
    assert_close(k_cache, want_k, dtype, "k_cache")
    assert_close(v_cache, want_v, dtype, "v_cache")
    written = (want_k != POISON).any(-1).any(-1).sum().item()
    assert written == 5  # two padding tokens wrote nothing


def test_store_kv_int32_slots_and_views():
    """slot_mapping may be int32, k/v may be views into a fused qkv output."""
    tokens, hkv, dim, bs = 4, 2, 64, 16
    qkv = torch.randn(tokens, (4 + 2 * hkv) * dim)
    k = qkv[:, 4 * dim:(4 + hkv) * dim].view(tokens, hkv, dim)
    v = qkv[:, (4 + hkv) * dim:].view(tokens, hkv, dim)
    slots = torch.tensor([0, 17, -1, 31], dtype=torch.int32)
    kc, vc = torch.zeros(2, bs, hkv, dim), torch.zeros(2, bs, hkv, dim)
    kc2, vc2 = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc, vc, slots)
    store_kv_triton(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
