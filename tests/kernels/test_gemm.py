"""Triton GEMM (prefill projections) vs the fp32 reference: odd sizes, bias, ragged K/N, the dispatch table."""
import threading

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import assert_close, assert_replays_like_ref, rand

from hybrid_engine.kernels import gemm, gemv
from hybrid_engine.kernels.gemm import gemm_triton
from hybrid_engine.kernels.gemv import linear_ref

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): small tiles so odd sizes span several tiles on the CPU
CONFIGS = [(16, 16, 16, 1, 1), (16, 32, 32, 2, 2)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("m,n,k", [(2, 1, 16), (17, 40, 96), (5, 33, 70), (33, 16, 45)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm(device_dtype, config, m, n, k, with_bias):
    device, dtype = device_dtype
    x = rand(m, k, dtype=dtype, device=device, seed=1)
    w = rand(n, k, dtype=dtype, device=device, seed=2, scale=0.2)
    b = rand(n, dtype=dtype, device=device, seed=3) if with_bias else None
    out = gemm_triton(x, w, b, config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, linear_ref(x.float(), w.float(), None if b is None else b.float()), dtype, "gemm")


def test_gemm_leading_dims_and_strided_views():
    """[B, T, K] inputs keep their leading dims; a weight that is a row-slice view (stride(0) > K) works."""
    big = torch.randn(24, 40)
    w = big[:, :32]
    x = torch.randn(2, 9, 32)
    out = gemm_triton(x, w, None, CONFIGS[0])
    assert out.shape == (2, 9, 24)
    assert_close(out, linear_ref(x, w), torch.float32)
    with pytest.raises(ValueError, match="K=32"):
        gemm_triton(torch.randn(3, 31), w, None, CONFIGS[0])


def test_config_table_lookup(monkeypatch):
    monkeypatch.setitem(gemm.GEMM_CONFIGS, (40, 96), [(64, CONFIGS[0])])
    assert gemm.config_for(20, 40, 96) is None  # outside graph_plan(): always cuBLAS (the JIT path)
    with gemm.graph_plan():
        assert gemm.config_for(20, 40, 96) == CONFIGS[0]
        seen = []
        t = threading.Thread(target=lambda: seen.append(gemm.config_for(20, 40, 96)))
        t.start()
        t.join()
        assert seen == [None]  # thread-local: a capture on the worker thread leaves the serving thread alone
    monkeypatch.setitem(gemm.GEMM_CONFIGS, (40, 96), [(16, None), (32, CONFIGS[1]), (64, CONFIGS[0])])
    monkeypatch.setattr(gemm._PLAN, "on", True, raising=False)
    assert gemm.config_for(16, 40, 96) is None  # cuBLAS range
    assert gemm.config_for(17, 40, 96) == CONFIGS[1]
    assert gemm.config_for(64, 40, 96) == CONFIGS[0]
    assert gemm.config_for(65, 40, 96) is None  # above the table
    assert gemm.config_for(20, 41, 96) is None  # shape not in the table
    assert {31, 32, 63, 64} <= gemm.warm_up_lengths()  # both M specialisations of each config's range
    monkeypatch.setitem(gemm.GEMM_CONFIGS, (40, 96), [(16, None), (48, "lt")])
    assert gemm.config_for(40, 40, 96) == "lt" and 48 in gemm.warm_up_lengths()


def test_small_prefill_switch_sends_unlisted_shapes_to_the_decode_gemm(monkeypatch):
    """HYBRID_ENGINE_SMALL_PREFILL=decode_gemm: inside graph captures, products of 2..32 rows of a shape the plan
    does not list go to the decode GEMM; listed shapes, more rows and the JIT path keep the plan; a bad value is a
    ValueError naming it."""
    monkeypatch.setitem(gemm.GEMM_CONFIGS, (40, 96), [(64, CONFIGS[0])])
    for value, want in (("decode_gemm", "decode_gemm"), ("plan", None), ("", None)):
        monkeypatch.setenv("HYBRID_ENGINE_SMALL_PREFILL", value)
        gemm.small_prefill_mode.cache_clear()
        assert gemm.config_for(20, 41, 96) is None  # the JIT path: cuBLAS whatever the switch
        with gemm.graph_plan():
            assert gemm.config_for(20, 41, 96) == want
            assert gemm.config_for(32, 41, 96) == want
            assert gemm.config_for(33, 41, 96) is None
            assert gemm.config_for(20, 40, 96) == CONFIGS[0]  # the plan's own entry wins
    with gemm.graph_plan():  # on the CPU the fused gate/up never applies: the model composes the ops
        assert gemv.small_prefill_silu_mul(torch.randn(4, 8), torch.randn(6, 8)) is None
    monkeypatch.setenv("HYBRID_ENGINE_SMALL_PREFILL", "cublas")
    gemm.small_prefill_mode.cache_clear()
    with pytest.raises(ValueError, match="HYBRID_ENGINE_SMALL_PREFILL='cublas'"):
        gemm.small_prefill_mode()
    monkeypatch.delenv("HYBRID_ENGINE_SMALL_PREFILL")
    gemm.small_prefill_mode.cache_clear()


@pytest.mark.gpu
def test_small_prefill_switch_computes_the_product_gpu(monkeypatch):
    """The routed product equals F.linear (fp16, within tolerance) for the rows a small prefill bucket has."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("HYBRID_ENGINE_SMALL_PREFILL", "decode_gemm")
    gemm.small_prefill_mode.cache_clear()
    try:
        x = rand(16, 576, dtype=torch.float16, device="cuda", seed=1)
        w = rand(960, 576, dtype=torch.float16, device="cuda", seed=2, scale=0.05)
        b = rand(960, dtype=torch.float16, device="cuda", seed=3)
        with gemm.graph_plan():
            out = gemv.linear(x, w, b)
            gate_up = rand(2 * 768, 576, dtype=torch.float16, device="cuda", seed=4, scale=0.05)
            act = gemv.small_prefill_silu_mul(x, gate_up)
        assert_close(out, linear_ref(x.float(), w.float(), b.float()), torch.float16, "small prefill")
        assert act is not None and gemv.small_prefill_silu_mul(x, gate_up) is None  # outside captures: n/a
        assert_close(act, gemv.linear_silu_mul_ref(x.float(), gate_up.float()), torch.float16, "small prefill silu")
    finally:
        monkeypatch.delenv("HYBRID_ENGINE_SMALL_PREFILL")
        gemm.small_prefill_mode.cache_clear()


def test_linear_lt_equals_linear():
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    assert torch.allclose(gemm.linear_lt(x, w), F.linear(x, w), atol=1e-6)
    b = torch.randn(8)
    assert torch.allclose(gemm.linear_lt(x, w, b), F.linear(x, w, b), atol=1e-6)


def test_linear_multirow_falls_back_on_cpu():
    x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    assert torch.allclose(gemv.linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)])
@pytest.mark.parametrize("m", [7, 16, 31, 32, 64, 112, 208, 240])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_linear_gpu_llama_shapes(n, k, m, dtype):
    """ops.linear on the real prefill shapes through whatever the table picks, eager and in a CUDA graph."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    b = torch.randn(n, device="cuda", dtype=dtype)
    with gemm.graph_plan():
        cfg = gemm.config_for(m, n, k)
        cfg = cfg if isinstance(cfg, tuple) else gemm.DEFAULT_CONFIG
        assert_close(gemm_triton(x, w, b, cfg), linear_ref(x, w, b).float(), dtype, "gemm+bias")
        assert_replays_like_ref(lambda: gemv.linear(x, w), x, lambda: linear_ref(x, w).float(), dtype,
                                "linear in graph")


def test_transposed_copy_plan(monkeypatch):
    """With a transposed copy, GEMM_T_CONFIGS is consulted first: "t" in and out of graph_plan(), "t_lt" only in
    it (like "lt"), None falls back to GEMM_CONFIGS; without a copy the T table is never used."""
    monkeypatch.setitem(gemm.GEMM_T_CONFIGS, (40, 96), [(16, "t"), (32, None), (48, "t_lt")])
    monkeypatch.setitem(gemm.GEMM_CONFIGS, (40, 96), [(32, CONFIGS[0]), (48, "lt")])
    assert gemm.config_for(10, 40, 96, transposed=True) == "t"
    assert gemm.config_for(10, 40, 96) is None  # JIT path, no copy: cuBLAS
    assert gemm.config_for(20, 40, 96, transposed=True) is None
    assert gemm.config_for(40, 40, 96, transposed=True) is None  # "t_lt" is a graph-plan choice
    with gemm.graph_plan():
        assert gemm.config_for(10, 40, 96, transposed=True) == "t"
        assert gemm.config_for(10, 40, 96) == CONFIGS[0]
        assert gemm.config_for(20, 40, 96, transposed=True) == CONFIGS[0]
        assert gemm.config_for(40, 40, 96, transposed=True) == "t_lt"
        assert gemm.config_for(40, 40, 96) == "lt"
        assert gemm.config_for(60, 40, 96, transposed=True) is None
    assert 48 in gemm.warm_up_lengths()  # makes the zero bias of "t_lt"


def test_linear_reads_the_copy_where_planned(monkeypatch):
    """ops.linear (torch and Triton backends on the CPU) computes on `weight_t` exactly where the plan says: a copy
    with different values shows which one was read."""
    monkeypatch.setitem(gemm.GEMM_T_CONFIGS, (24, 32), [(8, "t")])
    w = torch.randn(24, 32)
    decoy = torch.randn(32, 24)  # not w.t(): the result tells which tensor was read
    for linear in (gemm.linear_torch, gemv.linear):
        x = torch.randn(5, 32)
        assert torch.allclose(linear(x, w, None, decoy), x @ decoy)
        assert torch.allclose(linear(x, w, None, None), F.linear(x, w))
        x9 = torch.randn(9, 32)  # past the table: the weight
        assert torch.allclose(linear(x9, w, None, decoy), F.linear(x9, w))
        x1 = torch.randn(1, 32)  # one row (decode) never reads the copy
        assert torch.allclose(linear(x1, w, None, decoy), F.linear(x1, w))
