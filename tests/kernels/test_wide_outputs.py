"""The projections' float32 outputs (`out_dtype`, for tensor parallelism's row-parallel partials, summed over the
ranks before one rounding): each is the kernel's own unrounded sum, so rounding it gives the kernel's 16-bit output
bitwise, and it is within float32 accuracy of the float64 product."""
import pytest
import torch
from kernel_helpers import GPU, rand

from hybrid_engine.kernels import gemv
from hybrid_engine.kernels.decode_gemm import decode_gemm_triton, decode_linear
from hybrid_engine.kernels.gemm import gemm_triton, linear_rows, linear_torch, linear_wide
from hybrid_engine.kernels.gemv import gemv_triton

HALF = [pytest.param(("cpu", torch.float16), id="cpu-fp16"), pytest.param(("cuda", torch.float16), id="cuda-fp16",
                                                                          marks=GPU),
        pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=GPU)]


def _operands(device, dtype, m, n, k, with_bias):
    x = rand(m, k, dtype=dtype, device=device, seed=1)
    w = rand(n, k, dtype=dtype, device=device, seed=2, scale=0.2)
    b = rand(n, dtype=dtype, device=device, seed=3) if with_bias else None
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    return x, w, b, exact


def _check(narrow, wide, exact, what):
    assert wide.dtype == torch.float32 and wide.shape == narrow.shape, what
    assert torch.equal(wide.to(narrow.dtype), narrow), f"{what}: the float32 output does not round to the 16-bit one"
    err = (wide.double() - exact).abs().max().item()
    assert err <= 1e-5 * max(1.0, exact.abs().max().item()), f"{what}: {err} from the float64 product"


@pytest.fixture(params=HALF)
def half(request):
    return request.param


@pytest.mark.parametrize("config", [(4, 32, 1, 1), (8, 64, 2, 1, 3), (16, 16, 1, 2, 2)], ids=str)
@pytest.mark.parametrize("n,k,with_bias", [(13, 37, False), (40, 130, True)])
def test_gemv_float32_output(half, config, n, k, with_bias):
    device, dtype = half
    x, w, b, exact = _operands(device, dtype, 1, n, k, with_bias)
    _check(gemv_triton(x, w, b, config), gemv_triton(x, w, b, config, out_dtype=torch.float32), exact, "gemv")


@pytest.mark.parametrize("config", [(16, 32, 1, 1, 1), (16, 32, 3, 1, 1)], ids=str)
@pytest.mark.parametrize("m,n,k,with_bias", [(1, 48, 40, True), (5, 80, 200, False), (17, 40, 96, True)])
def test_decode_gemm_float32_output(half, config, m, n, k, with_bias):
    device, dtype = half
    x, w, b, exact = _operands(device, dtype, m, n, k, with_bias)
    _check(decode_gemm_triton(x, w, b, config), decode_gemm_triton(x, w, b, config, out_dtype=torch.float32), exact,
           "decode gemm")


@pytest.mark.parametrize("m,n,k,with_bias", [(17, 40, 96, False), (5, 33, 70, True)])
def test_gemm_float32_output(half, m, n, k, with_bias):
    device, dtype = half
    x, w, b, exact = _operands(device, dtype, m, n, k, with_bias)
    config = (16, 16, 16, 1, 1)
    _check(gemm_triton(x, w, b, config), gemm_triton(x, w, b, config, out_dtype=torch.float32), exact, "gemm")


@pytest.mark.parametrize("m", [1, 3])
def test_reference_ops_float32_output(m):
    """The torch backend's linear ops (and the Triton ones off the GPU, which fall back to them): the product taken
    in float32 and returned unrounded, rows independent of each other."""
    x, w, b, exact = _operands("cpu", torch.float16, m, 24, 50, True)
    for op in (linear_torch, linear_rows, gemv.linear, decode_linear):
        wide = op(x, w, b, out_dtype=torch.float32)
        assert wide.dtype == torch.float32, op.__name__
        err = (wide.double() - exact).abs().max().item()
        assert err <= 1e-5 * max(1.0, exact.abs().max().item()), op.__name__
        assert op(x, w, b).dtype == torch.float16 and op(x, w, b, out_dtype=torch.float16).dtype == torch.float16
    rows = linear_rows(x, w, b, out_dtype=torch.float32)
    for i in range(m):
        assert torch.equal(rows[i:i + 1], linear_wide(x[i:i + 1], w, b)), f"row {i} depends on the others"


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_linear_float32_output_on_the_plan_gpu(rows):
    """`gemv.linear` with out_dtype float32 on the GPU, whatever the plan picks for the row count (the GEMV, the
    decode GEMM, the Triton GEMM or cuBLAS through torch.mm's out_dtype): the unrounded sum, rounding to the 16-bit
    output of the same path within one unit in the last place (cuBLAS with a float32 output may pick another
    kernel, and so another summation order, than with a 16-bit one)."""
    x, w, _, exact = _operands("cuda", torch.float16, rows, 4096, 4096, False)
    wide = gemv.linear(x, w, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    err = (wide.double() - exact).abs().max().item()
    assert err <= 1e-4 * max(1.0, exact.abs().max().item())
    narrow = gemv.linear(x, w)
    assert ((wide.to(torch.float16).float() - narrow.float()).abs()
            <= torch.finfo(torch.float16).eps * narrow.float().abs().clamp_min(1e-3)).all()
