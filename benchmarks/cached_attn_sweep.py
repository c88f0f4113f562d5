"""Cached-prefill attention configs on the GPU: µs per call from CUDA-graph replays, LLaMA-2-7B heads (32 x 128,
fp16), a paged cache of 16-token blocks behind a block table for 4,096 positions (random, non-contiguous blocks),
new-token counts x cached starts.

    PYTHONPATH=. python3 benchmarks/cached_attn_sweep.py [--tokens 32,96,144,256,512] [--starts 0,480,1000,2000]
        [--budget-s 170] [--json out.json]

The sweep (its two phases within --budget-s, its checks and its rule) is the package's, hybrid_engine/kernels/
sweeps/cached_attention_sweep.py, which `hybrid-engine tune` runs on a model's heads; this script runs it on the
LLaMA-2-7B heads, prints the best configs per (tokens, start) and the CACHED_CONFIGS to paste, and writes the JSON.
Each recommendation is saved to the user tuning cache unless --no-save.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_engine.kernels import cached_prefill_attention as cpa  # noqa: E402
from hybrid_engine.kernels import tuning  # noqa: E402
from hybrid_engine.kernels._workspace import sm_count  # noqa: E402
from hybrid_engine.kernels.sweeps.cached_attention_sweep import (BLOCK_SIZE, CAPACITY, AttentionShape,  # noqa: E402
                                                                 Sweep, recommend, sweep_tokens)

HEADS, DIM = 32, 128
DEVICE = torch.device("cuda")


def _report(t: int, times: dict[int, dict], fixed: dict[str, tuple]) -> dict:
    cfg, worst = recommend(times)
    for start, res in times.items():
        ranked = sorted(res.items(), key=lambda kv: kv[1])
        line = "  ".join(f"{c}:{u:.1f}" for c, u in ranked[:5])
        base = "  ".join(f"{name} {c}:{res[c]:.1f}" for name, c in fixed.items() if c in res)
        print(f"T={t:4d} start={start:5d} best {line}\n{'':17s}{base}", flush=True)
    if cfg is not None:
        per_start = ", ".join(f"{s}: {times[s][cfg]:.1f} us ({32 * times[s][cfg] / 1e3:.2f} ms / 32 layers)"
                              for s in times)
        print(f"T={t:4d} recommended {cfg} (worst {worst:.2f}x the best per start): {per_start}", flush=True)
    return {"tokens": t, "recommended": cfg, "worst_ratio": worst, "fixed": {k: str(v) for k, v in fixed.items()},
            "by_start": {s: sorted(((str(c), round(u, 2)) for c, u in res.items()), key=lambda x: x[1])
                         for s, res in times.items()}}


def _table(rows: list[dict]) -> str:
    """CACHED_CONFIGS literal; SPLITS converted to the table's reference (TUNED_HEADS heads on TUNED_SMS SMs)."""
    sms = sm_count(DEVICE)
    done = [r for r in rows if r["recommended"] is not None]
    entries = []
    for i, row in enumerate(done):
        *tile, splits = row["recommended"]
        tuned = max(1, round(splits * HEADS * sms / (cpa.TUNED_HEADS * cpa.TUNED_SMS)))
        entries.append(f"({row['tokens'] if i < len(done) - 1 else '1 << 30'}, {(*tile, tuned)})")
    return "CACHED_CONFIGS = [" + ", ".join(entries) + "]"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="32,96,144,256,512")
    p.add_argument("--starts", default="0,480,1000,2000")
    p.add_argument("--budget-s", type=float, default=170.0)
    p.add_argument("--json")
    p.add_argument("--no-save", action="store_true",
                   help="do not write the recommended configs to the user tuning cache (kernels/tuning.py)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    starts = [int(s) for s in args.starts.split(",")]
    sweep, rows = Sweep(AttentionShape(HEADS, HEADS, DIM), args.budget_s), []
    for t in [int(v) for v in args.tokens.split(",")]:
        rows.append(_report(t, *sweep_tokens(sweep, t, starts)))
        if rows[-1]["recommended"] is not None and not args.no_save:  # the engine on this card reads it
            tuning.save("cached_attention", {tuning.shape_key(t, HEADS, DIM, dtype=torch.float16):
                                             rows[-1]["recommended"]}, torch.cuda.get_device_name())
    print(_table(rows))
    if sweep.skipped:
        print(f"budget of {args.budget_s:.0f} s spent: {sweep.skipped} measurements skipped")
    if sweep.failed:
        print(f"{len(sweep.failed)} configs failed to compile or run: {sorted(sweep.failed)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "sms": sm_count(DEVICE), "heads": HEADS,
            "head_dim": DIM, "block_size": BLOCK_SIZE, "capacity": CAPACITY, "rows": rows, "table": _table(rows),
            "failed": sweep.failed, "max_abs_error": sweep.errors, "skipped": sweep.skipped}, indent=1))


if __name__ == "__main__":
    main()
