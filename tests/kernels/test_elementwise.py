"""RMSNorm(+residual), RoPE, SiLU*mul: Triton vs fp32 torch reference."""
import pytest
import torch
from kernel_helpers import assert_close, rand

from hybrid_engine.kernels.activation import silu_mul_ref, silu_mul_triton
from hybrid_engine.kernels.rms_norm import rms_norm_ref, rms_norm_triton
from hybrid_engine.kernels.rope import rope_ref, rope_triton


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 100), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device_dtype, tokens, hidden, with_residual):
    device, dtype = device_dtype
    x = rand(tokens, hidden, dtype=dtype, device=device, seed=1)
    weight = rand(hidden, dtype=dtype, device=device, seed=2)
    residual = rand(tokens, hidden, dtype=dtype, device=device, seed=3) if with_residual else None
    got = rms_norm_triton(x, weight, 1e-6, residual)
    want = rms_norm_ref(x.float(), weight.float(), 1e-6, None if residual is None else residual.float())
    if with_residual:
        assert_close(got[0], want[0], dtype, "rms_norm out")
        assert_close(got[1], want[1], dtype, "rms_norm new residual")
        assert got[1].dtype == dtype
    else:
        assert_close(got, want, dtype, "rms_norm")
        assert got.dtype == dtype


def test_rms_norm_matches_hf_numerics():
    """fp32 statistics, weight applied after casting back (HF LlamaRMSNorm), checked in bf16 on the reference."""
    x = torch.randn(5, 32).to(torch.bfloat16)
    w = torch.randn(32).to(torch.bfloat16)
    xf = x.float()
    hf = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(rms_norm_ref(x, w, 1e-5), hf)


def test_rms_norm_strided_input():
    x = torch.randn(6, 96)[:, :48]  # row stride 96
    w = torch.randn(48)
    assert_close(rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), torch.float32)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (8, 1, 64)])
def test_rope(device_dtype, num_q_heads, num_kv_heads, head_dim):
    device, dtype = device_dtype
    tokens, max_pos = 5, 40
    q = rand(tokens, num_q_heads, head_dim, dtype=dtype, device=device, seed=4)
    k = rand(tokens, num_kv_heads, head_dim, dtype=dtype, device=device, seed=5)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
    positions = torch.tensor([0, 39, 7, 7, 13], device=device)
    want_q, want_k = rope_ref(q.float().clone(), k.float().clone(), positions, cache)
    q_in, k_in = q.clone(), k.clone()
    got_q, got_k = rope_triton(q_in, k_in, positions, cache)
    assert got_q.data_ptr() == q_in.data_ptr() and got_k.data_ptr() == k_in.data_ptr()  # in place
    assert_close(got_q, want_q, dtype, "rope q")
    assert_close(got_k, want_k, dtype, "rope k")


def test_rope_matches_hf_rotate_half():
    tokens, heads, dim = 4, 2, 16
    q, k = torch.randn(tokens, heads, dim), torch.randn(tokens, heads, dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.tensor([3, 0, 9, 1])
    freqs = torch.outer(torch.arange(16).float(), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    emb = torch.cat((freqs[pos], freqs[pos]), dim=-1)[:, None, :]

    def rotate_half(x):
        return torch.cat((-x[..., dim // 2:], x[..., : dim // 2]), dim=-1)

    want_q = q * emb.cos() + rotate_half(q) * emb.sin()
    got_q, _ = rope_ref(q.clone(), k.clone(), pos, cache)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)


def test_rope_on_views_of_fused_qkv():
    tokens, hq, hkv, dim = 3, 4, 2, 64
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)
    k = qkv[:, hq * dim: (hq + hkv) * dim].view(tokens, hkv, dim)
    cache = torch.randn(8, dim)
    pos = torch.tensor([1, 2, 5])
    want_q, want_k = rope_ref(q.clone(), k.clone(), pos, cache)
    v_before = qkv[:, (hq + hkv) * dim:].clone()
    rope_triton(q, k, pos, cache)
    assert_close(q, want_q, torch.float32, "q view")
    assert_close(k, want_k, torch.float32, "k view")
    assert torch.equal(qkv[:, (hq + hkv) * dim:], v_before)  # v untouched


@pytest.mark.parametrize("tokens,inter", [(1, 64), (5, 37), (2, 1500)])
def test_silu_mul(device_dtype, tokens, inter):
    device, dtype = device_dtype
    x = rand(tokens, 2 * inter, dtype=dtype, device=device, seed=6, scale=3.0)
    assert_close(silu_mul_triton(x), silu_mul_ref(x.float()), dtype, "silu_mul")
