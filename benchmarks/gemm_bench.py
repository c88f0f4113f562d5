"""Prefill projections on the GPU: cuBLAS (F.linear) vs the Triton GEMM (hybrid_engine/kernels/gemm.py), LLaMA-2-7B.

    PYTHONPATH=. python3 benchmarks/gemm_bench.py [--ms 16,64,224] [--json out.json]

Each number is µs per call from one CUDA graph of REPS back-to-back calls, each on its own weight copy (copies rotate
past L2), median of several replays (gemv_bench.graph_us). Sweeps Triton configs per (shape, M), checks each
against the fp32 reference, prints per-step GEMM totals (32 layers) and the GEMM_CONFIGS table to paste.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_bench import graph_us  # noqa: E402

from hybrid_engine.kernels import gemm  # noqa: E402
from hybrid_engine.kernels.gemv import linear_ref  # noqa: E402

SHAPES = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]
LAYERS = 32
MS = [16, 32, 64, 128, 192, 200, 208, 224, 256, 320, 512]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
SMALL = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 64, 4, 5), (32, 64, 128, 4, 4),
         (32, 128, 128, 4, 4), (32, 128, 64, 4, 5), (16, 256, 64, 4, 4), (32, 64, 256, 4, 3), (16, 32, 256, 4, 4)]
MID = [(64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (64, 256, 64, 8, 4), (128, 64, 64, 4, 4),
       (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 5),
       (128, 64, 128, 4, 3), (64, 64, 64, 4, 6)]
BIG = [(256, 128, 64, 8, 3), (256, 64, 64, 8, 4), (256, 128, 64, 8, 4)]


def configs_for(m: int) -> list[tuple[int, ...]]:
    if m <= 32:
        return SMALL
    if m <= 128:
        return MID + SMALL[4:7]
    return MID + BIG


def cublas_variants(ms: list[int], shapes: list[str], reps: int = 20) -> list[dict]:
    """The same product through cuBLAS's other doors: `linear` = F.linear (x @ W^T), `lt` = F.linear with a zero
    bias (cublasLt with a bias epilogue), `wx` = W @ x^T (the transposed output, no weight copy), `nn` = x @ W^T
    with W^T stored contiguous (how the engine stores QKV and gate/up on CUDA), `nn_lt` the same through F.linear
    with a zero bias (cublasLt), `xt` / `xt_lt` = x stored column-major (x^T contiguous); and the Triton GEMM's
    best config where M <= 64."""
    rows = []
    for name, n, k in SHAPES:
        if name not in shapes:
            continue
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(reps)]
        wts = [w.t().contiguous() for w in ws]
        zero = torch.zeros(n, device="cuda", dtype=torch.float16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xt = x.t().contiguous()  # the activation stored column-major
            r = {"shape": name, "M": m,
                 "linear": graph_us(lambda i: F.linear(x, ws[i]), reps=reps),
                 "lt": graph_us(lambda i: F.linear(x, ws[i], zero), reps=reps),
                 "wx": graph_us(lambda i: torch.mm(ws[i], x.t()), reps=reps),
                 "nn": graph_us(lambda i: torch.mm(x, wts[i]), reps=reps),
                 "nn_lt": graph_us(lambda i: F.linear(x, wts[i].t(), zero), reps=reps),
                 "xt": graph_us(lambda i: F.linear(xt.t(), ws[i]), reps=reps),
                 "xt_lt": graph_us(lambda i: F.linear(xt.t(), ws[i], zero), reps=reps)}
            if m <= 64:
                tri = {c: graph_us(lambda i, c=c: gemm.gemm_triton(x, ws[i], config=c), reps=reps)
                       for c in SMALL[:6] + MID[:3]}
                best = min(tri, key=tri.get)
                r.update(triton=tri[best], triton_config=best)
            rows.append({key: round(v, 2) if isinstance(v, float) else v for key, v in r.items()})
            print("  ".join(f"{key}={v}" for key, v in rows[-1].items()), flush=True)
        del ws, wts
        torch.cuda.empty_cache()
    for m in ms:
        sel = [r for r in rows if r["M"] == m]
        tot = {v: round(sum(r[v] for r in sel) * LAYERS / 1e3, 3)
               for v in ("linear", "lt", "wx", "nn", "nn_lt", "xt", "xt_lt")}
        best = round(sum(min(r["linear"], r["lt"], r.get("triton", 1e9)) for r in sel) * LAYERS / 1e3, 3)
        print(f"M={m}: per step (ms) {tot}, best of linear/lt/triton per shape {best}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--json")
    p.add_argument("--cublas-variants", action="store_true", help="compare cuBLAS entry points only")
    args = p.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    if args.cublas_variants:
        rows = cublas_variants(ms, args.shapes.split(","))
        if args.json:
            Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
        return
    torch.manual_seed(0)
    dt = torch.float16
    reps = 20
    rows, table = [], {}
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    for name, n, k in SHAPES:
        if name not in args.shapes.split(","):
            continue
        ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(reps)]
        entries = []
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dt)
            ref = linear_ref(x, ws[0]).float()
            tol = 4e-3 * max(1.0, ref.abs().max().item())
            cub = graph_us(lambda i: F.linear(x, ws[i]), reps=reps)
            per_cfg = {}
            for cfg in configs_for(m):
                try:
                    err = (gemm.gemm_triton(x, ws[0], config=cfg).float() - ref).abs().max().item()
                    if err > tol:
                        print(f"  {name} M={m} {cfg}: WRONG err {err}", flush=True)
                        continue
                    per_cfg[cfg] = graph_us(lambda i, c=cfg: gemm.gemm_triton(x, ws[i], config=c), reps=reps)
                except Exception as e:  # noqa: BLE001 - a config may not fit (shared memory, registers)
                    print(f"  {name} M={m} {cfg}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
            best = min(per_cfg, key=per_cfg.get) if per_cfg else None
            tri = per_cfg.get(best, float("inf"))
            wbytes = n * k * 2
            row = {"shape": name, "N": n, "K": k, "M": m, "cublas_us": round(cub, 2), "triton_us": round(tri, 2),
                   "config": best, "cublas_tbs": round(wbytes / cub / 1e6, 3),
                   "cublas_tflops": round(2 * m * n * k / cub / 1e6, 1),
                   "triton_tflops": round(2 * m * n * k / tri / 1e6, 1),
                   "top": {str(c): round(v, 2) for c, v in sorted(per_cfg.items(), key=lambda kv: kv[1])[:5]}}
            rows.append(row)
            entries.append((m, best if tri < cub * 0.98 else None))
            print(f"{name:>8} M={m:4d} cublas {cub:8.2f} us ({row['cublas_tflops']:6.1f} TF, "
                  f"{row['cublas_tbs']:.2f} TB/s) | triton {tri:8.2f} us ({row['triton_tflops']:6.1f} TF) "
                  f"{best} {'<-' if tri < cub * 0.98 else ''}", flush=True)
        table[(n, k)] = _ranges(entries)
        del ws
        torch.cuda.empty_cache()
    print("\nper prefill step, GEMMs of 32 layers (ms): M | cuBLAS | best of both")
    for m in ms:
        sel = [r for r in rows if r["M"] == m]
        cub = sum(r["cublas_us"] for r in sel) * LAYERS / 1e3
        best = sum(min(r["cublas_us"], r["triton_us"]) for r in sel) * LAYERS / 1e3
        print(f"  {m:4d} | {cub:6.3f} | {best:6.3f}")
    print("GEMM_CONFIGS =", {k: v for k, v in table.items() if v})
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "rows": rows, "table": {str(k): v for k, v in table.items()}},
                                              indent=1, default=str))


def _ranges(entries: list[tuple[int, tuple | None]]) -> list[tuple[int, tuple]]:
    """[(M, config-or-None)] in increasing M -> GEMM_CONFIGS ranges: the choice measured at M covers (previous M, M];
    trailing cuBLAS entries are dropped (above the last entry cuBLAS serves anyway)."""
    out = list(entries)
    while out and out[-1][1] is None:
        out.pop()
    return out


if __name__ == "__main__":
    main()
