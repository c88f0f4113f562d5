"""Decode projections (M = 1..32) on the GPU: the batch-invariant decode GEMM (hybrid_engine/kernels/decode_gemm.py)
per config vs cuBLAS (F.linear) and, at M = 1, the Triton GEMV (gemv.py with its table config); LLaMA-2-7B shapes.

    PYTHONPATH=. python3 benchmarks/decode_gemm_bench.py [--shapes "N,K;N,K"] [--quick] [--json out.json]

Each number is us per call from one CUDA graph of REPS back-to-back calls, each call on its own weight copy (copies
rotate past L2, so the weight comes from HBM), median of several replays (gemv_bench.graph_us). GB/s = weight
bytes / time. Every config is checked against the fp32 reference and for batch invariance (each of the 32 rows
alone equals its row of the 32-row call, bitwise) before it is timed; a wrong, non-invariant or failing config
(e.g. too much shared memory) is recorded and skipped.

The sweep, pruned to stay within a few minutes (compiles run first in parallel worker processes, which fill
Triton's disk cache):
  1. (BLOCK_N 16/32/64) x (BLOCK_K 64..512) x (SPLIT_K 1/2/4/8) at num_warps 4, num_stages 3, where a split leaves
     >= 2 BLOCK_K steps per split and 132..2112 programs at M <= 16 (split 1 always), and a stage's tiles fit
     160 KB of shared memory with the fused variants' second weight tile;
  2. num_warps 4/8 x num_stages 2/3/4 for the TOP best of step 1 (num_warps 8 only for BLOCK_N x BLOCK_K >= 8192,
     num_stages 4 only for BLOCK_K <= 256);
  3. the fused epilogues for the TOP best plain configs: SiLU-mul on gate/up, rope + KV store on QKV, against the
     plain decode GEMM + silu_mul / rope_store_kv kernels.
Rule: per shape the config with the least sum of us over M in RULE_MS; for QKV and gate/up the sum of the fused
variant (what the model will run). The JSON holds every timing, the failures, and `paste`, the
DECODE_GEMM_CONFIGS entries as Python text.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_bench import REPS, graph_us  # noqa: E402

from hybrid_engine.kernels import decode_gemm as dg  # noqa: E402
from hybrid_engine.kernels import gemv, tuning  # noqa: E402

SHAPES = {(12288, 4096): "qkv", (4096, 4096): "o", (22016, 4096): "gate_up", (4096, 11008): "down",
          (32000, 4096): "lm_head"}
HEADS, HEAD_DIM = 32, 128  # LLaMA-2-7B: the QKV shape's heads (Hq = Hkv)
MS = (1, 2, 4, 8, 16, 32)
RULE_MS = (1, 8, 32)  # one of each Triton specialisation of M (== 1, neither, multiple of 16)
TOP = 3
SMS = 132
DTYPE = torch.float16
DEVICE = "cuda"


def stage1_configs(n: int, k: int, quick: bool) -> list[tuple[int, int, int, int, int]]:
    out = []
    for bn, bk, split in itertools.product((16, 32) if quick else (16, 32, 64), (128, 256) if quick else
                                           (64, 128, 256, 512), (1, 2, 4, 8)):
        programs = -(-n // bn) * split
        if split > 1 and (k / split < 2 * bk or not SMS <= programs <= 16 * SMS):
            continue
        if (16 + 2 * bn) * bk * 2 * 3 <= 160 * 1024:
            out.append((bn, bk, split, 4, 3))
    return out


def stage2_configs(best: list[tuple[int, ...]]) -> list[tuple[int, int, int, int, int]]:
    out = []
    for bn, bk, split, _, _ in best:
        for nw, ns in itertools.product((4, 8), (2, 3, 4)):
            if (nw == 8 and bn * bk < 8192) or (ns == 4 and bk > 256) or (16 + 2 * bn) * bk * 2 * ns > 160 * 1024:
                continue
            if (bn, bk, split, nw, ns) not in best:
                out.append((bn, bk, split, nw, ns))
    return out


# --- Inputs and the variants ---------------------------------------------------------------------------------------

def rope_inputs() -> tuple:
    d = HEAD_DIM
    freqs = torch.outer(torch.arange(4096, dtype=torch.float), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)
    kc = torch.zeros(256, 16, HEADS, d, device=DEVICE, dtype=DTYPE)
    return cos_sin, kc, torch.zeros_like(kc)


def _pos_slots(m: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and cache slots of rows first..first+m-1 of a batch (a row keeps its own in any subset)."""
    rows = torch.arange(first, first + m, device=DEVICE)
    return 100 + rows, 200 + rows


def variant(kind: str, x: torch.Tensor, rope: tuple, m: int, first: int = 0):
    """run(w, cfg) of one variant for the rows x (rows first.. of a batch): "plain", "silu" or "rope" (fused),
    "silu_unfused" and "rope_unfused" (the plain decode GEMM + the silu_mul / rope_store_kv kernel)."""
    from hybrid_engine.kernels.activation import silu_mul_triton
    from hybrid_engine.kernels.rope import rope_store_kv_triton

    cos_sin, kc, vc = rope
    pos, slots = _pos_slots(m, first)

    def unfused_rope(w, c):
        qkv = dg.decode_gemm_triton(x, w, None, c).view(m, 3 * HEADS, HEAD_DIM)
        return rope_store_kv_triton(qkv[:, :HEADS], qkv[:, HEADS:2 * HEADS], qkv[:, 2 * HEADS:], pos, cos_sin, kc,
                                    vc, slots)[0]

    return {"plain": lambda w, c: dg.decode_gemm_triton(x, w, None, c),
            "silu": lambda w, c: dg.decode_silu_triton(x, w, c),
            "silu_unfused": lambda w, c: silu_mul_triton(dg.decode_gemm_triton(x, w, None, c)),
            "rope": lambda w, c: dg.decode_rope_store_triton(x, w, None, pos, cos_sin, kc, vc, slots, HEADS, HEADS,
                                                             c),
            "rope_unfused": unfused_rope}[kind]


def reference(kind: str, x: torch.Tensor, w: torch.Tensor, rope: tuple, m: int) -> torch.Tensor:
    if kind.startswith("silu"):
        return dg.linear_silu_mul_ref(x, w).float()
    if kind.startswith("rope"):
        cos_sin, kc, vc = rope
        pos, slots = _pos_slots(m, 0)
        return dg.linear_rope_store_ref(x, w, None, pos, cos_sin, kc.clone(), vc.clone(), slots, HEADS,
                                        HEADS).float()
    return dg.linear_ref(x, w).float()


def check(kind: str, x32: torch.Tensor, w: torch.Tensor, cfg: tuple, rope: tuple) -> str | None:
    """None if the variant is right on 32 rows and each row alone equals its row of the 32-row call; else why."""
    out = variant(kind, x32, rope, 32)(w, cfg)
    ref = reference(kind, x32, w, rope, 32)
    err = (out.float() - ref).abs().max().item()
    if not err <= 4e-3 * max(1.0, ref.abs().max().item()):
        return f"wrong: max err {err:.3g}"
    for i in (0, 13, 31):
        if not torch.equal(variant(kind, x32[i:i + 1], rope, 1, first=i)(w, cfg), out[i:i + 1]):
            return f"not batch-invariant: row {i} alone differs"
    return None


# --- Parallel compile (fills Triton's disk cache) -------------------------------------------------------------------

def _compile_job(job: tuple) -> tuple[tuple, str | None]:
    """Worker: run the variant once per Triton specialisation of M on the real shape (compiles and caches)."""
    kind, n, k, cfg = job
    try:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
        rope = rope_inputs()
        for m in RULE_MS:
            variant(kind, torch.randn(m, k, device=DEVICE, dtype=DTYPE), rope, m)(w, cfg)
        torch.cuda.synchronize()
        return job, None
    except Exception as e:  # noqa: BLE001 - a config may not compile or launch (shared memory, registers)
        return job, f"{type(e).__name__}: {str(e)[:200]}"


def precompile(pool: ProcessPoolExecutor | None, jobs: list[tuple]) -> dict[tuple, str]:
    if pool is None or not jobs:
        return {}
    return {job: err for job, err in pool.map(_compile_job, jobs, chunksize=2) if err is not None}


# --- The sweep ------------------------------------------------------------------------------------------------------

class ShapeBench:
    """Weight copies, inputs and the results of one (N, K)."""

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k, self.name = n, k, SHAPES.get((n, k), f"{n}x{k}")
        torch.manual_seed(0)
        self.ws = [torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02 for _ in range(REPS)]
        self.xs = {m: torch.randn(m, k, device=DEVICE, dtype=DTYPE) for m in MS}
        self.rope = rope_inputs()
        self.times: dict[str, dict[str, dict[int, float]]] = {}  # kind -> str(cfg) -> M -> us
        self.failed: dict[str, str] = {}

    def time(self, kind: str, cfg: tuple, ms=RULE_MS, known_bad: dict | None = None) -> float | None:
        """Sum over `ms` of us per call (recorded per M), or None (recorded in `failed`)."""
        key = f"{kind} {cfg}"
        why = (known_bad or {}).get((kind, self.n, self.k, cfg))
        try:
            why = why or check(kind, self.xs[32], self.ws[0], cfg, self.rope)
            if why is None:
                per_m = self.times.setdefault(kind, {}).setdefault(str(cfg), {})
                for m in ms:
                    run = variant(kind, self.xs[m], self.rope, m)
                    per_m[m] = graph_us(lambda i, r=run: r(self.ws[i], cfg))
                return sum(per_m[m] for m in RULE_MS if m in per_m)
        except Exception as e:  # noqa: BLE001 - a config may fail to compile or launch
            why = f"{type(e).__name__}: {str(e)[:200]}"
        self.failed[key] = why
        print(f"  {self.name} {key}: skipped ({why})")
        return None

    def baselines(self) -> None:
        self.times["cublas"] = {"F.linear": {m: graph_us(lambda i, x=self.xs[m]: F.linear(x, self.ws[i]))
                                             for m in MS}}
        cfg = gemv.GEMV_CONFIGS.get((self.n, self.k)) or gemv.DEFAULT_CONFIG
        self.times["gemv"] = {str(cfg): {1: graph_us(lambda i: gemv.gemv_triton(self.xs[1], self.ws[i], None, cfg))}}


def best(scores: dict[tuple, float], top: int) -> list[tuple]:
    return sorted(scores, key=scores.get)[:top]


def sweep_shape(sb: ShapeBench, pool, quick: bool) -> dict:
    sb.baselines()
    fused = {"qkv": "rope", "gate_up": "silu"}.get(sb.name)
    stage1 = stage1_configs(sb.n, sb.k, quick)
    bad = precompile(pool, [("plain", sb.n, sb.k, c) for c in stage1])
    scores = {c: s for c in stage1 if (s := sb.time("plain", c, known_bad=bad)) is not None}
    stage2 = stage2_configs(best(scores, TOP))
    bad = precompile(pool, [("plain", sb.n, sb.k, c) for c in stage2])
    scores.update({c: s for c in stage2 if (s := sb.time("plain", c, known_bad=bad)) is not None})
    chosen = best(scores, 1)[0]
    result = {"plain_best": chosen, "plain_sum_us": scores[chosen]}
    if fused:
        finalists = best(scores, TOP)
        jobs = [(kind, sb.n, sb.k, c) for c in finalists for kind in (fused, fused + "_unfused")]
        bad = precompile(pool, jobs)
        fused_scores = {c: s for c in finalists if (s := sb.time(fused, c, MS, known_bad=bad)) is not None}
        for c in finalists:
            sb.time(fused + "_unfused", c, MS, known_bad=bad)
        if fused_scores:
            chosen = best(fused_scores, 1)[0]
            result.update(fused=fused, fused_best=chosen, fused_sum_us=fused_scores[chosen])
    timed = sb.times["plain"][str(chosen)]
    sb.time("plain", chosen, [m for m in MS if m not in timed])  # the chosen config at every decode bucket
    result["chosen"] = chosen
    return result


def print_shape(sb: ShapeBench, res: dict) -> None:
    nbytes = sb.n * sb.k * 2
    rows = [("cuBLAS", sb.times["cublas"]["F.linear"]), ("GEMV " + next(iter(sb.times["gemv"])),
                                                          next(iter(sb.times["gemv"].values()))),
            (f"decode {res['chosen']}", sb.times["plain"][str(res["chosen"])])]
    if "fused" in res:
        for kind in (res["fused"], res["fused"] + "_unfused"):
            if str(res["chosen"]) in sb.times.get(kind, {}):
                rows.append((f"{kind} {res['chosen']}", sb.times[kind][str(res["chosen"])]))
    print(f"\n{sb.name} N={sb.n} K={sb.k} ({nbytes / 1e6:.0f} MB): us per call / GB/s")
    print(f"{'':>36}" + "".join(f"{'M=' + str(m):>16}" for m in MS))
    for label, per_m in rows:
        cells = "".join(f"{per_m[m]:8.2f} {nbytes / per_m[m] / 1e3:6.0f} " if m in per_m else f"{'-':>16}"
                        for m in MS)
        print(f"{label:>36}{cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", help='"N,K;N,K" (default: the LLaMA-2-7B decode shapes)')
    p.add_argument("--quick", action="store_true", help="a smaller stage-1 grid")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="parallel compile processes (0: compile in this process)")
    p.add_argument("--json")
    p.add_argument("--no-save", action="store_true",
                   help="do not write the chosen configs to the user tuning cache (kernels/tuning.py), which the "
                        "engine reads on this card")
    args = p.parse_args()
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")] if args.shapes
              else list(SHAPES))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  rule: min sum of us over M in "
          f"{RULE_MS} (fused variant for qkv / gate_up)")
    pool = (ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) if args.workers > 0 else None)
    report, paste = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rule_ms": RULE_MS,
                     "shapes": {}}, []
    try:
        for n, k in shapes:
            sb = ShapeBench(n, k)
            res = sweep_shape(sb, pool, args.quick)
            print_shape(sb, res)
            report["shapes"][f"{n},{k}"] = {"name": sb.name, **res, "times_us": sb.times, "failed": sb.failed}
            cub = sb.times["cublas"]["F.linear"]
            mine = sb.times[res.get("fused", "plain")][str(res["chosen"])]
            paste.append(f"    ({n}, {k}): {tuple(res['chosen'])},  # {sb.name}, us M=1/8/32: "
                         + "/".join(f"{mine[m]:.1f}" for m in RULE_MS) + " vs cuBLAS "
                         + "/".join(f"{cub[m]:.1f}" for m in RULE_MS))
            if not args.no_save:  # shape by shape: what a time limit cuts off leaves the earlier shapes saved
                tuning.save("decode_gemm", {tuning.shape_key(n, k, dtype=torch.float16): res["chosen"]},
                            torch.cuda.get_device_name())
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
