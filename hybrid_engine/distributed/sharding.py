"""Which part of each full (unsharded) weight a tensor-parallel rank holds (Megatron-style splits).

Column-parallel (output rows split): the q, k and v parts of `qkv_proj` (and their biases), the gate and up parts of
`gate_up_proj`. Row-parallel (input columns split, summed over ranks after the projection): `o_proj`, `down_proj`.
Vocab-parallel (rows split, the last shard padded with zero rows): `embed_tokens`, `lm_head`. Everything else (the
norms) is replicated. The rank's `ModelArgs` (`ModelArgs.sharded`) already hold the local sizes.
"""
from __future__ import annotations

import torch

from ..models.llama import ModelArgs


def split_of(args: ModelArgs, name: str, part: int | None) -> tuple[int, int, int] | None:
    """(dim, full size, local size) of native parameter `name` (part: index within a fused weight) under the
    rank's args; None when the rank holds the whole tensor."""
    if args.tp_size == 1:
        return None
    if ".qkv_proj." in name:
        local = args.q_size if part == 0 else args.kv_size
        return 0, local * args.tp_size, local
    if ".gate_up_proj." in name:
        return 0, args.intermediate_size * args.tp_size, args.intermediate_size
    if name.endswith(".o_proj.weight"):
        return 1, args.q_size * args.tp_size, args.q_size
    if name.endswith(".down_proj.weight"):
        return 1, args.intermediate_size * args.tp_size, args.intermediate_size
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return 0, args.vocab_size, args.vocab_shard
    return None


def take_shard(args: ModelArgs, name: str, part: int | None, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full tensor (vocab shards zero-padded to `vocab_shard` rows). A tensor that is already
    the rank's slice along the split dimension (read as a slice from its file, `slice_bounds`) is only padded."""
    bounds = slice_bounds(args, name, part)
    if bounds is None:
        return tensor
    dim, start, stop = bounds
    full, local = split_of(args, name, part)[1:]  # type: ignore[index]
    size = tensor.shape[dim]
    if size == full:
        tensor = tensor.narrow(dim, start, stop - start)
    elif size != stop - start:
        raise ValueError(f"tensor {name!r} has {size} along dim {dim}; tensor parallelism over {args.tp_size} "
                         f"ranks expects the full {full} (or this rank's {stop - start})")
    if stop - start == local:
        return tensor
    pad = list(tensor.shape)
    pad[dim] = local - (stop - start)
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)


def slice_bounds(args: ModelArgs, name: str, part: int | None) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the rows/columns of the full tensor this rank reads (to read only those from a file);
    None for the whole tensor."""
    split = split_of(args, name, part)
    if split is None:
        return None
    dim, full, local = split
    start = min(args.tp_rank * local, full)
    return dim, start, min(start + local, full)
