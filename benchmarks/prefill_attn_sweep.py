"""Prefill attention tile configs on the GPU (LLaMA-2-7B heads, fp16): µs per call from CUDA-graph replays.

    PYTHONPATH=. python3 benchmarks/prefill_attn_sweep.py [--lengths 16,128,208,512] [--json out.json]

Prints, per prompt length, the configs ranked, each checked against SDPA, and the PREFILL_CONFIGS to paste.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_bench import graph_us  # noqa: E402

from hybrid_engine.kernels import prefill_attention as pa  # noqa: E402

CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2),
           (16, 32, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2), (32, 128, 4, 2),
           (16, 128, 4, 2), (64, 64, 8, 2)]


def _fused(t: int, heads: int, dim: int, configs: list) -> list:
    """The fused kernel (rope + KV-cache store + attention) over raw q/k/v views of one qkv buffer, vs the two
    unfused launches it replaces (rope_store_kv + attention), per config."""
    from hybrid_engine.kernels.rope import rope_store_kv_triton

    qkv = torch.randn(t, 3 * heads * dim, device="cuda", dtype=torch.float16)
    q, k, v = (x.view(t, heads, dim) for x in qkv.split(heads * dim, dim=-1))
    pos = torch.arange(t, device="cuda")
    ang = pos.float()[:, None] / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1)
    kc = torch.zeros(t // 16 + 2, 16, heads, dim, device="cuda", dtype=torch.float16)
    vc = torch.zeros_like(kc)
    slots = torch.arange(t, device="cuda")
    valid = torch.tensor([t], device="cuda", dtype=torch.int32)
    out = {}
    for cfg in dict.fromkeys(configs):
        try:
            out[cfg] = graph_us(lambda i, c=cfg: pa.prefill_attention_rope_triton(
                q, k, v, pos, cos_sin, kc, vc, slots, dim ** -0.5, valid, config=c))
        except Exception as e:  # noqa: BLE001
            print(f"  fused T={t} {cfg}: failed {type(e).__name__}: {str(e)[:80]}", flush=True)
    base = pa.config_for(t)
    out["unfused(rope_store+attn)"] = graph_us(lambda i: pa.prefill_attention_triton(
        *rope_store_kv_triton(q, k, v, pos, cos_sin, kc, vc, slots), v, dim ** -0.5, valid, config=base))
    return sorted(out.items(), key=lambda kv: kv[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="16,32,64,128,160,208,256,384,512")
    p.add_argument("--json")
    args = p.parse_args()
    heads, dim = 32, 128
    rows, table = [], []
    for t in [int(v) for v in args.lengths.split(",")]:
        qkv = torch.randn(t, 3, heads, dim, device="cuda", dtype=torch.float16)
        q, k, v = qkv.unbind(1)
        valid = torch.tensor([t], device="cuda", dtype=torch.int32)
        ref = pa.prefill_attention_ref(q, k, v, dim ** -0.5).float()
        res = {}
        for cfg in CONFIGS:
            try:
                out = pa.prefill_attention_triton(q, k, v, dim ** -0.5, valid, config=cfg).float()
                if (out - ref).abs().max().item() > 2e-2:
                    print(f"  T={t} {cfg}: WRONG", flush=True)
                    continue
                res[cfg] = graph_us(lambda i, c=cfg: pa.prefill_attention_triton(q, k, v, dim ** -0.5, valid,
                                                                                  config=c))
            except Exception as e:  # noqa: BLE001 - a config may not fit
                print(f"  T={t} {cfg}: failed {type(e).__name__}: {str(e)[:80]}", flush=True)
        ranked = sorted(res.items(), key=lambda kv: kv[1])
        fused = _fused(t, heads, dim, [c for c, _ in ranked[:6]] + [pa.config_for(t)])
        rows.append({"T": t, "ranked": [(str(c), round(u, 2)) for c, u in ranked],
                     "fused_rope_store": [(str(c), round(u, 2)) for c, u in fused]})
        print(f"       fused rope+store+attention: " + "  ".join(f"{c}:{u:.2f}" for c, u in fused[:4]), flush=True)
        table.append((t, ranked[0][0]))
        print(f"T={t:4d} " + "  ".join(f"{c}:{u:.2f}" for c, u in ranked[:6]), flush=True)
    print("PREFILL_CONFIGS =", table)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
