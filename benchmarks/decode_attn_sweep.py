"""Decode attention at batch 1 by the length up to which a sequence runs as one split (`single_split`) and by
whether a program loads its next key block early (`prefetch`), per head shape and cached length.

    python benchmarks/decode_attn_sweep.py --out decode_attn_sweep.json

Each number is us per call from one CUDA graph of calls, each on its own layer's cache (kernels/sweeps/timing.py),
checked against the fp32 reference first. `SINGLE_SPLIT_KEYS` and `PREFETCH_MAX_HEAD_DIM` in kernels/decode_attention.py
are chosen from this. (Its first run timed a minimum split length instead, the same kernel argument before the rule
changed: results/nvidia-h200-2026-11-30-decode-attention-min-split.json.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hybrid_engine.kernels.decode_attention import decode_attention_ref, decode_attention_triton, decode_launch_config
from hybrid_engine.kernels.sweeps.timing import REPS, graph_us

HEADS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128), "qwen2-7b": (28, 4, 128),
         "llama-3.2-1b": (32, 8, 64), "smollm2-135m": (9, 3, 64)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="16,80,200,300,500,700,1000,2000,4000")
    ap.add_argument("--single-splits", default="0,128,192,256")
    ap.add_argument("--models", default=",".join(HEADS))
    ap.add_argument("--prefetch", default="0,1", help="comma-separated 0 / 1: the next key block loaded early")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev, dtype, block = torch.device("cuda"), torch.float16, 16
    lengths = [int(x) for x in args.lengths.split(",")]
    mins = [int(x) for x in args.single_splits.split(",")]
    prefetches = [x.strip() == "1" for x in args.prefetch.split(",")]
    max_blocks = args.max_model_len // block
    result: dict = {"card": torch.cuda.get_device_name(), "reps": REPS, "max_model_len": args.max_model_len,
                    "us": {}}
    for model in args.models.split(","):
        hq, hkv, dim = HEADS[model]
        splits = decode_launch_config(hkv, max_blocks, block, dev)[0]
        g = torch.Generator(device=dev).manual_seed(0)
        caches = [(torch.randn(max_blocks + 1, block, hkv, dim, device=dev, dtype=dtype, generator=g),
                   torch.randn(max_blocks + 1, block, hkv, dim, device=dev, dtype=dtype, generator=g))
                  for _ in range(REPS)]
        table = torch.randperm(max_blocks, device=dev, generator=g).to(torch.int32)[None]
        q = torch.randn(1, hq, dim, device=dev, dtype=dtype, generator=g)
        rows = {}
        for n in lengths:
            lens = torch.tensor([n], device=dev, dtype=torch.int32)
            want = decode_attention_ref(q.float(), caches[0][0].float(), caches[0][1].float(), table, lens, dim ** -0.5)
            row = {}
            for pre in prefetches:
                for m in mins:
                    label = f"{m}{'+prefetch' if pre else ''}"
                    got = decode_attention_triton(q, *caches[0], table, lens, dim ** -0.5, single_split=m, prefetch=pre)
                    err = (got.float() - want).abs().max().item()
                    if err > 2e-2:
                        row[label] = f"wrong: {err:.3g}"
                        continue
                    row[label] = round(graph_us(lambda i: decode_attention_triton(
                        q, *caches[i], table, lens, dim ** -0.5, single_split=m, prefetch=pre)), 2)
            rows[n] = row
            print(model, f"splits={splits}", n, row, flush=True)
        result["us"][model] = {"num_splits": splits, "by_length": rows}
        del caches
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
