"""Kernels of one graph-replayed decode step per model: count, GPU busy and idle time, and time by kernel name.

    python benchmarks/decode_profile.py --models llama-3.2-1b-shape,smollm2-135m-shape --out decode_profile.json

Run it with HYBRID_ENGINE_PDL=0 for each kernel's own duration: with programmatic dependent launch a kernel starts
while its predecessor runs and waits inside, so its profiled duration includes that wait. One fresh engine per
model, every graph captured before the profiled request (`capture="eager"`); the engine's default decode
projections (batch-invariant), or the one-row GEMVs with `--no-batch-invariant`.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from hybrid_engine import LLM
from hybrid_engine.bench.systems import HybridSystem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.2-1b-shape,smollm2-135m-shape", help="comma-separated presets")
    ap.add_argument("--prompt-len", type=int, default=57)
    ap.add_argument("--tokens", type=int, default=24, help="decode steps in the profiled request")
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                    help="EngineConfig.batch_invariant (default on, as the engine's)")
    ap.add_argument("--decode-buckets", default=None, help="EngineConfig.decode_buckets, comma-separated (e.g. 16)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    engine_kw = {"capture": "eager", "batch_invariant": args.batch_invariant}
    if args.decode_buckets:
        engine_kw["decode_buckets"] = tuple(int(b) for b in args.decode_buckets.split(","))
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "pdl_env": os.environ.get("HYBRID_ENGINE_PDL", "(default)"), "engine": engine_kw, "by_model": {}}
    for model in [m for m in args.models.split(",") if m]:
        system = HybridSystem(LLM(model, **engine_kw))
        try:
            ids = list(range(3, 3 + args.prompt_len))
            for _ in range(3):
                system.generate_e2e(ids, args.tokens)
            prof = system.step_profile(ids, args.tokens)  # with the PDL mode it ran under
            result["by_model"][model] = prof
            print(model, json.dumps(prof), flush=True)
        finally:
            system.close()
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
