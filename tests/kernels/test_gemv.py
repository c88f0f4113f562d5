"""Triton GEMV (M=1 projections) vs the fp32 reference: odd sizes, bias, fused silu_mul, dispatch of `linear`."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import GPU, assert_close, assert_replays_like_ref, rand

from hybrid_engine.kernels import gemv
from hybrid_engine.kernels.activation import silu_mul_ref
from hybrid_engine.kernels.gemv import (gemv_rope_store_triton, gemv_silu_triton, gemv_triton, linear_ref,
                                        linear_rope_store_ref, linear_silu_mul_ref, silu_mul_linear_ref)

CONFIGS = [(4, 32, 1, 1), (8, 64, 2, 1), (16, 16, 1, 2)]


@pytest.fixture(autouse=True)
def _fresh_config_lookups():
    """gemv.config_for caches its answers: tests that change the tables start and end with an empty cache."""
    gemv.config_for.cache_clear()
    gemv.norm_config_for.cache_clear()
    yield
    gemv.config_for.cache_clear()
    gemv.norm_config_for.cache_clear()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n,k", [(1, 1), (13, 37), (40, 96), (7, 130)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv(device_dtype, config, n, k, with_bias):
    device, dtype = device_dtype
    x = rand(1, k, dtype=dtype, device=device, seed=1)
    w = rand(n, k, dtype=dtype, device=device, seed=2, scale=0.2)
    b = rand(n, dtype=dtype, device=device, seed=3) if with_bias else None
    out = gemv_triton(x, w, b, config)
    assert out.shape == (1, n) and out.dtype == dtype
    assert_close(out, linear_ref(x.float(), w.float(), None if b is None else b.float()), dtype, "gemv")


@pytest.mark.parametrize("config", CONFIGS[:2])
@pytest.mark.parametrize("n,k", [(5, 3), (24, 100)])
def test_gemv_silu_mul(device_dtype, config, n, k):
    device, dtype = device_dtype
    h = rand(1, 2 * k, dtype=dtype, device=device, seed=4)
    w = rand(n, k, dtype=dtype, device=device, seed=5, scale=0.2)
    out = gemv_triton(h, w, None, config, silu_mul=True)
    assert_close(out, silu_mul_linear_ref(h.float(), w.float()), dtype, "silu_mul gemv")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("i,k", [(1, 1), (13, 37), (20, 96), (7, 130)])
def test_gemv_silu_epilogue(device_dtype, config, i, k):
    """Gate/up GEMV with SiLU-mul in the epilogue: odd sizes, a last program with fewer rows than BLOCK_N; equal to
    the unfused GEMV + SiLU-mul it replaces (same rounding of each half) up to fp32 rounding of the SiLU."""
    device, dtype = device_dtype
    x = rand(1, k, dtype=dtype, device=device, seed=6)
    w = rand(2 * i, k, dtype=dtype, device=device, seed=7, scale=0.3)
    out = gemv_silu_triton(x, w, config)
    assert out.shape == (1, i) and out.dtype == dtype
    assert_close(out, linear_silu_mul_ref(x.float(), w.float()), dtype, "gemv silu epilogue")
    unfused = silu_mul_ref(gemv_triton(x, w, None, config).float()).to(dtype)
    torch.testing.assert_close(out, unfused, rtol=1e-5, atol=1e-6)


def test_linear_silu_mul_dispatch(monkeypatch):
    """The fused kernel runs only for a one-row CUDA fp16/bf16 input whose shape the table does not mark None (an
    unlisted shape gets the derived config); elsewhere None, and the model composes its own linear and silu_mul."""
    x, w = torch.randn(1, 16), torch.randn(10, 16)
    monkeypatch.setitem(gemv.GATE_UP_SILU_CONFIGS, (10, 16), gemv.DEFAULT_CONFIG)
    assert gemv.linear_silu_mul(x, w) is None  # CPU
    if torch.cuda.is_available():
        xc, wc = x.cuda().half(), w.cuda().half()
        assert gemv.linear_silu_mul(xc, wc) is not None
        assert gemv.linear_silu_mul(xc.repeat(2, 1), wc) is None  # two rows
        assert gemv.linear_silu_mul(xc, wc[:9]) is None  # odd row count: not a gate/up pair
        monkeypatch.setitem(gemv.GATE_UP_SILU_CONFIGS, (10, 16), None)
        gemv.config_for.cache_clear()
        assert gemv.linear_silu_mul(xc, wc) is None  # the table says the unfused pair measured faster


def test_model_takes_the_fused_gate_up_silu_only_where_it_applies():
    """LlamaModel calls ops.linear_silu_mul for the MLP input; None keeps its own linear + silu_mul (same tokens),
    a tensor is used as the activation (a decoy of zeros changes the tokens)."""
    from hybrid_engine import LLM, SamplingParams

    llm = LLM("tiny-llama", capture="off")
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def tokens():
        return llm.generate({"prompt_token_ids": [5, 9, 14, 3, 7]}, sp)[0].outputs[0].token_ids

    base, calls = tokens(), []
    llm.model.ops = replace(llm.ops, linear_silu_mul=lambda x, w: calls.append(tuple(x.shape)) or None)
    assert tokens() == base and (1, llm.model.args.hidden_size) in calls
    zeros = lambda x, w: torch.zeros(*x.shape[:-1], w.shape[0] // 2, dtype=x.dtype)  # noqa: E731
    llm.model.ops = replace(llm.ops, linear_silu_mul=zeros)
    assert tokens() != base


def _rope_case(device, dtype, hq, hkv, d, k, bias, slot, pos=5, seed=0):
    """Inputs of one decode token's QKV + rope + KV store: (args, k_cache, v_cache) with NaN-filled caches."""
    n = (hq + 2 * hkv) * d
    x = rand(1, k, dtype=dtype, device=device, seed=seed + 1)
    w = rand(n, k, dtype=dtype, device=device, seed=seed + 2, scale=0.2)
    b = rand(n, dtype=dtype, device=device, seed=seed + 3) if bias else None
    freqs = torch.outer(torch.arange(16, dtype=torch.float), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    caches = [torch.full((3, 4, hkv, d), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    pos_t = torch.tensor([pos], device=device)
    slot_t = torch.tensor([slot], device=device)
    return (x, w, b, pos_t, cos_sin), caches, slot_t


@pytest.mark.parametrize("config", [(1, 16, 1, 1), (2, 32, 2, 1), (4, 64, 1, 1)])
@pytest.mark.parametrize("hq,hkv,d,k,bias", [(2, 1, 8, 37, False), (3, 3, 16, 20, True), (4, 2, 8, 130, True)])
def test_gemv_rope_store(device_dtype, config, hq, hkv, d, k, bias):
    """QKV GEMV with rope and the KV-cache writes in its epilogue (GQA, odd K, bias): q and every cache element
    against the references; only the token's slot is written; slot -1 writes nothing."""
    device, dtype = device_dtype
    if (d // 2) % config[0]:
        pytest.skip("BLOCK_J must divide the rotary half")
    (x, w, b, pos, cos_sin), (kc, vc), slot = _rope_case(device, dtype, hq, hkv, d, k, bias, slot=6)
    q = gemv_rope_store_triton(x, w, b, pos, cos_sin, kc, vc, slot, hq, hkv, config)
    kr, vr = torch.full_like(kc, float("nan")).float(), torch.full_like(vc, float("nan")).float()
    qr = linear_rope_store_ref(x.float(), w.float(), None if b is None else b.float(), pos, cos_sin, kr, vr,
                               slot, hq, hkv)
    assert q.shape == (1, hq, d) and q.dtype == dtype
    assert_close(q, qr, dtype, "q")
    block, off = divmod(6, 4)
    for got, want in ((kc, kr), (vc, vr)):
        assert_close(got[block, off], want[block, off], dtype, "cache slot")
        rest = torch.ones(got.shape[:2], dtype=torch.bool)
        rest[block, off] = False
        assert got[rest].isnan().all()  # nothing else written
    (x, w, b, pos, cos_sin), (kc, vc), slot = _rope_case(device, dtype, hq, hkv, d, k, bias, slot=-1)
    gemv_rope_store_triton(x, w, b, pos, cos_sin, kc, vc, slot, hq, hkv, config)
    assert kc.isnan().all() and vc.isnan().all()


def test_linear_rope_store_dispatch(monkeypatch):
    """None on the CPU, for several rows, where the table says None, or for partial rotary; the kernel otherwise
    (GPU)."""
    (x, w, b, pos, cos_sin), (kc, vc), slot = _rope_case("cpu", torch.float32, 2, 1, 8, 16, False, slot=3)
    monkeypatch.setitem(gemv.QKV_ROPE_CONFIGS, tuple(w.shape), (2, 16, 1, 1))
    assert gemv.linear_rope_store(x, w, b, pos, cos_sin, kc, vc, slot, 2, 1) is None  # CPU
    if not torch.cuda.is_available():
        return
    (x, w, b, pos, cos_sin), (kc, vc), slot = _rope_case("cuda", torch.float16, 2, 1, 8, 16, False, slot=3)
    assert gemv.linear_rope_store(x, w, b, pos, cos_sin, kc, vc, slot, 2, 1) is not None
    assert gemv.linear_rope_store(x.repeat(2, 1), w, b, pos, cos_sin, kc, vc, slot, 2, 1) is None
    assert gemv.linear_rope_store(x, w, b, pos, cos_sin[:, :4].contiguous(), kc, vc, slot, 2, 1) is None
    monkeypatch.setitem(gemv.QKV_ROPE_CONFIGS, tuple(w.shape), None)
    gemv.config_for.cache_clear()
    assert gemv.linear_rope_store(x, w, b, pos, cos_sin, kc, vc, slot, 2, 1) is None


def test_model_takes_the_fused_qkv_rope_only_in_decode():
    """LlamaModel asks ops.linear_rope_store for decode steps only; None keeps its own ops (same tokens); a decoy q
    of zeros that writes no KV changes them."""
    from hybrid_engine import LLM, SamplingParams

    llm = LLM("tiny-llama", capture="off")
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def tokens():
        return llm.generate({"prompt_token_ids": [5, 9, 14, 3, 7]}, sp)[0].outputs[0].token_ids

    base, calls = tokens(), []
    llm.model.ops = replace(llm.ops, linear_rope_store=lambda x, *a: calls.append(tuple(x.shape)) or None)
    assert tokens() == base
    layers = len(llm.model.layers)
    assert calls == [(1, llm.model.args.hidden_size)] * (7 * layers)  # 7 decode steps, no prefill
    q_zeros = lambda x, w, b, pos, cs, kc, vc, slots, hq, hkv: torch.zeros(1, hq, kc.shape[-1])  # noqa: E731
    llm.model.ops = replace(llm.ops, linear_rope_store=q_zeros)
    assert tokens() != base


def test_gemv_weight_view_with_row_stride():
    """A weight that is a row-slice view (stride(0) > K) still works."""
    big = torch.randn(10, 48)
    w = big[:, :40]
    x = torch.randn(1, 40)
    assert_close(gemv_triton(x, w, None, (4, 16, 1, 1)), linear_ref(x, w), torch.float32)


def test_linear_dispatch_falls_back_on_cpu_and_multirow():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    assert torch.allclose(gemv.linear(x, w), F.linear(x, w))
    assert torch.allclose(gemv.linear(x[:1], w), F.linear(x[:1], w))
    h = torch.randn(2, 32)
    assert torch.allclose(gemv.silu_mul_linear(h, w), F.linear(F.silu(h[:, :16]) * h[:, 16:], w), atol=1e-5)


@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096),
                                 (1000, 4100)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_linear_gpu_llama_shapes(n, k, dtype, monkeypatch):
    """ops.linear on the real shapes (the table's configs, or the default for an off-table shape), in a graph."""
    monkeypatch.setitem(gemv.GEMV_CONFIGS, (n, k), gemv.GEMV_CONFIGS.get((n, k)) or gemv.DEFAULT_CONFIG)
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    b = torch.randn(n, device="cuda", dtype=dtype)
    assert_close(gemv.linear(x, w), linear_ref(x, w).float(), dtype, "linear")
    assert_close(gemv.linear(x, w, b), linear_ref(x, w, b).float(), dtype, "linear+bias")
    assert_replays_like_ref(lambda: gemv.linear(x, w), x, lambda: linear_ref(x, w).float(), dtype, "linear in graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_silu_mul_gpu(dtype, monkeypatch):
    """The LLaMA-2-7B gate/up shape: the fused kernel (table config or default) against the reference, against
    the unfused GEMV + silu_mul it replaces, and in a graph."""
    n, k = 22016, 4096
    monkeypatch.setitem(gemv.GATE_UP_SILU_CONFIGS, (n, k),
                        gemv.GATE_UP_SILU_CONFIGS.get((n, k)) or (2,) + gemv.DEFAULT_CONFIG[1:])
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    ref = linear_silu_mul_ref(x, w).float()
    assert_close(gemv.linear_silu_mul(x, w), ref, dtype, "linear_silu_mul")  # not None: in the table
    unfused = silu_mul_ref(gemv.linear(x, w).float())  # GEMV + silu_mul: the same up to fp32 summation order
    torch.testing.assert_close(gemv.linear_silu_mul(x, w).float(), unfused, rtol=2e-2, atol=2e-3)
    assert_replays_like_ref(lambda: gemv.linear_silu_mul(x, w), x, lambda: linear_silu_mul_ref(x, w).float(), dtype,
                            "linear_silu_mul in graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_rope_store_gpu(dtype, monkeypatch):
    """The LLaMA-2-7B QKV shape (32 heads of 128): the fused kernel (table config or default) against the unfused
    GEMV + rope/KV-store kernel it replaces, q and the cache slot, and in a graph."""
    from hybrid_engine.kernels.rope import rope_store_kv_triton

    n, k, hq = 12288, 4096, 32
    monkeypatch.setitem(gemv.QKV_ROPE_CONFIGS, (n, k), gemv.QKV_ROPE_CONFIGS.get((n, k)) or (2, 2048, 4, 1))
    (x, w, b, pos, cos_sin), (kc, vc), slot = _rope_case("cuda", dtype, hq, hq, 128, k, False, slot=7, pos=11)
    w.mul_(0.1)
    q = gemv.linear_rope_store(x, w, None, pos, cos_sin, kc, vc, slot, hq, hq)
    kr, vr = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    qr = linear_rope_store_ref(x.float(), w.float(), None, pos, cos_sin, kr, vr, slot, hq, hq)
    assert_close(q, qr, dtype, "q")
    assert_close(kc[1, 3], kr[1, 3].float(), dtype, "k slot")
    assert_close(vc[1, 3], vr[1, 3].float(), dtype, "v slot")
    qkv = gemv.linear(x, w).view(1, 3 * hq, 128)  # unfused: GEMV, then rope + KV store
    ku, vu = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    qu, _ = rope_store_kv_triton(qkv[:, :hq], qkv[:, hq:2 * hq], qkv[:, 2 * hq:], pos, cos_sin, ku, vu, slot)
    torch.testing.assert_close(q.float(), qu.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(kc[1, 3].float(), ku[1, 3].float(), rtol=2e-2, atol=2e-3)
    assert_replays_like_ref(lambda: gemv.linear_rope_store(x, w, None, pos, cos_sin, kc, vc, slot, hq, hq), x,
                            lambda: linear_rope_store_ref(x.float(), w.float(), None, pos, cos_sin, kr, vr, slot,
                                                          hq, hq).float(), dtype, "linear_rope_store in graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_silu_mul_linear_gpu(monkeypatch):
    n, k = 4096, 11008
    monkeypatch.setitem(gemv.SILU_GEMV_CONFIGS, (n, k), gemv.SILU_GEMV_CONFIGS.get((n, k)) or gemv.DEFAULT_CONFIG)
    h = torch.randn(1, 2 * k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    assert_close(gemv.silu_mul_linear(h, w), silu_mul_linear_ref(h, w).float(), torch.float16, "silu_mul_linear")


@pytest.mark.parametrize("config", [(4, 16, 1, 1, 2), (8, 32, 2, 1, 3), (16, 16, 1, 1, 8)])
@pytest.mark.parametrize("n,k", [(13, 37), (40, 96), (7, 200)])
def test_gemv_split_k(device_dtype, config, n, k):
    """Split-K with the last-arriving fix-up, twice in a row (the counters must be left at zero)."""
    device, dtype = device_dtype
    w = rand(n, k, dtype=dtype, device=device, seed=2, scale=0.2)
    b = rand(n, dtype=dtype, device=device, seed=3)
    for seed in (1, 7):
        x = rand(1, k, dtype=dtype, device=device, seed=seed)
        assert_close(gemv_triton(x, w, b, config), linear_ref(x.float(), w.float(), b.float()), dtype, "split-k")
        h = rand(1, 2 * k, dtype=dtype, device=device, seed=seed)
        assert_close(gemv_triton(h, w, None, config, silu_mul=True), silu_mul_linear_ref(h.float(), w.float()),
                     dtype, "split-k silu")


@pytest.mark.parametrize(("k", "kind", "want"), [
    (4096, "plain", (4, 2048, 4, 1)), (576, "plain", (4, 1024, 4, 1)), (3584, "plain", (4, 2048, 4, 1)),
    (4096, "gate_up", (2, 4096, 8, 1)), (2048, "gate_up", (2, 2048, 4, 1)), (576, "qkv", (2, 1024, 4, 1)),
    (37, "plain", (4, 64, 4, 1))])
def test_default_config_keeps_the_measured_tiles_with_block_k_capped_at_k(k, kind, want):
    assert gemv.default_config(k, kind) == want


@pytest.mark.parametrize("n,k", [(13, 37), (24, 100)])
def test_default_configs_are_exact_on_odd_shapes(device_dtype, n, k):
    """The derived configs an unlisted shape gets (plain, gate/up + SiLU, QKV + rope) against the references."""
    device, dtype = device_dtype
    x = rand(1, k, dtype=dtype, device=device, seed=11)
    w = rand(2 * n, k, dtype=dtype, device=device, seed=12, scale=0.2)
    assert_close(gemv_triton(x, w, None, gemv.default_config(k)), linear_ref(x.float(), w.float()), dtype, "plain")
    assert_close(gemv_silu_triton(x, w, gemv.default_config(k, "gate_up")), linear_silu_mul_ref(x.float(), w.float()),
                 dtype, "gate_up")
    (x, w, b, pos, cos_sin), (kc, vc), slot = _rope_case(device, dtype, 4, 2, 8, k, True, slot=6)
    q = gemv_rope_store_triton(x, w, b, pos, cos_sin, kc, vc, slot, 4, 2, gemv.default_config(k, "qkv"))
    kr, vr = torch.full_like(kc, float("nan")).float(), torch.full_like(vc, float("nan")).float()
    qr = linear_rope_store_ref(x.float(), w.float(), b.float(), pos, cos_sin, kr, vr, slot, 4, 2)
    assert_close(q, qr, dtype, "qkv rope")


@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096), (4096, 14336), (3072, 2048), (960, 576), (4608, 3584)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unlisted_shapes_run_the_gemv_with_derived_configs_gpu(n, k):
    """Shapes of Llama-3-8B, Llama-3.2-1B, SmolLM2 and Qwen2-7B (no table entry): `linear` and `linear_silu_mul`
    take the GEMV with `default_config` (not cuBLAS, not None), exact against the reference and in a graph."""
    assert (n, k) not in gemv.GEMV_CONFIGS and (n, k) not in gemv.GATE_UP_SILU_CONFIGS
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    assert_close(gemv.linear(x, w), linear_ref(x, w).float(), torch.float16, "linear")
    fused = gemv.linear_silu_mul(x, w)
    assert fused is not None
    assert_close(fused, linear_silu_mul_ref(x, w).float(), torch.float16, "linear_silu_mul")
    assert_replays_like_ref(lambda: gemv.linear(x, w), x, lambda: linear_ref(x, w).float(), torch.float16,
                            "linear in graph")


def _norm_case(device, dtype, k, seed):
    """(residual, norm weight, eps) for an RMSNorm folded into a one-row kernel."""
    return (rand(1, k, dtype=dtype, device=device, seed=seed), 1 + rand(k, dtype=dtype, device=device, seed=seed + 1,
                                                                          scale=0.3), 1e-5)


@pytest.mark.parametrize("config", CONFIGS[:2])
@pytest.mark.parametrize("i,k", [(5, 3), (24, 100), (9, 130)])
def test_gemv_silu_with_the_norm_folded_in(device_dtype, config, i, k):
    """norm=(residual, g, eps): rmsnorm(x + residual) * g through the gate/up kernel equals the norm reference then
    the fused GEMV reference (up to the norm's rounding, which the fused kernel skips); x + residual is returned
    exactly as the unfused add gives it, written once."""
    from hybrid_engine.kernels.rms_norm import rms_norm_ref

    device, dtype = device_dtype
    x = rand(1, k, dtype=dtype, device=device, seed=16)
    w = rand(2 * i, k, dtype=dtype, device=device, seed=17, scale=0.3)
    residual, g, eps = _norm_case(device, dtype, k, seed=18)
    out, new_residual = gemv_silu_triton(x, w, config, norm=(residual, g, eps))
    normed, want_residual = rms_norm_ref(x.float(), g.float(), eps, residual.float())
    assert torch.equal(new_residual, x + residual)
    assert out.shape == (1, i) and out.dtype == dtype
    assert_close(out, linear_silu_mul_ref(normed, w.float()), dtype, "norm + gemv silu")


@pytest.mark.parametrize("config", [(1, 16, 1, 1), (2, 32, 2, 1)])
@pytest.mark.parametrize("hq,hkv,d,k,bias", [(2, 1, 8, 37, False), (4, 2, 8, 130, True)])
def test_gemv_rope_store_with_the_norm_folded_in(device_dtype, config, hq, hkv, d, k, bias):
    from hybrid_engine.kernels.rms_norm import rms_norm_ref

    device, dtype = device_dtype
    (x, w, b, pos, cos_sin), (kc, vc), slot = _rope_case(device, dtype, hq, hkv, d, k, bias, slot=6)
    residual, g, eps = _norm_case(device, dtype, k, seed=30)
    q, new_residual = gemv_rope_store_triton(x, w, b, pos, cos_sin, kc, vc, slot, hq, hkv, config,
                                             norm=(residual, g, eps))
    normed, _ = rms_norm_ref(x.float(), g.float(), eps, residual.float())
    kr, vr = torch.full_like(kc, float("nan")).float(), torch.full_like(vc, float("nan")).float()
    qr = linear_rope_store_ref(normed, w.float(), None if b is None else b.float(), pos, cos_sin, kr, vr, slot, hq,
                               hkv)
    assert torch.equal(new_residual, x + residual)
    assert_close(q, qr, dtype, "norm + q")
    block, off = divmod(6, 4)
    for got, want in ((kc, kr), (vc, vr)):
        assert_close(got[block, off], want[block, off], dtype, "norm + cache slot")


def test_norm_folding_rule(monkeypatch):
    """Where to fold: "auto" takes the card's tuning entry (a config, or empty: apart), else the unfused variant's
    config up to hidden FUSE_NORM_MAX_K; "1" folds everywhere on that config, "0" nowhere; other values name the
    allowed ones."""
    cuda, f16 = torch.device("cuda"), torch.float16
    tuned = {"gemv_silu_norm": {"64,4096,float16": [8, 1024, 4, 1], "64,576,float16": []}}
    monkeypatch.setattr(gemv.tuning, "lookup", lambda family, key, device: tuned.get(family, {}).get(key))

    def folded(kind, n, k):
        gemv.norm_config_for.cache_clear()
        return gemv.norm_config_for(kind, n, k, cuda, f16)

    monkeypatch.delenv("HYBRID_ENGINE_FUSE_NORM", raising=False)
    assert folded("qkv", 96, 576) == gemv.config_for("qkv", 96, 576, cuda, f16)  # untuned, small hidden
    assert folded("qkv", 96, gemv.FUSE_NORM_MAX_K + 1) is None  # untuned, large hidden
    assert folded("gate_up", 64, 4096) == (8, 1024, 4, 1)  # tuned: fold, on the measured config
    assert folded("gate_up", 64, 576) is None  # tuned: apart measured faster
    monkeypatch.setenv("HYBRID_ENGINE_FUSE_NORM", "1")
    assert folded("gate_up", 64, 576) == gemv.config_for("gate_up", 64, 576, cuda, f16)
    assert folded("qkv", 96, 4096) == gemv.config_for("qkv", 96, 4096, cuda, f16)
    monkeypatch.setenv("HYBRID_ENGINE_FUSE_NORM", "0")
    assert folded("gate_up", 64, 4096) is None
    monkeypatch.setenv("HYBRID_ENGINE_FUSE_NORM", "sometimes")
    with pytest.raises(ValueError, match="HYBRID_ENGINE_FUSE_NORM='sometimes' must be auto, 1 or 0"):
        folded("qkv", 96, 576)


def test_norm_folding_dispatch(monkeypatch):
    """The folded norm only where the fused op itself applies (one CUDA row), with a residual of x's shape and
    dtype, and not with HYBRID_ENGINE_FUSE_NORM=0; CPU: None."""
    x, w = torch.randn(1, 16), torch.randn(10, 16)
    norm = (torch.randn(1, 16), torch.ones(16), 1e-5)
    assert gemv.linear_silu_mul(x, w, norm=norm) is None  # CPU
    if torch.cuda.is_available():
        xc, wc = x.cuda().half(), w.cuda().half()
        nc = (norm[0].cuda().half(), norm[1].cuda().half(), 1e-5)
        out, res = gemv.linear_silu_mul(xc, wc, norm=nc)
        assert torch.equal(res, xc + nc[0])
        assert gemv.linear_silu_mul(xc, wc, norm=(nc[0].float(), nc[1], 1e-5)) is None  # residual dtype
        assert gemv.linear_silu_mul(xc, wc, norm=(nc[0][:, :8], nc[1], 1e-5)) is None  # residual shape
        monkeypatch.setenv("HYBRID_ENGINE_FUSE_NORM", "0")
        gemv.norm_config_for.cache_clear()
        assert gemv.linear_silu_mul(xc, wc, norm=nc) is None
        assert gemv.linear_silu_mul(xc, wc) is not None  # without a norm: unchanged


def test_model_folds_the_norms_only_where_the_op_applies():
    """LlamaModel offers each decode norm to ops.norm_linear_*: None keeps rms_norm + the op (same tokens); a result
    is used as the op's output and the new residual (a decoy changes the tokens)."""
    from hybrid_engine import LLM, SamplingParams

    llm = LLM("tiny-llama", capture="off")
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def tokens():
        return llm.generate({"prompt_token_ids": [5, 9, 14, 3, 7]}, sp)[0].outputs[0].token_ids

    base, calls = tokens(), []
    llm.model.ops = replace(llm.ops, norm_linear_silu_mul=lambda *a: calls.append("mlp") or None,
                            norm_linear_rope_store=lambda *a: calls.append("qkv") or None)
    assert tokens() == base and {"mlp", "qkv"} <= set(calls)

    def decoy(x, residual, g, eps, weight):
        return torch.zeros(*x.shape[:-1], weight.shape[0] // 2, dtype=x.dtype), x + residual

    llm.model.ops = replace(llm.ops, norm_linear_silu_mul=decoy)
    assert tokens() != base
