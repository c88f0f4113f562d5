"""Prefill projections per row count on the GPU: every choice of the plan (cuBLAS, cuBLASLt, their transposed-copy
forms, the decode GEMM, Triton GEMM configs) for the LLaMA-2-7B shapes, and the plan chosen from them.

    PYTHONPATH=. python3 benchmarks/prefill_gemm_bench.py [--ms 16,64,96] [--shapes qkv,o] [--json out.json]
        [--budget-s 420] [--no-save]

The sweep and its rule are the package's (hybrid_engine/kernels/sweeps/prefill_gemm_sweep.py). Prints, per M, the
four projections of 32 layers summed (ms): cuBLAS alone, the plan in use before this run (`gemm.config_for` inside
`graph_plan`, with the weight copies the engine keeps), and the new plan. The chosen plan is saved to the user
tuning cache (family "prefill_gemm") unless --no-save.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_engine.kernels import gemm, tuning  # noqa: E402
from hybrid_engine.kernels.sweeps.prefill_gemm_sweep import (MS, GpuPrefillGemmBench, choice_at,  # noqa: E402
                                                             label, plan_from, sweep_shape)

# name, N, K, whether the model keeps a transposed copy (models/llama.py add_prefill_weight_copies)
SHAPES = [("qkv", 12288, 4096, True), ("o", 4096, 4096, False), ("gate_up", 22016, 4096, True),
          ("down", 4096, 11008, False)]
LAYERS = 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--budget-s", type=float, default=420.0, help="time limit; later measurements are skipped")
    p.add_argument("--json")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ms = tuple(int(v) for v in args.ms.split(","))
    device = torch.cuda.get_device_name()
    deadline = time.monotonic() + args.budget_s
    report: dict = {"device": device, "torch": torch.__version__, "shapes": {}}
    for name, n, k, transposed in SHAPES:
        if name not in args.shapes.split(","):
            continue
        t0 = time.monotonic()
        bench = GpuPrefillGemmBench(n, k, transposed, deadline=deadline)
        times = sweep_shape(bench, ms, transposed)
        with gemm.graph_plan():
            before = {m: label(gemm.config_for(m, n, k, transposed=transposed) or "cublas") for m in ms}
        plan = plan_from(times)
        report["shapes"][name] = {"N": n, "K": k, "transposed_copy": transposed, "times_us": times,
                                  "plan_before": before, "plan": plan, "failed": bench.failed,
                                  "skipped": bench.skipped, "seconds": round(time.monotonic() - t0, 1)}
        print(f"{name} {n}x{k}: plan {plan} ({report['shapes'][name]['seconds']} s, {len(bench.failed)} failed, "
              f"{bench.skipped} skipped)", flush=True)
        for m in ms:
            row = times[m]
            if row:
                best = min(row, key=row.get)
                print(f"  M={m:4d} cublas {row.get('cublas', float('nan')):7.2f}  before {before[m]:>24} "
                      f"{row.get(before[m], float('nan')):7.2f}  best {best:>24} {row[best]:7.2f}", flush=True)
        if not args.no_save and not bench.skipped:
            tuning.save("prefill_gemm", {tuning.shape_key(n, k, dtype=torch.float16): plan}, device)
        del bench
        torch.cuda.empty_cache()
    print("\nper prefill step, four projections x 32 layers (ms): M | cuBLAS | plan before | new plan")
    totals = {}
    for m in ms:
        sums = {"cublas": 0.0, "before": 0.0, "new": 0.0}
        for name, s in report["shapes"].items():
            row = s["times_us"][m]
            new = choice_at(s["plan"], m)
            sums["cublas"] += row.get("cublas", float("nan"))
            sums["before"] += row.get(s["plan_before"][m], float("nan"))
            sums["new"] += row.get(new, float("nan"))
        totals[m] = {key: round(v * LAYERS / 1e3, 3) for key, v in sums.items()}
        print(f"  {m:4d} | {totals[m]['cublas']:6.3f} | {totals[m]['before']:6.3f} | {totals[m]['new']:6.3f}")
    report["per_step_ms"] = totals
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
