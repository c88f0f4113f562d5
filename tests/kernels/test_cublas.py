"""Direct cublasGemmEx calls (kernels/cublas.py) compute exactly what torch.mm computes, bit for bit, for the JIT
prefill's operand layouts; on the CPU they stand aside."""
import pytest
import torch

from hybrid_engine.kernels import cublas


def test_stands_aside_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert cublas.handle(torch.float16) is None


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (72, 40)])
@pytest.mark.parametrize("transposed_copy", [False, True])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 100, 255])
def test_bit_equal_to_torch_mm(dtype, n, k, transposed_copy, m):
    g = torch.Generator(device="cuda").manual_seed(m + n)
    weight = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) * 0.05
    w_kn = weight.t().contiguous() if transposed_copy else weight.t()
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    blas = cublas.handle(dtype)
    assert blas is not None
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    assert cublas.mm_into(blas, x, w_kn, out)
    assert torch.equal(out, torch.mm(x, w_kn))


@pytest.mark.gpu
@NEEDS_GPU
def test_declines_other_layouts_and_dtypes():
    blas = cublas.handle(torch.float16)
    w = torch.randn(64, 32, device="cuda", dtype=torch.float16)
    x = torch.randn(8, 32, device="cuda", dtype=torch.float16)
    out = torch.empty(8, 64, device="cuda", dtype=torch.float16)
    assert not cublas.mm_into(blas, x.t().contiguous().t(), w.t(), out)  # column-major x
    assert not cublas.mm_into(blas, x, w.t(), out.t().contiguous().t())  # column-major out
    assert not cublas.mm_into(blas, x, w.float().t(), out)  # mixed dtypes
    assert cublas.handle(torch.float32) is None
