"""Write a random-weight preset as a checkpoint directory, as `save_pretrained` leaves a real one: safetensors
shards with their index, config.json and the tokenizer. For load-time measurements of the checkpoint path
(`load_to_ready.py --model DIR`), where the presets draw their weights on the card instead of reading them.

    python benchmarks/shape_checkpoint.py --model llama-2-7b-shape --out /tmp/llama-2-7b-shape [--dtype float16]

The weights are a seeded draw of the preset's shape (`presets.build_hf_model`, made on the card when there is one).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hybrid_engine.models.presets import PRESETS, build_hf_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-2-7b-shape", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if os.path.exists(args.out) and os.listdir(args.out):
        raise SystemExit(f"--out {args.out!r} exists and is not empty; give a new directory")
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = build_hf_model(args.model, getattr(torch, args.dtype), device, args.seed)
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
