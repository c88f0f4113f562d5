"""SiLU(gate) * up over the fused gate/up projection output."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import jit, next_pow2

try:
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[:, :I]) * x[:, I:]` for x of shape [T, 2*I]."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]
