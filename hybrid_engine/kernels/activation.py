"""SiLU(gate) * up over the fused gate/up projection output."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, launch, next_pow2, pdl_enter

tl = None  # triton.language, bound on first launch (see _triton.py)


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[:, :I]) * x[:, I:]` for x of shape [T, 2*I]."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


def _silu_mul_kernel(X, OUT, stride_x, stride_o, inter, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_mul_ref` (fp32 math, one rounding)."""
    inter = x.shape[-1] // 2
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    out2 = out if flat else out.view(-1, inter)
    if x2.shape[0] > 0:
        fn, grid, args, kw = silu_mul_launch(x2, out2)
        launch(fn, grid, *args, **kw)
    return out


def silu_mul_launch(x2, out2):
    """(kernel, grid, args, kw) of one SiLU-mul launch: out2 [R, I] = silu(x2[:, :I]) * x2[:, I:], row-contiguous."""
    inter = out2.shape[-1]
    block = min(1024, next_pow2(inter))
    return (_silu_mul_kernel, (x2.shape[0], cdiv(inter, block)),
            (x2, out2, x2.stride(0), out2.stride(0), inter), {"BLOCK": block, "num_warps": 4 if block >= 512 else 1})
