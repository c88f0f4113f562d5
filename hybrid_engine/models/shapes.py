"""The kernel shapes a model runs, read from its config alone (no weight is loaded): what `hybrid-engine tune`
measures on the present card."""
from __future__ import annotations

import torch

from ..kernels.sweeps.cached_attention_sweep import AttentionShape
from ..kernels.sweeps.decode_gemm_sweep import GemmShape
from ..kernels.sweeps.tune import TuneShapes
from .llama import ModelArgs
from .loader import checkpoint_dtype, read_model_config
from .registry import resolve_architecture

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # what the GPU kernels are tuned for


def decode_gemm_shapes(args: ModelArgs) -> tuple[GemmShape, ...]:
    """The decode projections' weights [N, K] of one rank (`args` already sharded): fused QKV and gate/up, O, down
    and the LM head's vocabulary shard; a shape that two projections share is listed once."""
    h, d = args.hidden_size, args.head_dim
    shapes = [GemmShape("qkv", args.q_size + 2 * args.kv_size, h, (args.num_heads, args.num_kv_heads, d)),
              GemmShape("o", h, args.q_size), GemmShape("gate_up", 2 * args.intermediate_size, h),
              GemmShape("down", h, args.intermediate_size), GemmShape("lm_head", args.vocab_shard, h)]
    seen: set[tuple[int, int]] = set()
    return tuple(s for s in shapes if (s.n, s.k) not in seen and not seen.add((s.n, s.k)))


def resolve_dtype(dtype: str | torch.dtype | None, hf_config: object) -> torch.dtype:
    """float16 / bfloat16 as asked, else what the engine picks for this checkpoint on a GPU."""
    if dtype is None:
        return checkpoint_dtype(hf_config, torch.device("cuda"))
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: the GPU kernels are tuned for {sorted(DTYPES)}")
    return resolved


def model_shapes(model: str, tensor_parallel_size: int = 1, dtype: str | torch.dtype | None = None) -> TuneShapes:
    """The decode GEMM shapes, attention heads and dtype that `model` (a preset name, checkpoint directory or .gguf
    file) runs on each of `tensor_parallel_size` ranks, from its config only. Raises ValueError (ModelLoadError for
    an unreadable model) naming a tensor-parallel size that does not divide the heads or the MLP, or a bad dtype."""
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r} must be an int >= 1")
    hf_config = read_model_config(model)
    resolve_architecture(hf_config)
    args = ModelArgs.from_hf(hf_config).sharded(0, tensor_parallel_size)
    attention = AttentionShape(args.num_heads, args.num_kv_heads, args.head_dim)
    return TuneShapes(decode_gemm_shapes(args), attention, resolve_dtype(dtype, hf_config))
