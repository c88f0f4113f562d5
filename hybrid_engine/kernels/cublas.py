"""The JIT prefill's projections as direct cublasGemmEx calls (ctypes) on torch's own cuBLAS handle.

The JIT path (the first request after load, lengths no graph covers yet) is bound by host time, and a `torch.mm`
costs 20-24 us of it on the H100 hosts measured (dispatch, output checks, the handle and workspace lookup), four
times per layer: most of a 7B prefill's ~300 launches' host time (benchmarks/NOTES.md, sessions 3 and 6). Here one
step takes torch's handle for the current stream once (`torch.cuda.current_blas_handle()`, which binds the stream and
torch's workspace to it) and each projection is one ctypes call with the arguments torch's `mm` passes for the same
operands: C^T = op(W_kn^T) x^T in cuBLAS's column-major terms, fp32 compute, CUBLAS_GEMM_DEFAULT_TENSOR_OP, the
handle in its default math mode (torch resets it after each of its GEMMs). So cuBLAS sees the same problem and picks
the same kernel; `tests/kernels/test_cublas.py` checks bit-equality with torch.mm on the GPU.

`handle()` returns None (callers use torch.mm) on a CPU-only torch, without a loadable libcublas, for other dtypes,
or with HYBRID_ENGINE_DIRECT_CUBLAS=0; fp16 / bf16 reduced-precision reductions must be torch's default (allowed).
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import torch

_ENABLED = os.environ.get("HYBRID_ENGINE_DIRECT_CUBLAS", "1").lower() not in ("0", "false", "off", "no")
_DTYPES = {torch.float16: 2, torch.bfloat16: 14}  # cudaDataType_t: CUDA_R_16F, CUDA_R_16BF
_OP_N, _OP_T = 0, 1
_COMPUTE_32F, _ALGO_DEFAULT_TENSOR_OP = 68, 99
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)
_P_ONE, _P_ZERO = ctypes.addressof(_ONE), ctypes.addressof(_ZERO)


@functools.cache
def _gemm_ex() -> Any:
    """cublasGemmEx from the libcublas torch loaded (found in this process's memory map), or None."""
    if not torch.cuda.is_available():
        return None
    try:
        torch.cuda.current_blas_handle()  # loads libcublas
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libcublas.so" in line}
        if len(paths) != 1:
            return None
        fn = ctypes.CDLL(paths.pop()).cublasGemmEx
    except (OSError, AttributeError, RuntimeError):
        return None
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.argtypes = (p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i)
    fn.restype = ctypes.c_int
    return fn


def set_enabled(enabled: bool) -> bool:
    """Turn the direct calls on or off (process-wide); returns the previous setting. For A/B benchmarks and tests."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, bool(enabled)
    return prev


def handle(dtype: torch.dtype) -> int | None:
    """torch's cuBLAS handle for the current stream (call once per step, on the stream the step runs on), or None
    where direct calls do not apply."""
    if not _ENABLED or dtype not in _DTYPES or _gemm_ex() is None:
        return None
    mm = torch.backends.cuda.matmul
    if not (mm.allow_fp16_reduced_precision_reduction and mm.allow_bf16_reduced_precision_reduction
            and getattr(mm, "allow_fp16_reduced_precision_reduction_split_k", True)
            and getattr(mm, "allow_bf16_reduced_precision_reduction_split_k", True)):
        return None  # torch would then set a math mode on the handle for its GEMMs; keep to torch.mm
    return torch.cuda.current_blas_handle()


def mm_into(blas: int, x: torch.Tensor, w_kn: torch.Tensor, out: torch.Tensor) -> bool:
    """out = x @ w_kn for x [M, K] and out [M, N] contiguous, w_kn [K, N] either a transposed view of a contiguous
    [N, K] weight or contiguous itself, all of one dtype on the current device. False (nothing done) where the
    layouts differ; the caller then uses torch.mm."""
    m, k = x.shape
    n = w_kn.shape[1]
    if w_kn.stride() == (1, k):
        op, lda = _OP_T, k
    elif w_kn.stride() == (n, 1):
        op, lda = _OP_N, n
    else:
        return False
    if x.stride() != (k, 1) or out.stride() != (n, 1) or m == 0 or not x.dtype == w_kn.dtype == out.dtype:
        return False
    dt = _DTYPES[x.dtype]
    status = _gemm_ex()(blas, op, _OP_N, n, m, k, _P_ONE, w_kn.data_ptr(), dt, lda, x.data_ptr(), dt, k, _P_ZERO,
                        out.data_ptr(), dt, n, _COMPUTE_32F, _ALGO_DEFAULT_TENSOR_OP)
    if status != 0:
        raise RuntimeError(f"cublasGemmEx failed with status {status} (M={m}, N={n}, K={k}, {x.dtype})")
    return True
