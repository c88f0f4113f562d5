"""Kernel backend selection: which implementation of each op the model calls.

Backends (EngineConfig.attention_backend):
  torch    - the plain-torch references for every op (the CPU default).
  triton   - Triton kernels for every op, including prefill attention (the CUDA default).
  sdpa     - Triton kernels, prefill attention through torch SDPA.
  xformers - Triton kernels, prefill attention through xformers (extra `xformers`).
  flash    - Triton kernels, prefill attention through flash-attn (extra `flash`).
Triton on the CPU runs only under the interpreter (TRITON_INTERPRET=1), which the kernel tests use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import HybridEngineError, OptionalDependencyError, require
from ._triton import interpreter_active, interpreter_enabled, triton_available
from .activation import silu_mul_ref
from .cached_prefill_attention import cached_prefill_attention_ref
from .decode_attention import decode_attention_ref
from .gemm import linear_rows, linear_torch
from .kv_store import decode_slots_ref, prefill_slots_ref, store_kv_ref
from .prefill_attention import prefill_attention_ref
from .rms_norm import rms_norm_ref
from .rope import rope_ref
from .sampling import sample_ref

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch", "sdpa", "xformers", "flash")
_logged: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class KernelOps:
    """The ops the model calls; every attribute except the names is a callable (see each module's `*_ref`)."""

    name: str
    prefill_name: str
    device: str
    rms_norm: Callable[..., Any]
    rope: Callable[..., Any]
    silu_mul: Callable[..., Any]
    store_kv: Callable[..., Any]
    prefill_attention: Callable[..., Any]
    decode_attention: Callable[..., Any]
    sample: Callable[..., Any]
    # projections (x, weight, bias=None, weight_t=None, out_dtype=None): cuBLAS unless a kernel measures faster;
    # weight_t is the weight's transposed copy where the model keeps one (LlamaModel.add_prefill_weight_copies);
    # out_dtype float32: the sum unrounded (tensor parallelism's row-parallel partials, HYBRID_ENGINE_TP_SUM)
    linear: Callable[..., Any] = linear_torch
    # decode projections (one row per sequence): each row's result must not depend on the other rows
    decode_linear: Callable[..., Any] = linear_torch
    # flat KV-cache slots computed in the step from the block tables (kv_store.py): (block_table, valid_len,
    # block_size, out) for a prefill; (block_tables, positions, block_size, slots, seq_lens) for a decode step
    prefill_slots: Callable[..., Any] = prefill_slots_ref
    # attention of new prompt tokens over the cached context and themselves: (q, k_cache, v_cache, block_table,
    # start, scale, valid_len); start: host int or [1] int32 device tensor
    cached_prefill_attention: Callable[..., Any] = cached_prefill_attention_ref
    decode_slots: Callable[..., Any] = decode_slots_ref
    # Optional fused ops (None = the model composes the unfused ones):
    rope_store_kv: Callable[..., Any] | None = None    # (q, k, v, positions, cos_sin, k_cache, v_cache, slots) -> (q, k)
    # decode steps: (x, gate_up_weight) -> silu_mul(linear(.)), or None where it does not apply (the model then
    # composes linear and silu_mul)
    linear_silu_mul: Callable[..., Any] | None = None
    # (x, qkv_weight, bias, positions, cos_sin, k_cache, v_cache, slots, num_q_heads, num_kv_heads) -> rotated q of a
    # decode token with k / v written to the cache, or None where it does not apply (the model composes the ops)
    linear_rope_store: Callable[..., Any] | None = None
    # one-row decode steps: the RMSNorm (and its residual add) before one of the two fused ops above, in the same
    # kernel: (x, residual, norm_weight, eps, <that op's arguments>) -> (its result, x + residual), or None where it
    # does not apply (the model then runs rms_norm and the op)
    norm_linear_silu_mul: Callable[..., Any] | None = None
    norm_linear_rope_store: Callable[..., Any] | None = None
    # graph-captured prefills of a few rows: (x, gate_up_weight) -> silu_mul(linear(.)) in one kernel, or None where
    # it does not apply (gemv.small_prefill_silu_mul; the model then composes linear and silu_mul)
    prefill_linear_silu_mul: Callable[..., Any] | None = None
    decode_projection: str = "linear_rows"  # what decode_linear and the two fused decode ops above run (stats)
    # (q, k, v, positions, cos_sin, k_cache, v_cache, slots, scale, valid_len) -> prefill attention output, with
    # rope and the KV-cache writes in the same launch
    prefill_attention_rope: Callable[..., Any] | None = None

    def describe(self) -> dict[str, str]:
        """What runs where, for `LLM.stats()`."""
        elementwise = "torch" if self.name == "torch" else "triton"
        return {
            "attention_backend": self.name,
            "prefill_attention": self.prefill_name,
            "decode_attention": elementwise,
            "elementwise_kernels": elementwise,
            "sampling": elementwise,
            "decode_projections": self.decode_projection,
        }


def torch_ops(device: torch.device) -> KernelOps:
    return KernelOps(
        name="torch", prefill_name="sdpa", device=str(device),
        rms_norm=rms_norm_ref, rope=rope_ref, silu_mul=silu_mul_ref, store_kv=store_kv_ref,
        prefill_attention=prefill_attention_ref, decode_attention=decode_attention_ref, sample=sample_ref,
        decode_linear=linear_rows,
    )


def resolve_backend(device: torch.device, attention_backend: str = "auto") -> str:
    """The concrete backend name for `attention_backend` on `device` ("auto" -> triton on cuda, torch on cpu)."""
    if attention_backend not in BACKENDS:
        raise ValueError(f"attention_backend={attention_backend!r} is not allowed; use one of {list(BACKENDS)}")
    if attention_backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return attention_backend


def _check_triton_usable(device: torch.device, backend: str) -> None:
    if not triton_available():
        raise HybridEngineError(f"attention_backend={backend!r} needs triton, which is not installed; "
                                "use attention_backend='torch'")
    if device.type == "cpu" and not interpreter_enabled():
        raise HybridEngineError(f"attention_backend={backend!r} runs Triton kernels, which need a CUDA device "
                                "(or TRITON_INTERPRET=1 on the CPU); use attention_backend='torch' on the CPU")
    if device.type == "cpu" and not interpreter_active():
        raise HybridEngineError("TRITON_INTERPRET=1 was set after triton had been imported (e.g. by transformers); "
                                "set it in the environment before the process imports anything")
    if device.type not in ("cpu", "cuda"):
        raise HybridEngineError(f"attention_backend={backend!r} does not support device {device}")


def _prefill_for(backend: str, device: torch.device) -> Callable[..., Any]:
    if backend == "sdpa":
        return prefill_attention_ref
    if backend == "xformers":
        from .prefill_attention import make_xformers_prefill

        prefill = make_xformers_prefill(require("xformers.ops", "xformers"))
        _probe_prefill(prefill, device, "xformers")
        return prefill
    if backend == "flash":
        from .prefill_attention import make_flash_prefill

        return make_flash_prefill(require("flash_attn", "flash"))
    from .prefill_attention import prefill_attention_triton

    return prefill_attention_triton


def _probe_prefill(prefill: Callable[..., Any], device: torch.device, backend: str) -> None:
    """Run the backend once on a tiny input: an installed package without kernels for this device (e.g. an
    xformers wheel built without CUDA) must fail here, at engine construction, not in the first request."""
    if device.type != "cuda":
        return
    x = torch.zeros(2, 2, 64, dtype=torch.float16, device=device)
    try:
        prefill(x, x, x, 0.125)
    except (NotImplementedError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptionalDependencyError(
            f"attention_backend={backend!r}: the installed package has no kernel for {device} ({first_line}); "
            f"install a build with CUDA support (pip install 'hybrid-engine[{backend}]') or use 'triton'") from exc


# Decode steps of 2..MIXED_DECODE_MAX_ROWS rows run the decode GEMM (fused SiLU-mul and rope + KV-store epilogues)
# rather than the per-row-count product plan with unfused epilogues: on the H200 (LLaMA-2-7B shape, 2026-11-30) its
# decode steps took 4.22 / 4.22 / 4.26 / 4.53 ms at 2 / 4 / 8 / 16 rows against 4.43 / 4.45 / 4.61 / 4.99, and
# 5.81 against 5.62 at 32 rows. One row keeps the GEMVs (3.88 against 4.21 ms).
MIXED_DECODE_MAX_ROWS = 16


def _by_rows(one_or_many: Callable[..., Any], few: Callable[..., Any]) -> Callable[..., Any]:
    """A decode op (x, weight, ...) that calls `few` for 2..MIXED_DECODE_MAX_ROWS rows of x where this card's tuning
    table has the weight's shape (measured: an untuned shape keeps the plan), and `one_or_many` otherwise."""
    from . import decode_gemm as dg

    def op(x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = x.numel() // x.shape[-1]
        use_few = (2 <= rows <= MIXED_DECODE_MAX_ROWS and x.is_cuda
                   and dg.has_tuned_config(*weight.shape, x.device, x.dtype))
        return (few if use_few else one_or_many)(x, weight, *args, **kwargs)

    op.__name__ = op.__qualname__ = f"{one_or_many.__name__}_or_{few.__module__.rsplit('.', 1)[-1]}"
    return op


def _after_norm(op: Callable[..., Any]) -> Callable[..., Any]:
    """(x, residual, norm_weight, eps, weight, *args) -> op(x, weight, *args, norm=(residual, norm_weight, eps)): a
    one-row GEMV op with the RMSNorm before it folded in (None where it does not apply)."""
    def fused(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
              *args: Any) -> Any:
        return op(x, weight, *args, norm=(residual, norm_weight, eps))

    fused.__name__ = fused.__qualname__ = f"norm_{op.__name__}"
    return fused


def _decode_projections(batch_invariant: bool) -> dict[str, Any]:
    """The decode-step projections. batch_invariant: the decode GEMM at every row count (one kernel and one
    summation order per row whatever the batch). Else: the one-row GEMVs for one row, the decode GEMM for
    2..MIXED_DECODE_MAX_ROWS rows of a shape the card's tuning table holds, the per-row-count product plan elsewhere
    (a row's numbers then depend on the batch size)."""
    from . import decode_gemm as dg
    from . import gemv

    if batch_invariant:
        return dict(decode_linear=dg.decode_linear, linear_silu_mul=dg.decode_linear_silu_mul,
                    linear_rope_store=dg.decode_linear_rope_store,
                    norm_linear_silu_mul=dg.decode_norm_linear_silu_mul,
                    norm_linear_rope_store=dg.decode_norm_linear_rope_store, decode_projection="decode_gemm")
    return dict(decode_linear=_by_rows(gemv.linear, dg.decode_linear),
                linear_silu_mul=_by_rows(gemv.linear_silu_mul, dg.decode_linear_silu_mul),
                linear_rope_store=_by_rows(gemv.linear_rope_store, dg.decode_linear_rope_store),
                norm_linear_silu_mul=_after_norm(gemv.linear_silu_mul),
                norm_linear_rope_store=_after_norm(gemv.linear_rope_store),
                prefill_linear_silu_mul=gemv.small_prefill_silu_mul,
                decode_projection=f"gemv (1 row) + decode_gemm (2-{MIXED_DECODE_MAX_ROWS}) + plan")


def triton_ops(device: torch.device, backend: str = "triton", batch_invariant: bool = False) -> KernelOps:
    prefill = _prefill_for(backend, device)  # missing optional package -> OptionalDependencyError first
    _check_triton_usable(device, backend)
    from .activation import silu_mul_triton
    from .cached_prefill_attention import cached_prefill_attention_triton
    from .gemv import linear
    from .prefill_attention import prefill_attention_rope_triton
    from .decode_attention import decode_attention_triton
    from .kv_store import decode_slots_triton, prefill_slots_triton, store_kv_triton
    from .rms_norm import rms_norm_triton
    from .rope import rope_store_kv_triton, rope_triton
    from .sampling import sample_triton

    return KernelOps(
        name=backend, prefill_name="triton" if backend == "triton" else backend, device=str(device),
        rms_norm=rms_norm_triton, rope=rope_triton, silu_mul=silu_mul_triton, store_kv=store_kv_triton,
        prefill_attention=prefill, decode_attention=decode_attention_triton, sample=sample_triton,
        linear=linear, rope_store_kv=rope_store_kv_triton,
        prefill_slots=prefill_slots_triton, decode_slots=decode_slots_triton, **_decode_projections(batch_invariant),
        prefill_attention_rope=prefill_attention_rope_triton if backend == "triton" else None,
        cached_prefill_attention=cached_prefill_attention_triton,
    )


def get_ops(device: torch.device | str, attention_backend: str = "auto", batch_invariant: bool = False) -> KernelOps:
    """The KernelOps for `device` and `attention_backend` (see the module docstring); the choice is logged once.

    Raises ValueError for an unknown backend name, OptionalDependencyError (naming the extra) when xformers or
    flash-attn is not installed, HybridEngineError when Triton cannot run on `device`.
    """
    device = torch.device(device)
    backend = resolve_backend(device, attention_backend)
    ops = torch_ops(device) if backend == "torch" else triton_ops(device, backend, batch_invariant)
    if (backend, device.type, ops.decode_projection) not in _logged:
        _logged.add((backend, device.type, ops.decode_projection))
        logger.info("kernel backend on %s: %s (requested %r)", device, ops.describe(), attention_backend)
    return ops
