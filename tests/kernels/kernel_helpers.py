"""Shared helpers of the kernel tests (tolerances, device/dtype matrix, random inputs)."""
import math

import pytest
import torch

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (device, dtype): fp32 runs everywhere (interpreter on CPU); fp16/bf16 only on the GPU.
DEVICE_DTYPES = [
    pytest.param(("cpu", torch.float32), id="cpu-fp32"),
    pytest.param(("cuda", torch.float32), id="cuda-fp32", marks=GPU),
    pytest.param(("cuda", torch.float16), id="cuda-fp16", marks=GPU),
    pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=GPU),
]

# Max |kernel - fp32 reference| allowed, relative to max(1, max|reference|). fp32 on the GPU allows for tf32-free
# but reordered accumulation; fp16/bf16 allow a few ulps of the output dtype (inputs are rounded identically).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype, what=""):
    """Finite and within TOLERANCE[dtype] of the fp32 reference (relative to the reference's scale)."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten poison?)"
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max abs error {err:.3g} > {TOLERANCE[dtype] * scale:.3g}"


def rand(*shape, dtype, device, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed + 1000 * len(shape) + int(math.prod(shape)) % 997)
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def assert_replays_like_ref(fn, x, ref, dtype, what="in graph"):
    """Capture `out = fn()` in a CUDA graph (after a warm-up call), refill x with new values, replay, and compare
    the output with `ref()` computed afterwards from the new x."""
    from hybrid_engine.kernels._workspace import capture_graph

    g, out = capture_graph(fn)  # warmed up first, split buffers reserved
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, ref(), dtype, what)
