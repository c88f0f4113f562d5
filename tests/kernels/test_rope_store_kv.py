"""Fused RoPE + KV store vs rope_ref followed by store_kv_ref (views of a fused qkv output, padding slots)."""
import pytest
import torch
from kernel_helpers import assert_close, rand

from hybrid_engine.kernels.rope import rope_store_kv_ref, rope_store_kv_triton

POISON = 123.0


def _cache(max_pos, rot, device):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.arange(max_pos).float()[:, None] * inv[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,rot", [(4, 4, 64, 64), (8, 2, 32, 32), (6, 3, 64, 32),
                                                                     (32, 32, 128, 128)])
def test_rope_store_kv(device_dtype, tokens, num_q_heads, num_kv_heads, head_dim, rot):
    device, dtype = device_dtype
    block_size, num_blocks = 16, 4
    hq, hk = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = rand(tokens, hq + 2 * hk, dtype=dtype, device=device, seed=tokens)
    positions = torch.tensor([3, 17, 0, 40, 9][:tokens], device=device)
    slots = torch.tensor([5, 16, -1, 63, 2][:tokens], device=device)
    cos_sin = _cache(64, rot, device).to(dtype if dtype != torch.float16 else torch.float32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)

    def split(t):
        q, k, v = t.split([hq, hk, hk], dim=-1)
        return (q.view(tokens, num_q_heads, head_dim), k.view(tokens, num_kv_heads, head_dim),
                v.view(tokens, num_kv_heads, head_dim))

    want_qkv = qkv.float().cpu().clone()
    wq, wk, wv = split(want_qkv)
    want_kc, want_vc = torch.full(shape, POISON), torch.full(shape, POISON)
    rope_store_kv_ref(wq, wk, wv, positions.cpu(), cos_sin.float().cpu(), want_kc, want_vc, slots.cpu())

    q, k, v = split(qkv)
    kc = torch.full(shape, POISON, dtype=dtype, device=device)
    vc = torch.full(shape, POISON, dtype=dtype, device=device)
    q2, k2 = rope_store_kv_triton(q, k, v, positions, cos_sin, kc, vc, slots)
    assert q2.data_ptr() == q.data_ptr() and k2.data_ptr() == k.data_ptr()
    assert_close(qkv, want_qkv, dtype, "q/k in place, v untouched")
    assert_close(kc, want_kc, dtype, "k_cache")
    assert_close(vc, want_vc, dtype, "v_cache")
    written = (want_kc != POISON).any(-1).any(-1).sum().item()
    assert written == tokens - (1 if tokens > 2 else 0)
