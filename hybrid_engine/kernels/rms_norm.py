"""RMSNorm with an optional fused residual add (Llama's `input_layernorm` / `post_attention_layernorm`)."""
from __future__ import annotations

import torch

from ._triton import jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    tl = None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Plain-torch RMSNorm with HF LlamaRMSNorm numerics (fp32 statistics, weight applied in the input dtype).

    With `residual`: returns `(rmsnorm(x + residual), x + residual)`.
    """
    if residual is not None:
        x = x + residual
        new_residual = x
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return (out, new_residual) if residual is not None else out
