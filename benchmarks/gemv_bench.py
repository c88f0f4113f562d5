"""M=1 projections on the GPU: cuBLAS (F.linear) vs the Triton GEMV (hybrid_engine/kernels/gemv.py), LLaMA-2-7B.

    PYTHONPATH=. python3 benchmarks/gemv_bench.py [--quick] [--json out.json]

Each number is µs per call from one CUDA graph of REPS back-to-back calls, each call on its own weight copy (copies
rotate past L2), median of several replays. TB/s = weight bytes / time. Sweeps Triton configs per shape, checks
each against the fp32 reference, prints the table and the GEMV_CONFIGS / SILU_GEMV_CONFIGS entries to paste.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_engine.kernels import gemv  # noqa: E402
# graph_us lives in the package (the tuning sweeps use it); the other benchmarks import it from here
from hybrid_engine.kernels.sweeps.timing import REPS, graph_us  # noqa: E402,F401

SHAPES = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008),
          ("lm_head", 32000, 4096)]
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = [(4, 512, 4, 1), (4, 1024, 4, 1), (8, 256, 4, 1), (8, 512, 4, 1), (8, 512, 4, 3), (8, 1024, 4, 1),
           (8, 1024, 8, 1), (16, 256, 4, 1), (16, 512, 4, 1), (16, 512, 8, 1), (16, 512, 4, 3), (16, 1024, 8, 1),
           (32, 256, 4, 1), (32, 256, 8, 1), (32, 512, 8, 1), (2, 1024, 4, 1), (4, 2048, 8, 1), (64, 128, 8, 1)]
# split-K (5th element) and long-row configs, for the shapes with few output rows (O, down)
CONFIGS += [(8, 1024, 4, 1, 2), (4, 1024, 4, 1, 2), (8, 512, 4, 1, 2), (16, 1024, 8, 1, 2), (8, 1024, 4, 1, 3),
            (4, 512, 4, 1, 4), (16, 512, 4, 1, 4), (2, 2048, 4, 1), (1, 2048, 4, 1), (4, 2048, 4, 1),
            (8, 2048, 8, 1), (1, 4096, 4, 1), (2, 1024, 2, 1), (4, 1024, 8, 1)]
QUICK = [(8, 512, 4, 1), (16, 512, 4, 1), (4, 1024, 4, 1), (16, 256, 4, 1), (32, 256, 8, 1)]


def bench_rope_store() -> None:
    """Decode (1 token) and 16-token prefill, LLaMA-2-7B heads: rope + store_kv vs the fused kernel."""
    from hybrid_engine.kernels.kv_store import store_kv_triton
    from hybrid_engine.kernels.rope import rope_store_kv_triton, rope_triton

    for tokens in (1, 16):
        qkv = torch.randn(tokens, 3 * 4096, device="cuda", dtype=torch.float16)
        q, k, v = (t.view(tokens, 32, 128) for t in qkv.split([4096, 4096, 4096], dim=-1))
        cache = torch.randn(4096, 128, device="cuda")
        kc = torch.zeros(64, 16, 32, 128, device="cuda", dtype=torch.float16)
        vc = torch.zeros_like(kc)
        pos = torch.arange(100, 100 + tokens, device="cuda")
        slots = torch.arange(200, 200 + tokens, device="cuda")

        def unfused(i):
            rope_triton(q, k, pos, cache)
            store_kv_triton(k, v, kc, vc, slots)

        a = graph_us(unfused)
        b = graph_us(lambda i: rope_store_kv_triton(q, k, v, pos, cache, kc, vc, slots))
        print(f"rope+store_kv tokens={tokens}: unfused {a:.2f} us, fused {b:.2f} us")


def sweep_fused(what: str, table: str, key: tuple[int, int], configs: list[tuple[int, ...]], unfused_us: float,
                unfused_desc: str, ref: torch.Tensor, run) -> dict:
    """Time `run(i, cfg)` (call i reads weight copy i) per config after checking `run(0, cfg)` against `ref`; print
    the ranking against the unfused pair and the table entry to paste (None unless 1% faster)."""
    fused = {}
    for cfg in configs:
        try:
            err = (run(0, cfg).float() - ref).abs().max().item()
            if err > 4e-3 * max(1.0, ref.abs().max().item()):
                print(f"  {what} {cfg}: WRONG err {err}")
                continue
            fused[cfg] = graph_us(lambda i, c=cfg: run(i, c))
        except Exception as e:  # noqa: BLE001 - a config may not compile (registers)
            print(f"  {what} {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
    best = min(fused, key=fused.get)
    print(f"{what}: unfused {unfused_us:.2f} us ({unfused_desc}), fused {fused[best]:.2f} us {best}")
    for c, v in sorted(fused.items(), key=lambda kv: kv[1]):
        print(f"           {str(c):>20} {v:8.2f} us")
    print(f"{table} =", {key: best if fused[best] < unfused_us * 0.99 else None})
    return {"unfused_us": unfused_us, "fused_us": {str(c): v for c, v in fused.items()}, "best": best}


GATE_UP_SILU = [(1, 2048, 4, 1), (2, 2048, 4, 1), (2, 2048, 8, 1), (4, 2048, 4, 1), (4, 2048, 8, 1),
                (2, 1024, 4, 1), (4, 1024, 4, 1), (8, 1024, 8, 1), (2, 4096, 8, 1), (8, 512, 4, 1)]


def bench_gate_up_silu(n: int = 22016, k: int = 4096) -> dict:
    """Gate/up GEMV + silu_mul kernel (today's decode) vs the GEMV with SiLU-mul in its epilogue, per config."""
    from hybrid_engine.kernels.activation import silu_mul_triton

    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(REPS)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    unfused = graph_us(lambda i: silu_mul_triton(gemv.linear(x, ws[i])))
    return sweep_fused("gate_up + silu_mul", "GATE_UP_SILU_CONFIGS", (n, k), GATE_UP_SILU, unfused,
                       f"GEMV {gemv.GEMV_CONFIGS.get((n, k))} + silu_mul kernel",
                       gemv.linear_silu_mul_ref(x, ws[0]).float(), lambda i, c: gemv.gemv_silu_triton(x, ws[i], c))


QKV_ROPE = [(1, 2048, 4, 1), (2, 2048, 4, 1), (2, 2048, 8, 1), (4, 2048, 4, 1), (4, 2048, 8, 1),
            (2, 1024, 4, 1), (4, 1024, 4, 1), (2, 4096, 8, 1), (1, 4096, 4, 1), (8, 1024, 8, 1)]


def bench_qkv_rope(heads: int = 32, head_dim: int = 128, k: int = 4096) -> dict:
    """Decode QKV: GEMV + rope/KV-store kernel (today's decode) vs the GEMV with rope + KV writes in its epilogue."""
    from hybrid_engine.kernels.rope import rope_store_kv_triton

    n = 3 * heads * head_dim
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(REPS)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    d = head_dim
    freqs = torch.outer(torch.arange(4096, dtype=torch.float), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).cuda()
    kc = torch.zeros(256, 16, heads, d, device="cuda", dtype=torch.float16)
    vc = torch.zeros_like(kc)
    pos, slot = torch.tensor([100], device="cuda"), torch.tensor([100], device="cuda")

    def unfused(i):
        qkv = gemv.linear(x, ws[i]).view(1, 3 * heads, d)
        rope_store_kv_triton(qkv[:, :heads], qkv[:, heads:2 * heads], qkv[:, 2 * heads:], pos, cos_sin, kc, vc, slot)

    ref = gemv.linear_rope_store_ref(x, ws[0], None, pos, cos_sin, kc.clone(), vc.clone(), slot, heads, heads)
    return sweep_fused("qkv + rope/KV store", "QKV_ROPE_CONFIGS", (n, k), QKV_ROPE, graph_us(unfused),
                       f"GEMV {gemv.GEMV_CONFIGS.get((n, k))} + rope_store kernel", ref.float(),
                       lambda i, c: gemv.gemv_rope_store_triton(x, ws[i], None, pos, cos_sin, kc, vc, slot, heads,
                                                                heads, c))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--rope", action="store_true", help="also time rope + store_kv vs the fused kernel")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--gate-up-silu", action="store_true", help="only: gate/up GEMV + silu_mul vs the fused epilogue")
    p.add_argument("--qkv-rope", action="store_true", help="only: QKV GEMV + rope/KV store vs the fused epilogue")
    args = p.parse_args()
    configs = QUICK if args.quick else CONFIGS
    if args.rope:
        bench_rope_store()
    if args.gate_up_silu or args.qkv_rope:
        res = bench_gate_up_silu() if args.gate_up_silu else bench_qkv_rope()
        if args.json:
            Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), **res}, indent=1,
                                                  default=str))
        return
    torch.manual_seed(0)
    dt = torch.float16
    results, table, silu_table = [], {}, {}
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'shape':>8} {'N':>6} {'K':>6} | {'cublas us':>9} {'TB/s':>5} | {'triton us':>9} {'TB/s':>5} "
          f"{'config':>20} | {'silu+gemv us':>12} {'vs silu+cublas':>14}")
    for name, n, k in SHAPES:
        if name not in args.shapes.split(","):
            continue
        ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(REPS)]
        x = torch.randn(1, k, device="cuda", dtype=dt)
        nbytes = n * k * 2
        ref = gemv.linear_ref(x, ws[0]).float()
        cub = graph_us(lambda i: F.linear(x, ws[i]))
        per_cfg = {}
        for cfg in configs:
            try:
                out = gemv.gemv_triton(x, ws[0], config=cfg).float()
                err = (out - ref).abs().max().item()
                if err > 4e-3 * max(1.0, ref.abs().max().item()):
                    print(f"  {name} {cfg}: WRONG err {err}")
                    continue
                per_cfg[cfg] = graph_us(lambda i, c=cfg: gemv.gemv_triton(x, ws[i], config=c))
            except Exception as e:  # noqa: BLE001 - a config may not compile (registers)
                print(f"  {name} {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
        best = min(per_cfg, key=per_cfg.get)
        row = {"shape": name, "N": n, "K": k, "cublas_us": cub, "cublas_tbs": nbytes / cub / 1e6,
               "triton_us": per_cfg[best], "triton_tbs": nbytes / per_cfg[best] / 1e6, "config": best,
               "all": {str(c): v for c, v in per_cfg.items()}}
        table[(n, k)] = best if per_cfg[best] < cub * 0.99 else None
        silu_txt = ""
        if name == "down":
            h = torch.randn(1, 2 * k, device="cuda", dtype=dt)
            from hybrid_engine.kernels.activation import silu_mul_triton

            unfused_cub = graph_us(lambda i: F.linear(silu_mul_triton(h), ws[i]))
            sref = gemv.silu_mul_linear_ref(h, ws[0]).float()
            fused = {}
            for cfg in sorted(per_cfg, key=per_cfg.get)[:5]:
                out = gemv.gemv_triton(h, ws[0], config=cfg, silu_mul=True).float()
                err = (out - sref).abs().max().item()
                if err > 4e-3 * max(1.0, sref.abs().max().item()):
                    print(f"  silu {cfg}: WRONG err {err}")
                    continue
                fused[cfg] = graph_us(lambda i, c=cfg: gemv.gemv_triton(h, ws[i], config=c, silu_mul=True))
            fb = min(fused, key=fused.get)
            row.update(silu_fused_us=fused[fb], silu_fused_config=fb, silu_cublas_us=unfused_cub)
            silu_table[(n, k)] = fb if fused[fb] < unfused_cub * 0.99 else None
            silu_txt = f"{fused[fb]:12.2f} {unfused_cub:14.2f} {fb}"
        results.append(row)
        print(f"{name:>8} {n:>6} {k:>6} | {cub:9.2f} {row['cublas_tbs']:5.2f} | {per_cfg[best]:9.2f} "
              f"{row['triton_tbs']:5.2f} {str(best):>20} | {silu_txt}")
        for c, v in sorted(per_cfg.items(), key=lambda kv: kv[1])[:6]:
            print(f"           {str(c):>20} {v:8.2f} us")
        del ws
        torch.cuda.empty_cache()
    print("GEMV_CONFIGS =", table)
    print("SILU_GEMV_CONFIGS =", silu_table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
