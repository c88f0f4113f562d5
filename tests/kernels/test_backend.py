"""Backend selection: defaults, overrides, missing optional packages, logging once, describe()."""
import logging

import pytest
import torch

from hybrid_engine.errors import HybridEngineError, OptionalDependencyError
from hybrid_engine.kernels import KernelOps, get_ops, resolve_backend
from hybrid_engine.kernels import backend as backend_module
from hybrid_engine.kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton

OPS = ("rms_norm", "rope", "silu_mul", "store_kv", "prefill_attention", "decode_attention", "sample")


def test_auto_is_torch_on_cpu_and_triton_on_cuda():
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    ops = get_ops(torch.device("cpu"))
    assert isinstance(ops, KernelOps) and ops.name == "torch"
    assert all(callable(getattr(ops, name)) for name in OPS)
    assert ops.describe()["attention_backend"] == "torch"


def test_triton_on_cpu_under_interpreter():
    ops = get_ops("cpu", "triton")  # conftest set TRITON_INTERPRET=1
    assert ops.name == "triton" and ops.prefill_attention is prefill_attention_triton
    assert ops.describe() == {"attention_backend": "triton", "prefill_attention": "triton",
                              "decode_attention": "triton", "elementwise_kernels": "triton", "sampling": "triton",
                              "decode_projections": "gemv (1 row) + decode_gemm (2-16) + plan"}


def test_batch_invariant_picks_the_decode_projections():
    from hybrid_engine.kernels import decode_gemm

    on, off = get_ops("cpu", "triton", batch_invariant=True), get_ops("cpu", "triton")
    assert (on.decode_linear, on.linear_silu_mul, on.linear_rope_store) == (
        decode_gemm.decode_linear, decode_gemm.decode_linear_silu_mul, decode_gemm.decode_linear_rope_store)
    assert (on.norm_linear_silu_mul, on.norm_linear_rope_store) == (
        decode_gemm.decode_norm_linear_silu_mul, decode_gemm.decode_norm_linear_rope_store)
    assert off.describe()["decode_projections"] == "gemv (1 row) + decode_gemm (2-16) + plan"
    assert get_ops("cpu").describe()["decode_projections"] == "linear_rows"  # torch: F.linear row by row


@pytest.mark.parametrize("rows,tuned,cuda,expect", [(1, True, True, "one"), (2, True, True, "few"),
                                                    (16, True, True, "few"), (17, True, True, "one"),
                                                    (8, False, True, "one"), (8, True, False, "one")])
def test_default_decode_projections_by_row_count(monkeypatch, rows, tuned, cuda, expect):
    """Without batch invariance a decode op takes the decode GEMM for 2..16 rows of a shape this card's tuning
    table holds (on a GPU), and the GEMV / product plan otherwise; every argument reaches the chosen op."""
    from hybrid_engine.kernels import decode_gemm

    monkeypatch.setattr(decode_gemm, "has_tuned_config", lambda *a: tuned)
    calls = []
    op = backend_module._by_rows(lambda *a, **k: calls.append(("one", a, k)),
                                 lambda *a, **k: calls.append(("few", a, k)))

    class X:  # the op reads only the shape, numel and device of x
        shape, is_cuda, device, dtype = (rows, 8), cuda, "cuda", torch.float16

        def numel(self):
            return rows * 8

    x, w = X(), torch.zeros(4, 8)
    op(x, w, 1, bias=2)
    assert calls == [(expect, (x, w, 1), {"bias": 2})]


def test_sdpa_backend_keeps_triton_elsewhere():
    ops = get_ops("cpu", "sdpa")
    assert ops.prefill_attention is prefill_attention_ref
    assert ops.describe()["prefill_attention"] == "sdpa" and ops.describe()["decode_attention"] == "triton"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(HybridEngineError, match="CUDA device"):
        get_ops("cpu", "triton")


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="attention_backend='cudnn'"):
        get_ops("cpu", "cudnn")


def test_flash_attn_missing_names_the_extra():
    """flash-attn publishes no wheel for this platform, so here it is normally absent."""
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises(OptionalDependencyError, match=r"hybrid-engine\[flash\]"):
        get_ops("cpu", "flash")


def test_xformers_missing_names_the_extra():
    try:
        import xformers.ops  # noqa: F401
        pytest.skip("xformers is installed")
    except ImportError:
        pass
    with pytest.raises(OptionalDependencyError, match=r"hybrid-engine\[xformers\]"):
        get_ops("cpu", "xformers")


def test_choice_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(backend_module, "_logged", set())
    with caplog.at_level(logging.INFO, logger="hybrid_engine.kernels.backend"):
        get_ops("cpu", "torch")
        get_ops("cpu", "torch")
    assert sum("kernel backend" in r.message for r in caplog.records) == 1
