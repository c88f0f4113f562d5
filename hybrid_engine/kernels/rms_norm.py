"""RMSNorm with an optional fused residual add (Llama's `input_layernorm` / `post_attention_layernorm`)."""
from __future__ import annotations

import torch

from ._triton import launch, next_pow2, pdl_enter

tl = None  # triton.language, bound on first launch (see _triton.py)


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


def _rms_norm_kernel(X, R, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)  # rounded to the input dtype, like torch
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (w * normed).to(OUT.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Triton version of `rms_norm_ref`: one program per row, the fused residual add written once."""
    hidden = x.shape[-1]
    flat = x.dim() == 2  # the model's case: no reshapes (host time counts on the JIT path)
    x2 = x if flat else x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    dtype = x.dtype if weight.dtype == x.dtype else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    out2 = out if flat else out.view(-1, hidden)
    if residual is not None:
        r2 = residual if residual.dim() == 2 else residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res2 = new_res if flat else new_res.view(-1, hidden)
    else:
        r2, res2 = x2, out2
    if rows > 0:
        fn, grid, args, kw = rms_norm_launch(x2, r2, weight, out2, res2, eps, residual is not None)
        launch(fn, grid, *args, **kw)
    return (out, new_res) if residual is not None else out


def rms_norm_launch(x2, r2, weight, out2, res2, eps: float, has_residual: bool):
    """(kernel, grid, args, kw) of one RMSNorm launch over 2-D row-contiguous views: out2 = rmsnorm(x2 [+ r2]),
    res2 = x2 + r2 when `has_residual` (res2 may be r2 itself: each program reads its row before writing it)."""
    hidden = x2.shape[-1]
    block = next_pow2(hidden)
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 1
    return (_rms_norm_kernel, (x2.shape[0],),
            (x2, r2, weight, out2, res2, x2.stride(0), r2.stride(0), out2.stride(0), res2.stride(0), hidden, eps),
            {"HAS_RESIDUAL": has_residual, "BLOCK": block, "num_warps": num_warps})
