"""Decode projections (M = 1..32) on the GPU: the batch-invariant decode GEMM (hybrid_engine/kernels/decode_gemm.py)
per config vs cuBLAS (F.linear) and, at M = 1, the Triton GEMV (gemv.py with its table config); LLaMA-2-7B shapes.

    PYTHONPATH=. python3 benchmarks/decode_gemm_bench.py [--shapes "N,K;N,K"] [--quick] [--json out.json]

The sweep (its pruned search, its checks and its rule) is the package's, hybrid_engine/kernels/sweeps/
decode_gemm_sweep.py, which `hybrid-engine tune` runs on a model's shapes; this script runs it on fixed shapes and
prints per-shape tables of us per call and GB/s (weight bytes / time). The JSON holds every timing, the failures,
and `paste`, the DECODE_GEMM_CONFIGS entries as Python text. Each choice is saved to the user tuning cache unless
--no-save.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_engine.kernels import tuning  # noqa: E402
from hybrid_engine.kernels._workspace import sm_count  # noqa: E402
from hybrid_engine.kernels.sweeps.decode_gemm_sweep import (MS, RULE_MS, GemmShape, ShapeBench,  # noqa: E402
                                                            chosen_us, sweep_shape)

HEADS = (32, 32, 128)  # LLaMA-2-7B: the QKV shape's (query heads, KV heads, head_dim)
SHAPES = {(12288, 4096): GemmShape("qkv", 12288, 4096, HEADS), (4096, 4096): GemmShape("o", 4096, 4096),
          (22016, 4096): GemmShape("gate_up", 22016, 4096), (4096, 11008): GemmShape("down", 4096, 11008),
          (32000, 4096): GemmShape("lm_head", 32000, 4096)}


def print_shape(sb: ShapeBench, res: dict) -> None:
    s = sb.shape
    nbytes = s.n * s.k * 2
    rows = [("cuBLAS", sb.times["cublas"]["F.linear"]), ("GEMV " + next(iter(sb.times["gemv"])),
                                                          next(iter(sb.times["gemv"].values()))),
            (f"decode {res['chosen']}", sb.times["plain"][str(res["chosen"])])]
    if "fused" in res:
        for kind in (res["fused"], res["fused"] + "_unfused"):
            if str(res["chosen"]) in sb.times.get(kind, {}):
                rows.append((f"{kind} {res['chosen']}", sb.times[kind][str(res["chosen"])]))
    print(f"\n{s.name} N={s.n} K={s.k} ({nbytes / 1e6:.0f} MB): us per call / GB/s")
    print(f"{'':>36}" + "".join(f"{'M=' + str(m):>16}" for m in MS))
    for label, per_m in rows:
        cells = "".join(f"{per_m[m]:8.2f} {nbytes / per_m[m] / 1e3:6.0f} " if m in per_m else f"{'-':>16}"
                        for m in MS)
        print(f"{label:>36}{cells}")


def paste_line(sb: ShapeBench, res: dict) -> str:
    cub, mine = sb.times["cublas"]["F.linear"], chosen_us(sb, res)
    return (f"    ({sb.shape.n}, {sb.shape.k}): {tuple(res['chosen'])},  # {sb.shape.name}, us M=1/8/32: "
            + "/".join(f"{mine[m]:.1f}" for m in RULE_MS) + " vs cuBLAS " + "/".join(f"{cub[m]:.1f}" for m in RULE_MS))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", help='"N,K;N,K" (default: the LLaMA-2-7B decode shapes)')
    p.add_argument("--quick", action="store_true", help="a smaller stage-1 grid")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="parallel compile processes (0: compile in this process)")
    p.add_argument("--json")
    p.add_argument("--no-save", action="store_true",
                   help="do not write the chosen configs to the user tuning cache (kernels/tuning.py), which the "
                        "engine reads on this card")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")] if args.shapes
              else list(SHAPES))
    device = torch.cuda.get_device_name()
    print(f"device: {device}  torch {torch.__version__}  rule: min sum of us over M in "
          f"{RULE_MS} (fused variant for qkv / gate_up)")
    pool = (ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) if args.workers > 0 else None)
    report, paste = {"device": device, "torch": torch.__version__, "rule_ms": RULE_MS, "shapes": {}}, []
    try:
        for n, k in shapes:
            sb = ShapeBench(SHAPES.get((n, k), GemmShape(f"{n}x{k}", n, k)))
            res = sweep_shape(sb, pool, args.quick, sm_count(torch.device("cuda")))
            report["shapes"][f"{n},{k}"] = {"name": sb.shape.name, **(res or {"chosen": None}), "times_us": sb.times,
                                            "failed": sb.failed}
            if res is None:
                print(f"\n{sb.shape.name} N={n} K={k}: no config worked")
                continue
            print_shape(sb, res)
            paste.append(paste_line(sb, res))
            if not args.no_save:  # shape by shape: what a time limit cuts off leaves the earlier shapes saved
                tuning.save("decode_gemm", {tuning.shape_key(n, k, dtype=torch.float16): res["chosen"]}, device)
            del sb
            torch.cuda.empty_cache()
    finally:
        if pool is not None:
            pool.shutdown()
    report["paste"] = "DECODE_GEMM_CONFIGS = {\n" + "\n".join(paste) + "\n}"
    report["DECODE_GEMM_CONFIGS"] = {key: v["chosen"] for key, v in report["shapes"].items()}
    print("\n" + report["paste"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
