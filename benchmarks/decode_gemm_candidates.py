"""Candidate decode-GEMM configs for the LLaMA-2-7B shapes through the package's kernel: each checked against the fp32
product and for batch invariance on the card, then timed at M = 1..32 as the sweep times (one CUDA graph of 20 calls
on 20 weight copies); the plain kernel and the fused variant the model runs (rope + KV store on QKV, SiLU-mul on
gate/up). Picks per shape by the sweep's rule and saves to the user tuning cache when $HYBRID_ENGINE_TUNING_DIR is set.

    PYTHONPATH=. python benchmarks/decode_gemm_candidates.py     # writes $OUT/cands.json and $OUT/chosen.json

The candidates are the best of `decode_gemm_rows_probe.py sweep` (masked rows) and the earlier table's configs.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from hybrid_engine.kernels import tuning
from hybrid_engine.kernels.sweeps.decode_gemm_sweep import MS, RULE_MS, ShapeBench, rule_score
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from decode_gemm_bench import SHAPES

CANDS = {"qkv": [(64, 128, 1, 4, 3, 1), (64, 64, 1, 4, 5, 1), (64, 128, 1, 4, 4, 1), (64, 64, 1, 4, 4, 1)],
         "o": [(64, 128, 4, 4, 4, 1), (64, 256, 1, 4, 5, 1), (64, 256, 1, 4, 4, 1), (64, 128, 1, 4, 5, 1),
               (64, 128, 2, 4, 5, 1)],
         "gate_up": [(64, 128, 1, 4, 3, 1), (128, 64, 1, 4, 4, 1), (64, 128, 1, 4, 5, 1), (128, 128, 1, 4, 3, 1),
                     (128, 64, 1, 4, 3, 1), (64, 64, 1, 4, 5, 1)],
         "down": [(64, 128, 4, 4, 4, 1), (64, 256, 1, 4, 5, 1), (64, 256, 1, 4, 4, 1), (64, 128, 2, 4, 5, 1)],
         "lm_head": [(64, 128, 1, 4, 4, 1), (128, 64, 1, 4, 3, 1), (128, 128, 1, 8, 4, 1)]}
out = {}
for (n, k), shape in SHAPES.items():
    sb = ShapeBench(shape)
    sb.baselines()
    kinds = ["plain"] + ([shape.fused] if shape.fused else [])
    for cfg in CANDS[shape.name]:
        for kind in kinds:
            if kind == "rope" and not shape.fuses(cfg):
                continue
            sb.time(kind, cfg, MS)
    gemv = next(iter(sb.times["gemv"].values()))[1]
    print(f"{shape.name} gemv M=1 {gemv:.2f}", flush=True)
    for kind, per in sb.times.items():
        if kind in ("gemv", "cublas"):
            continue
        for c, tm in per.items():
            print(f"  {kind:6} {c:26} " + " ".join(f"{m}:{v:6.2f}" for m, v in sorted(tm.items())), flush=True)
    for key, why in sb.failed.items():
        print("  FAILED", key, why)
    out[shape.name] = {"times": sb.times, "failed": sb.failed}
    del sb
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "cands.json"), "w"), indent=1)

# choose per shape: the kind the model runs (fused where there is one), by the sweep's rule
chosen = {}
for (n, k), shape in SHAPES.items():
    times = out[shape.name]["times"]
    kind = shape.fused or "plain"
    per = times.get(kind, {})
    scored = {c: rule_score(tm) for c, tm in per.items() if all(m in tm for m in RULE_MS)}
    if not scored:
        continue
    best = min(scored, key=scored.get)
    cfg = [int(v) for v in best.strip("()").split(",")]
    chosen[tuning.shape_key(n, k, dtype=torch.float16)] = cfg
    print("chosen", shape.name, kind, best, {m: round(v, 2) for m, v in per[best].items()})
if os.environ.get("HYBRID_ENGINE_TUNING_DIR"):
    print("saved", tuning.save("decode_gemm", chosen, torch.cuda.get_device_name()))
json.dump(chosen, open(os.path.join(os.environ.get("OUT", "."), "chosen.json"), "w"), indent=1)
