"""Kernel micro-benchmark on the GPU: Triton kernels vs SDPA and the torch references, LLaMA-2-7B shapes, fp16.

    PYTHONPATH=. python benchmarks/kernel_bench.py --out benchmarks/results/kernels-<card>-<date>.json

Every number is µs per call, two ways: `graph_us` (calls replayed from one CUDA graph: kernel time, no launch
overhead; the decode path of the engine runs like this) and `eager_us` (plain launches: the JIT path). Inputs are
rotated over enough copies to exceed L2, so bandwidth numbers are HBM numbers. `floor_us` = bytes that must move /
measured copy bandwidth (and, for prefill, max with FLOPs / measured fp16 GEMM rate); `pct_of_floor` = floor / time
(100 = at the floor). Each Triton result is also checked against the fp32 reference (`max_err`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_engine.kernels import activation, decode_attention as dec, kv_store, prefill_attention as pre  # noqa
from hybrid_engine.kernels import rms_norm, rope, sampling  # noqa: E402
from hybrid_engine.kernels._workspace import capture_graph  # noqa: E402

L2_ROTATION_BYTES = 512 << 20
DEVICE = "cuda"  # --smoke: "cpu" with the Triton interpreter and tiny shapes, to check the script itself


def timed(fn, variants: int, iters: int = 200, graph_reps: int = 20) -> dict:
    """fn(i) runs input copy i. Returns eager and graph-replay µs per call."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn(0)
        return {"eager_us": (time.perf_counter() - t0) * 1e6, "graph_us": None}
    for i in range(variants * 2):
        fn(i % variants)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i % variants)
    stop.record()
    torch.cuda.synchronize()
    result = {"eager_us": start.elapsed_time(stop) * 1e3 / iters, "graph_us": None}
    try:
        graph, _ = capture_graph(lambda: [fn(i) for i in range(variants)])
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(graph_reps):
            graph.replay()
        stop.record()
        torch.cuda.synchronize()
        result["graph_us"] = start.elapsed_time(stop) * 1e3 / (graph_reps * variants)
    except Exception as exc:  # noqa: BLE001 - a backend that cannot be captured is reported, not fatal
        result["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return result


def copies(case_bytes: int) -> int:
    return max(2, min(64, math.ceil(L2_ROTATION_BYTES / max(case_bytes, 1))))


def measure_floors() -> dict:
    if DEVICE == "cpu":
        return {"copy_GBps": 10.0, "gemm_TFLOPs": 0.1}
    n = 256 << 20
    a = torch.empty(n, dtype=torch.float16, device=DEVICE)
    b = torch.empty_like(a)
    copy = timed(lambda i: b.copy_(a), 1, iters=50)
    m = torch.randn(8192, 8192, dtype=torch.float16, device=DEVICE)
    gemm = timed(lambda i: m @ m, 1, iters=20)
    best = lambda r: min(x for x in (r["eager_us"], r["graph_us"]) if x)  # noqa: E731
    return {"copy_GBps": 2 * n * 2 / best(copy) / 1e3, "gemm_TFLOPs": 2 * 8192 ** 3 / best(gemm) / 1e6}


def row(section, case, impl, timing, floor_us, **extra):
    us = timing["graph_us"] or timing["eager_us"]
    out = {"section": section, "case": case, "impl": impl, **timing, "floor_us": floor_us,
           "pct_of_floor": 100.0 * floor_us / us, **extra}
    print(f"{section:8s} {case:28s} {impl:26s} graph {_fmt(timing['graph_us'])} eager {_fmt(timing['eager_us'])}"
          f"  floor {floor_us:7.1f}  {out['pct_of_floor']:5.1f}%  {extra.get('max_err', '')}", flush=True)
    return out


def _fmt(us):
    return f"{us:8.1f}" if us else "     n/a"


def bench_decode(args, floors) -> list[dict]:
    rows, dtype, bs = [], torch.float16, 16
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    for kv_len in args.kv_lens:
        blocks = kv_len // bs
        kv_bytes = 2 * kv_len * hkv * d * 2
        n = copies(kv_bytes)
        caches = [(torch.randn(blocks, bs, hkv, d, dtype=dtype, device=DEVICE),
                   torch.randn(blocks, bs, hkv, d, dtype=dtype, device=DEVICE)) for _ in range(n)]
        q = torch.randn(1, hq, d, dtype=dtype, device=DEVICE)
        seq_lens = torch.tensor([kv_len], dtype=torch.int32, device=DEVICE)
        exact = torch.randperm(blocks, device=DEVICE).int()[None]
        wide = torch.cat([exact, torch.zeros(1, args.max_model_len // bs - blocks, dtype=torch.int32,
                                             device=DEVICE)], dim=1)  # a decode graph's fixed table width
        contiguous = [(kc[exact[0].long()].reshape(1, kv_len, hkv, d).transpose(1, 2).contiguous(),
                       vc[exact[0].long()].reshape(1, kv_len, hkv, d).transpose(1, 2).contiguous())
                      for kc, vc in caches]
        floor = (kv_bytes + 2 * hq * d * 2) / floors["copy_GBps"] / 1e3
        want = dec.decode_attention_ref(q.float(), caches[0][0].float(), caches[0][1].float(), exact, seq_lens, scale)
        case = f"B=1 kv_len={kv_len}"
        impls = {
            "triton (table=kv_len)": lambda i: dec.decode_attention_triton(q, *caches[i], exact, seq_lens, scale),
            f"triton (table={args.max_model_len})":
                lambda i: dec.decode_attention_triton(q, *caches[i], wide, seq_lens, scale),
            "torch reference": lambda i: dec.decode_attention_ref(q, *caches[i], exact, seq_lens, scale),
            "sdpa (contiguous KV)": lambda i: F.scaled_dot_product_attention(
                q[:, :, None, :], *contiguous[i], scale=scale, enable_gqa=hq != hkv),
        }
        for splits in args.decode_splits:
            impls[f"triton splits={splits}"] = (lambda s: lambda i: dec.decode_attention_triton(
                q, *caches[i], exact, seq_lens, scale, num_splits=s))(splits)
        for name, fn in impls.items():
            got = fn(0)
            got = got.reshape(want.shape) if name.startswith("sdpa") else got
            err = (got.float() - want).abs().max().item()
            rows.append(row("decode", case, name, timed(fn, n), floor, max_err=err, kv_len=kv_len))
    return rows


def bench_prefill(args, floors) -> list[dict]:
    rows, dtype = [], torch.float16
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    backends = {"triton": pre.prefill_attention_triton, "sdpa (= torch reference)": pre.prefill_attention_ref}
    try:
        import xformers.ops as xops

        backends["xformers"] = pre.make_xformers_prefill(xops)
    except ImportError:
        pass
    try:
        import flash_attn

        backends["flash-attn"] = pre.make_flash_prefill(flash_attn)
    except ImportError:
        pass
    for tokens in args.prompt_lens:
        io_bytes = tokens * (2 * hq + 2 * hkv) * d * 2
        n = copies(io_bytes)
        qkv = [(torch.randn(tokens, hq, d, dtype=dtype, device=DEVICE),
                torch.randn(tokens, hkv, d, dtype=dtype, device=DEVICE),
                torch.randn(tokens, hkv, d, dtype=dtype, device=DEVICE)) for _ in range(n)]
        flops = 4 * hq * d * tokens * (tokens + 1) / 2
        mem_floor = io_bytes / floors["copy_GBps"] / 1e3
        floor = max(mem_floor, flops / floors["gemm_TFLOPs"] / 1e6)
        want = pre.prefill_attention_ref(*(t.float() for t in qkv[0]), scale)
        for name, impl in backends.items():
            fn = (lambda f: lambda i: f(*qkv[i], scale))(impl)
            err = (fn(0).float() - want).abs().max().item()
            rows.append(row("prefill", f"T={tokens}", name, timed(fn, n), floor, max_err=err, tokens=tokens,
                            bw_floor_us=mem_floor))
    return rows


def bench_small_ops(args, floors) -> list[dict]:
    """The element-wise kernels between the GEMVs of one decode step (T=1) and of a 100-token prefill."""
    rows, dtype, hidden, inter, vocab = [], torch.float16, args.heads * args.head_dim, args.intermediate, 32000
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    gbps = floors["copy_GBps"]
    for tokens in (1, 100):
        x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
        res = torch.randn_like(x)
        w = torch.randn(hidden, dtype=dtype, device=DEVICE)
        gate_up = torch.randn(tokens, 2 * inter, dtype=dtype, device=DEVICE)
        q = torch.randn(tokens, hq, d, dtype=dtype, device=DEVICE)
        k = torch.randn(tokens, hkv, d, dtype=dtype, device=DEVICE)
        pos = torch.arange(tokens, device=DEVICE)
        cos_sin = torch.randn(4096, d, device=DEVICE)
        cache = [torch.zeros(256, 16, hkv, d, dtype=dtype, device=DEVICE) for _ in range(2)]
        slots = torch.arange(tokens, device=DEVICE)
        ops = {
            "rms_norm+residual": (rms_norm.rms_norm_triton, rms_norm.rms_norm_ref, (x, w, 1e-5, res), 5 * x.nbytes),
            "silu_mul": (activation.silu_mul_triton, activation.silu_mul_ref, (gate_up,), 1.5 * gate_up.nbytes),
            "rope": (rope.rope_triton, rope.rope_ref, (q, k, pos, cos_sin), 2 * (q.nbytes + k.nbytes)),
            "store_kv": (kv_store.store_kv_triton, kv_store.store_kv_ref, (k, k, *cache, slots), 4 * k.nbytes),
        }
        for name, (tri, ref, inputs, nbytes) in ops.items():
            for impl, fn in (("triton", tri), ("torch reference", ref)):
                rows.append(row("small", f"{name} T={tokens}", impl, timed(lambda i: fn(*inputs), 1),
                                nbytes / gbps / 1e3))
    logits = torch.randn(1, vocab, device=DEVICE)
    for label, (t, k, p) in {"greedy": (0.0, 0, 1.0), "temperature": (0.8, 0, 1.0), "top_k=50": (0.8, 50, 1.0),
                             "top_p=0.9": (0.8, 0, 0.9), "top_k=50+top_p=0.9": (0.8, 50, 0.9)}.items():
        params = (torch.tensor([t], device=DEVICE), torch.tensor([k], dtype=torch.int32, device=DEVICE),
                  torch.tensor([p], device=DEVICE), torch.tensor([1], device=DEVICE), torch.tensor([0], device=DEVICE))
        for impl, fn in (("triton", sampling.sample_triton), ("torch reference", sampling.sample_ref)):
            rows.append(row("small", f"sample {label} V={vocab}", impl, timed(lambda i: fn(logits, *params), 1),
                            logits.nbytes / gbps / 1e3))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--max-model-len", type=int, default=4096, help="decode graph table width, in tokens")
    parser.add_argument("--decode-splits", type=int, nargs="*", default=[1, 4, 8, 16, 32],
                        help="extra fixed split counts to sweep for decode attention")
    parser.add_argument("--kv-lens", type=int, nargs="*", default=[128, 512, 2048])
    parser.add_argument("--prompt-lens", type=int, nargs="*", default=[10, 100, 500])
    parser.add_argument("--sections", nargs="*", default=["decode", "prefill", "small"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    global DEVICE, L2_ROTATION_BYTES
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE, L2_ROTATION_BYTES = "cpu", 0
        args.heads, args.kv_heads, args.head_dim, args.intermediate, args.max_model_len = 2, 1, 64, 48, 256
        args.decode_splits, args.kv_lens, args.prompt_lens = [3], [32, 80], [10, 33]
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    import triton

    floors = measure_floors()
    print(f"floors: copy {floors['copy_GBps']:.0f} GB/s, fp16 GEMM {floors['gemm_TFLOPs']:.0f} TFLOP/s")
    sections = {"decode": bench_decode, "prefill": bench_prefill, "small": bench_small_ops}
    results = {
        "card": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "dtype": "float16",
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block_size": 16},
        "command": " ".join(["python", "benchmarks/kernel_bench.py", *(argv or sys.argv[1:])]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "floors": floors, "rows": [],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.sections:
        try:
            results["rows"] += sections[name](args, floors)
        except Exception as exc:  # keep what the other sections measured
            failed.append(name)
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            print(f"section {name} failed: {exc}", file=sys.stderr)
        Path(args.out).write_text(json.dumps(results, indent=1))  # after every section
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
